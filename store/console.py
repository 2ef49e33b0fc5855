"""The sandboxed SQL console shared by the CLI (`sparsescope sql`) and the dashboard.

Only one SELECT (or WITH ... SELECT) statement is accepted. The query runs on a
fresh reader whose connection is then locked down: file access limited to the
store's data folder, configuration locked, a time limit and a row limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from sparsescope.store.reader import Reader

ROW_LIMIT = 10_000
TIME_LIMIT_S = 30


class SqlRefused(Exception):
    """The statement is not allowed or failed; the message is one line."""


@dataclass
class SqlResult:
    table: pa.Table
    truncated: bool


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def check_statement(query: str) -> None:
    """Refuse anything that is not exactly one read-only SELECT."""
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


def sandbox(reader: Reader, time_limit_s: float = TIME_LIMIT_S) -> None:
    """Lock a reader's connection down for untrusted queries (irreversible)."""
    con = reader.con
    data = str(reader.data_dir) + "/"
    con.execute(f"SET allowed_directories = ['{data.replace(chr(39), chr(39) * 2)}']")
    con.execute("SET enable_external_access = false")
    con.execute(f"SET max_execution_time = {int(time_limit_s * 1000)}")
    con.execute("SET lock_configuration = true")


def run_sql(
    root: Path | str, query: str, row_limit: int = ROW_LIMIT, time_limit_s: float = TIME_LIMIT_S
) -> SqlResult:
    """Run one user query on a sandboxed reader of the store at ``root``."""
    check_statement(query)
    reader = Reader(root)
    try:
        sandbox(reader, time_limit_s)
        try:
            rows = reader.con.sql(query).limit(row_limit + 1).to_arrow_table()
        except duckdb.Error as err:
            raise SqlRefused(_first_line(err)) from None
    finally:
        reader.close()
    return SqlResult(rows.slice(0, row_limit), rows.num_rows > row_limit)
