"""Reader: an in-memory DuckDB connection with a view per table, complete runs only.

The catalog's small tables are copied into memory on ``refresh`` (the catalog
is attached read-only for milliseconds, never held); each data table is a view
over its Parquet shards filtered to complete runs, so a job that is writing or
died half-way stays invisible.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import duckdb
import pandas as pd
import pyarrow as pa

from sparsescope.store import catalog
from sparsescope.store.errors import StoreError
from sparsescope.store.globs import glob_literal, sql_string
from sparsescope.store.schema import CATALOG_DDL, DATA_TABLES

T = TypeVar("T")
_VANISHED = ("Cannot open file", "No files found", "No such file")


class Reader:
    """SQL over a store: ``reader.sql("SELECT ...")`` returns a DataFrame. The store's files
    are never written, but a query runs with your rights (it may read or write other files):
    untrusted SQL goes through the sandboxed console, ``store.console.run_sql``."""

    def __init__(self, root: Path | str, relative_views: bool = False):
        """``relative_views``: the views read ``data/...`` from the working directory, which
        must be the store's root (the SQL console's sandbox allows that folder alone)."""
        self.root = catalog.find_store(root).resolve()
        self.data_dir = self.root / "data"
        self._view_dir = Path("data") if relative_views else self.data_dir
        self.con = duckdb.connect()
        self._catalog_mtime: float | None = None
        self.refresh()

    def refresh(self, force: bool = True) -> bool:
        """Reload the catalog snapshot and views; with ``force=False`` only if it changed."""
        mtime = (self.root / catalog.CATALOG).stat().st_mtime
        wal = self.root / (catalog.CATALOG + ".wal")
        if wal.exists():
            mtime = max(mtime, wal.stat().st_mtime)
        if not force and mtime == self._catalog_mtime:
            return False
        with catalog.open_readable(self.root) as cat:
            snapshot = {t: cat.sql(f"SELECT * FROM {t}").to_arrow_table() for t in CATALOG_DDL}
        for table, data in snapshot.items():
            self.con.register(f"_{table}_snapshot", data)
            self.con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM _{table}_snapshot")
            self.con.unregister(f"_{table}_snapshot")
        for table, schema in DATA_TABLES.items():
            self._create_view(table, schema)
        self._catalog_mtime = mtime
        return True

    def _create_view(self, table: str, schema: pa.Schema) -> None:
        folder = self.data_dir / table
        complete = "SELECT run_id FROM runs WHERE status = 'complete'"
        if any(folder.glob("run_id=*/*.parquet")):
            source = (
                f"read_parquet({sql_string(glob_literal(self._view_dir / table) + '/*/*.parquet')},"
                " hive_partitioning = true,"
                " hive_types = {'run_id': 'VARCHAR'}, union_by_name = true)"
            )
        else:
            empty = pa.table(
                {
                    **{f.name: pa.array([], f.type) for f in schema},
                    "run_id": pa.array([], pa.string()),
                }
            )
            self.con.register("_empty", empty)
            self.con.execute(f"CREATE OR REPLACE TABLE _empty_{table} AS SELECT * FROM _empty")
            self.con.unregister("_empty")
            source = f"_empty_{table}"
        try:  # binding the view reads every shard's footer
            self.con.execute(
                f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM {source}"
                f" WHERE run_id IN ({complete})"
            )
        except duckdb.Error as err:
            first = str(err).strip().splitlines()[0]
            message = f"a Parquet file of {table} in {self.root} is damaged: {first}"
            raise StoreError(message) from None

    def run(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """``fn(cursor)``, run once more on fresh views if a file vanished under it: the
        views list a table's files when a query starts, and a concurrent ``gc`` may delete
        a dead run's files (never rows of a complete run) before they are read."""
        try:
            return fn(self.con.cursor())
        except duckdb.IOException as err:
            if not any(sign in str(err) for sign in _VANISHED):
                raise
            self.refresh()
            return fn(self.con.cursor())

    def sql(self, query: str, params: list | dict | None = None) -> pd.DataFrame:
        """Run a query on a fresh cursor (safe to share the reader across threads)."""
        return self.run(lambda cur: cur.execute(query, params or []).df())

    def arrow(self, query: str, params: list | dict | None = None) -> pa.Table:
        """Run a query; the result as an Arrow table."""
        return self.run(lambda cur: cur.sql(query, params=params).to_arrow_table())

    def disk_bytes(self) -> int:
        """Size of the store on disk (catalog, data and staging)."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_store(root: Path | str) -> Reader:
    """Open a store for reading: ``open_store(p).sql(q)`` gives a DataFrame, ``.arrow(q)`` an
    Arrow table; complete runs only."""
    return Reader(root)
