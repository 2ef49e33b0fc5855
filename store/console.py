"""The sandboxed SQL console shared by the CLI (`sparsescope sql`) and the dashboard.

Only one SELECT (or WITH ... SELECT) statement is accepted. The query runs in a child
process on a fresh reader whose connection is then locked down: file access limited to
the store's data folder (no temp directory: nothing spills to disk), configuration locked,
a row limit. The child's memory is capped by the operating system and it is killed at the
time limit, so no query (not even one long function call) outlives either.
"""

from __future__ import annotations

import multiprocessing
import resource
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from sparsescope.store.errors import BadInput, StoreError
from sparsescope.store.globs import glob_literal, sql_string

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


def sandbox(con: duckdb.DuckDBPyConnection, data_dir: Path, memory_bytes: int) -> None:
    """Lock a connection down for untrusted queries (irreversible)."""
    con.execute("SET temp_directory = ''")  # else allowed_directories holds ./.tmp too
    folders = {str(data_dir) + "/", glob_literal(data_dir) + "/"}  # the views use the latter
    allowed = ", ".join(sql_string(f) for f in sorted(folders))
    con.execute(f"SET allowed_directories = [{allowed}]")
    con.execute(f"SET memory_limit = '{max(1, memory_bytes // 2 >> 20)}MB'")
    con.execute("SET enable_progress_bar = false")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _child(root: str, query: str, row_limit: int, memory_bytes: int, out) -> None:
    """Send ("ready", None) once sandboxed, then ("ok", Arrow IPC bytes) or (kind, a
    one-line message)."""
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
        from sparsescope.store.reader import Reader

        reader = Reader(root)
        sandbox(reader.con, reader.data_dir, memory_bytes)
        out.send(("ready", None))  # the time limit starts now
        rows = reader.run(lambda cur: cur.sql(query).limit(row_limit + 1).to_arrow_table())
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, rows.schema) as stream:
            stream.write_table(rows)
        out.send(("ok", sink.getvalue().to_pybytes()))
    except StoreError as err:
        out.send(("store", str(err)))
    except MemoryError:
        out.send(("refused", "the query ran out of the console's memory limit"))
    except Exception as err:  # noqa: BLE001 (any failure of the user's query is one line)
        out.send(("refused", _first_line(err)))


def run_sql(
    root: Path | str,
    query: str,
    row_limit: int = ROW_LIMIT,
    time_limit_s: float = TIME_LIMIT_S,
    memory_bytes: int = MEMORY_LIMIT,
) -> SqlResult:
    """Run one user query in a sandboxed child process on the store at ``root``."""
    check_statement(query)
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=_child, args=(str(root), query, row_limit, memory_bytes, send), daemon=True
    )
    child.start()
    send.close()
    try:
        kind, payload = receive.recv() if receive.poll(_START_S) else ("refused", "no start")
        if kind == "ready":
            if not receive.poll(time_limit_s):
                raise SqlRefused(f"the query ran past the {time_limit_s:g} s time limit")
            kind, payload = receive.recv()
    except EOFError:
        raise SqlRefused("the query ran out of the console's memory limit") from None
    finally:
        child.kill()
        child.join()
        receive.close()
    if kind == "store":
        raise StoreError(payload)
    if kind != "ok":
        raise SqlRefused(payload)
    rows = pa.ipc.open_stream(payload).read_all()
    return SqlResult(rows.slice(0, row_limit), rows.num_rows > row_limit)
