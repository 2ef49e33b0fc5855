"""Small per-run tables derived at commit from a run's staged token rows.

Pages read these instead of scanning every token row: ``layer_summary`` holds, per layer,
the sums over tokens of ``layer_token_stats`` (mergeable: add the sums, take the maxima).
The writer calls :func:`summarize` on the staging folder just before it publishes a run, so
a summary is visible exactly when the rows it sums are. Runs published before summaries
existed get theirs from the schema v2 migration (``backfill``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from sparsescope.store.globs import glob_literal, sql_string
from sparsescope.store.schema import DATA_TABLES

# summary table -> (source table, SELECT over the source's rows, named ``src``)
SUMMARIES = {
    "layer_summary": (
        "layer_token_stats",
        "SELECT layer, count(*)::BIGINT AS n_tokens, sum(n_active)::BIGINT AS n_active,"
        " sum(n_active::DOUBLE * n_active) AS n_active_sq, sum(l1::DOUBLE) AS l1,"
        " max(max_abs) AS max_abs FROM src GROUP BY layer ORDER BY layer",
    ),
}


def summarize(folder_of: Callable[[str], Path]) -> dict[str, pa.Table]:
    """Each summary whose source table has parts in ``folder_of(source)``, by table name.

    The parts are named one by one, each escaped (``glob_literal``)."""
    written = {}
    for table, (source, query) in SUMMARIES.items():
        folder = folder_of(source)
        parts = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
        if not parts:
            continue
        con = duckdb.connect()
        try:
            files = ", ".join(sql_string(glob_literal(p)) for p in parts)
            con.execute(f"CREATE VIEW src AS SELECT * FROM read_parquet([{files}])")
            written[table] = con.sql(query).to_arrow_table().cast(DATA_TABLES[table])
        finally:
            con.close()
    return written


def backfill(root: Path, run_ids: list[str]) -> None:
    """Write the summaries of published runs that lack them (the v2 migration)."""
    data = Path(root) / "data"
    for run_id in run_ids:
        for table, rows in summarize(lambda t, r=run_id: data / t / f"run_id={r}").items():
            target = data / table / f"run_id={run_id}"
            if target.exists():
                continue
            tmp = data / table / f".tmp-{run_id}"
            tmp.mkdir(parents=True, exist_ok=True)
            pq.write_table(rows, tmp / "part-00000.parquet")
            os.replace(tmp, target)
