"""RunWriter: writes one run into ``staging/<run_id>/`` and commits it atomically.

Commit = fsync the shards, rename each table folder into
``data/<table>/run_id=<id>/``, then one catalog transaction that marks the run
``complete``. Until then no reader sees a row of the run. The writer holds an
advisory lock (``flock``) on ``staging/<run_id>/.lock`` for its whole life, so
``gc`` can tell a live job from a dead one; each new writer runs ``gc`` first.
Workers of a distributed job write their shards with ``PartWriter`` inside the
run's staging folder; the driver ``adopt``s them before it commits.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sparsescope.store import catalog, gc, summaries
from sparsescope.store.errors import StoreError
from sparsescope.store.schema import DATA_TABLES, SORT_KEYS

FLUSH_BYTES = 64 << 20


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary-encoding: integers and strings (ids, positions, layers,
    tokens). Floats and binary codes are mostly distinct, so a dictionary there only costs
    time and space (``layer_token_stats`` of MiniLM: 3x the write time, 1.4x the size)."""
    kinds = (pa.types.is_integer, pa.types.is_string, pa.types.is_large_string)
    return [f.name for f in schema if any(kind(f.type) for kind in kinds)]


class PartWriter:
    """Buffer rows per table and write them as sorted, fsynced ``<folder>/<table>/part-<n>``
    Parquet files: a run's staging area, or one shard of it written by a worker."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._buffers: dict[str, list[pa.RecordBatch]] = {}
        self._buffered: dict[str, int] = {}
        self._parts: dict[str, int] = {}
        self.rows: dict[str, int] = {}  # rows written per table

    def write(self, table: str, data: pa.Table | pa.RecordBatch | pd.DataFrame | dict) -> None:
        """Buffer a copy of rows of ``table`` (columns as in the store schema).

        The copy lies in Arrow's memory pool: the buffer holds none of the caller's numpy
        arrays, which Arrow would otherwise wrap in place. Held until the flush, those small
        arrays split the freed activation blocks of a probe's host heap, so that each batch
        grew the heap (165 MiB per Llama-3-8B-shaped batch) instead of reusing it."""
        if table not in DATA_TABLES:
            raise StoreError(f"unknown table {table!r}")
        schema = DATA_TABLES[table]
        if isinstance(data, dict):
            data = pa.table(data)
        elif isinstance(data, pd.DataFrame):
            data = pa.Table.from_pandas(data, preserve_index=False)
        try:
            data = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
            data = data.select(schema.names).cast(schema)
            data = data.take(np.arange(data.num_rows))
        except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise StoreError(f"rows for {table} do not fit its schema: {err}") from None
        self._buffers.setdefault(table, []).extend(data.to_batches())
        self.rows[table] = self.rows.get(table, 0) + data.num_rows
        self._buffered[table] = self._buffered.get(table, 0) + data.nbytes
        if self._buffered[table] >= FLUSH_BYTES:
            self.flush(table)

    def flush(self, table: str) -> None:
        batches = self._buffers.pop(table, [])
        self._buffered.pop(table, None)
        if not batches:
            return
        data = pa.Table.from_batches(batches, DATA_TABLES[table])
        if table in SORT_KEYS:
            data = data.sort_by(SORT_KEYS[table])
        path = self._next_path(table)
        pq.write_table(data, path, use_dictionary=_dictionary_columns(data.schema))
        _fsync(path)

    def flush_all(self) -> None:
        for table in list(self._buffers):
            self.flush(table)

    def add(self, table: str, part: Path) -> None:
        """Rename a finished part file (same filesystem) in as this table's next part."""
        os.replace(part, self._next_path(table))
        _fsync(self.folder / table)

    def tables(self) -> list[str]:
        """Tables with at least one part file written."""
        return list(self._parts)

    def _next_path(self, table: str) -> Path:
        folder = self.folder / table
        folder.mkdir(parents=True, exist_ok=True)
        n = self._parts.get(table, 0)
        self._parts[table] = n + 1
        return folder / f"part-{n:05d}.parquet"


class RunWriter:
    """Stage the tables of one run; ``commit`` publishes them, ``abort`` drops them."""

    def __init__(
        self,
        root: Path,
        kind: str,
        model_id: str | None,
        dataset: str | None,
        config: dict,
        name: str | None = None,
    ):
        if name is not None and (not isinstance(name, str) or not name.isprintable()):
            raise StoreError(f"a run's name is printable text, not {name!r}")
        self.root = catalog.init_store(root)
        gc.collect(self.root)
        self.run_id = new_run_id()
        self.staging = self.root / "staging" / self.run_id
        self.staging.mkdir(parents=True)
        self._lock = open(self.staging / gc.LOCK_NAME, "w")  # noqa: SIM115 (held until close)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._stage = PartWriter(self.staging)
        self._done = False
        with catalog.connect(self.root) as con:
            con.execute(
                "INSERT INTO runs (run_id, name, kind, status, model_id, dataset, config,"
                " started_at) VALUES (?, ?, ?, 'running', ?, ?, ?, ?)",
                [self.run_id, name, kind, model_id, dataset, json.dumps(config), _now()],
            )

    def write(self, table: str, data: pa.Table | pa.RecordBatch | pd.DataFrame | dict) -> None:
        """Buffer rows of ``table`` (columns as in the store schema)."""
        self._stage.write(table, data)

    def _flush(self, table: str) -> None:
        self._stage.flush(table)

    def adopt(self, folder: Path) -> dict[str, int]:
        """Move the part files staged under ``folder/<table>/`` into this run (renamed, not
        copied: ``folder`` must be on the store's filesystem); returns rows per table."""
        rows: dict[str, int] = {}
        for table_dir in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
            if table_dir.name not in DATA_TABLES:
                raise StoreError(f"{table_dir} is not a table of the store")
            for part in sorted(table_dir.glob("part-*.parquet")):
                n = pq.read_metadata(part).num_rows
                self._stage.add(table_dir.name, part)
                rows[table_dir.name] = rows.get(table_dir.name, 0) + n
        return rows

    def commit(
        self,
        n_tokens: int | None = None,
        models: list[dict] | None = None,
        config: dict | None = None,
    ) -> str:
        """Publish the run: shards become visible together, atomically for readers.
        ``config`` replaces the run's config JSON (settings only known once the run is done).
        The run's summaries (``store.summaries``) are derived from its staged rows first."""
        self._stage.flush_all()
        for table, rows in summaries.summarize(lambda table: self.staging / table).items():
            self._stage.write(table, rows)
        self._stage.flush_all()
        moved = []
        for table in sorted(self._stage.tables()):
            target = self.root / "data" / table / f"run_id={self.run_id}"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / table, target)
            _fsync(target.parent)
            moved.append(target)
        with catalog.connect(self.root) as con:
            con.execute("BEGIN")
            for row in models or []:
                cols = list(row)
                con.execute(
                    f"INSERT OR REPLACE INTO models ({', '.join(cols)})"
                    f" VALUES ({', '.join('?' * len(cols))})",
                    [row[c] for c in cols],
                )
            con.execute(
                "UPDATE runs SET status = 'complete', finished_at = ?, n_tokens = ?"
                " WHERE run_id = ?",
                [_now(), n_tokens, self.run_id],
            )
            if config is not None:
                con.execute(
                    "UPDATE runs SET config = ? WHERE run_id = ?", [json.dumps(config), self.run_id]
                )
            con.execute("COMMIT")
        self._close()
        return self.run_id

    def abort(self, error: str) -> None:
        """Drop the staged shards and mark the run failed."""
        with catalog.connect(self.root) as con:
            con.execute(
                "UPDATE runs SET status = 'failed', finished_at = ?, error = ? WHERE run_id = ?",
                [_now(), error[:2000], self.run_id],
            )
        self._close()

    def _close(self) -> None:
        self._done = True
        shutil.rmtree(self.staging, ignore_errors=True)
        self._lock.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort(f"{exc_type.__name__}: {exc}" if exc_type else "not committed")
