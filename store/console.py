"""The sandboxed SQL console shared by the CLI (`sparsescope sql`) and the dashboard.

Only one SELECT (or WITH ... SELECT) statement is accepted. The query runs in a child
process on a fresh reader whose connection is then locked down: file access limited to
the store's data folder (no temp directory: nothing spills to disk), configuration locked,
a row limit. The child's memory is capped by the operating system and it is killed at the
time limit, so no query (not even one long function call) outlives either.
"""

from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from sparsescope.store.errors import BadInput, StoreError

ROW_LIMIT = 10_000
TIME_LIMIT_S = 30
MEMORY_LIMIT = 4 << 30  # bytes of data the console's process may hold
_START_S = 20  # time a child gets to start (imports) beyond the query's limit


class SqlRefused(BadInput):
    """The statement is not allowed or failed; the message is one line."""


@dataclass
class SqlResult:
    table: pa.Table
    truncated: bool


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def check_statement(query: str) -> None:
    """Refuse anything that is not exactly one read-only SELECT."""
    if not isinstance(query, str):
        raise SqlRefused("the query must be text")
    try:
        query.encode("utf-8")
    except UnicodeEncodeError:
        raise SqlRefused("the query is not valid UTF-8 text") from None
    try:
        statements = duckdb.connect().extract_statements(query)
    except duckdb.Error as err:
        raise SqlRefused(f"SQL does not parse: {_first_line(err)}") from None
    if len(statements) != 1:
        raise SqlRefused(f"give exactly one statement (got {len(statements)})")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        first = query.split(None, 1)[0].upper() if query.split() else kind.name
        raise SqlRefused(f"only SELECT queries are allowed (got {first})")


def sandbox(con: duckdb.DuckDBPyConnection, memory_bytes: int) -> None:
    """Lock a connection down for untrusted queries (irreversible): files under ``data/`` of
    the working directory only. A relative name, so that no glob escape of the store's path
    (``st[[]1[]]`` for ``st[1]``) is allowed, which would also name a real sibling folder."""
    con.execute("SET temp_directory = ''")  # else allowed_directories holds ./.tmp too
    con.execute("SET allowed_directories = ['data/']")
    con.execute(f"SET memory_limit = '{max(1, memory_bytes // 2 >> 20)}MB'")
    con.execute("SET enable_progress_bar = false")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _serve() -> None:
    """The child: read the request (JSON on stdin), sandbox, answer on stdout with a line
    ``ready``, then a line with the kind (``ok``, ``store`` or ``refused``) and its payload
    (Arrow IPC bytes, or a one-line message)."""
    out = sys.stdout.buffer

    def answer(kind: str, payload: bytes) -> None:
        out.write(kind.encode() + b"\n" + payload)
        out.flush()

    request = json.loads(sys.stdin.read())
    memory = request["memory_bytes"]
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
        from sparsescope.store.catalog import find_store
        from sparsescope.store.reader import Reader

        os.chdir(find_store(request["root"]))  # the views read data/ from here, the
        reader = Reader(".", relative_views=True)  # one folder allowed, whatever the path holds
        sandbox(reader.con, memory)
        out.write(b"ready\n")  # the time limit starts now
        out.flush()
        limit = request["row_limit"] + 1
        rows = reader.run(lambda cur: cur.sql(request["query"]).limit(limit).to_arrow_table())
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, rows.schema) as stream:
            stream.write_table(rows)
        answer("ok", sink.getvalue().to_pybytes())
    except StoreError as err:
        answer("store", str(err).encode())
    except MemoryError:
        answer("refused", b"the query ran out of the console's memory limit")
    except Exception as err:  # noqa: BLE001 (any failure of the user's query is one line)
        answer("refused", _first_line(err).encode())


def _read(proc: subprocess.Popen, timeout: float, line: bool = False) -> bytes | None:
    """The child's output up to a newline (``line``) or to its end, or None when
    ``timeout`` seconds pass first."""
    deadline, chunks = time.monotonic() + timeout, []
    fd = proc.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 if line else 1 << 20)
        chunks.append(chunk)
        if not chunk or (line and chunk == b"\n"):
            return b"".join(chunks)


def run_sql(
    root: Path | str,
    query: str,
    row_limit: int = ROW_LIMIT,
    time_limit_s: float = TIME_LIMIT_S,
    memory_bytes: int = MEMORY_LIMIT,
) -> SqlResult:
    """Run one user query in a sandboxed child process on the store at ``root``."""
    check_statement(query)
    request = {"root": str(root), "query": query, "row_limit": row_limit}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsescope.store.console"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        proc.stdin.write(json.dumps(request | {"memory_bytes": memory_bytes}).encode())
        proc.stdin.close()
        first = _read(proc, _START_S, line=True)
        if first == b"ready\n":  # the sandbox is set: the query's time starts
            reply = _read(proc, time_limit_s)
            if reply is None:
                raise SqlRefused(f"the query ran past the {time_limit_s:g} s time limit")
        else:  # it failed before the query (a bad store), or did not start
            reply = (first or b"") + (_read(proc, _START_S) or b"")
    finally:
        proc.kill()
        proc.wait()
    kind, _, payload = reply.partition(b"\n")
    if kind == b"store":
        raise StoreError(payload.decode())
    if kind == b"refused":
        raise SqlRefused(payload.decode())
    if kind != b"ok":
        raise SqlRefused("the query ran out of the console's memory limit")
    rows = pa.ipc.open_stream(payload).read_all()
    return SqlResult(rows.slice(0, row_limit), rows.num_rows > row_limit)


if __name__ == "__main__":
    _serve()
