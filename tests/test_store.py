"""The store: staging, atomic commit, complete-only views, schema, gc."""

from __future__ import annotations

import os

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from sparsescope.store import catalog
from sparsescope.store.errors import StoreError
from sparsescope.store.gc import collect
from sparsescope.store.reader import Reader
from sparsescope.store.schema import DATA_TABLES, SCHEMA_VERSION
from sparsescope.store.writer import RunWriter

TOKENS = {"seq_id": [0, 0, 1], "pos": [0, 1, 0], "token_id": [7, 8, 9], "token": ["a", "b", "c"]}


def test_run_invisible_until_commit_then_complete(tmp_path):
    root = tmp_path / "s"
    writer = RunWriter(root, "probe", "m", "d", {"x": 1}, name="first")
    writer.write("tokens", TOKENS)
    reader = Reader(root)
    assert reader.sql("SELECT count(*) AS n FROM tokens")["n"][0] == 0
    assert reader.sql("SELECT status FROM runs")["status"].tolist() == ["running"]
    run_id = writer.commit(3, models=[{"model_id": "m", "n_layers": 2, "d_mlp": 4}])
    assert reader.refresh(force=False)
    rows = reader.sql("SELECT seq_id, pos, token, run_id FROM tokens ORDER BY seq_id, pos")
    assert rows["token"].tolist() == ["a", "b", "c"]
    assert set(rows["run_id"]) == {run_id}
    run = reader.sql("SELECT * FROM runs").iloc[0]
    assert (run["status"], run["n_tokens"], run["name"]) == ("complete", 3, "first")
    assert reader.sql("SELECT d_mlp FROM models")["d_mlp"].tolist() == [4]
    assert not (root / "staging" / run_id).exists()
    assert (root / "data" / "tokens" / f"run_id={run_id}").is_dir()


def test_buffered_rows_hold_none_of_the_callers_arrays(tmp_path):
    """Arrow would wrap numpy columns in place: the writer buffers a copy, so a caller that
    reuses its arrays before the flush (and the host heap those arrays pin) is not held."""
    root = tmp_path / "s"
    ids, pos = np.array([0, 0, 1]), np.array([0, 1, 0], dtype=np.int32)
    writer = RunWriter(root, "probe", "m", "d", {})
    writer.write("tokens", {**TOKENS, "seq_id": ids, "pos": pos})
    ids[:], pos[:] = 5, 9  # before the rows reach a file
    writer.commit(3)
    rows = Reader(root).sql("SELECT seq_id, pos FROM tokens ORDER BY seq_id, pos")
    assert rows.values.tolist() == [[0, 0], [0, 1], [1, 0]]


def test_every_table_has_a_typed_view_even_when_empty(tmp_path):
    root = tmp_path / "s"
    RunWriter(root, "probe", None, None, {}).commit(0)
    reader = Reader(root)
    for table, schema in DATA_TABLES.items():
        cols = reader.sql(f"DESCRIBE {table}")["column_name"].tolist()
        assert cols == [*schema.names, "run_id"], table


def test_rows_that_do_not_fit_the_schema_are_refused(tmp_path):
    with RunWriter(tmp_path / "s", "probe", None, None, {}) as writer:
        with pytest.raises(StoreError, match="tokens"):
            writer.write("tokens", {"seq_id": ["x"], "pos": [0], "token_id": [1], "token": ["a"]})
        with pytest.raises(StoreError, match="unknown table"):
            writer.write("nope", pa.table({"a": [1]}))


def test_exception_in_writer_context_marks_run_failed_and_drops_shards(tmp_path):
    root = tmp_path / "s"
    with pytest.raises(RuntimeError):
        with RunWriter(root, "probe", None, None, {}) as writer:
            writer.write("tokens", TOKENS)
            raise RuntimeError("boom")
    reader = Reader(root)
    run = reader.sql("SELECT status, error FROM runs").iloc[0]
    assert run["status"] == "failed" and "boom" in run["error"]
    assert reader.sql("SELECT count(*) AS n FROM tokens")["n"][0] == 0
    assert list((root / "staging").iterdir()) == []


def test_schema_version_recorded_and_newer_store_refused(tmp_path):
    root = catalog.init_store(tmp_path / "s")
    with catalog.connect(root) as con:
        assert catalog.schema_version(con) == SCHEMA_VERSION
        con.execute("INSERT INTO schema_version VALUES (?, now())", [SCHEMA_VERSION + 1])
    with pytest.raises(StoreError, match="newer"):
        Reader(root)


def test_migration_hook_applies_pending_versions(tmp_path, monkeypatch):
    from sparsescope.store import schema

    root = catalog.init_store(tmp_path / "s")

    def v3(con, root):
        con.execute("ALTER TABLE runs ADD COLUMN note VARCHAR")

    monkeypatch.setattr(schema, "MIGRATIONS", {**schema.MIGRATIONS, SCHEMA_VERSION + 1: v3})
    monkeypatch.setattr(catalog, "MIGRATIONS", schema.MIGRATIONS)
    monkeypatch.setattr(catalog, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with catalog.connect(root) as con:
        assert catalog.migrate(con, root) == SCHEMA_VERSION + 1
        cols = [r[0] for r in con.execute("DESCRIBE runs").fetchall()]
        assert "note" in cols


def test_gc_cleans_a_dead_run_but_not_a_live_one(tmp_path):
    root = tmp_path / "s"
    dead = RunWriter(root, "probe", None, None, {})
    dead.write("tokens", TOKENS)
    dead._flush("tokens")
    dead._lock.close()  # what the kernel does when the process dies
    (root / "data" / "tokens" / f"run_id={dead.run_id}").mkdir(parents=True)  # half-moved
    live = RunWriter(root, "probe", None, None, {})  # its start runs gc too
    assert not (root / "staging" / dead.run_id).exists()
    assert (root / "staging" / live.run_id).exists()
    assert not (root / "data" / "tokens" / f"run_id={dead.run_id}").exists()
    assert collect(root) == {"failed_runs": [], "removed_folders": 0}
    status = dict(Reader(root).sql("SELECT run_id, status FROM runs").values.tolist())
    assert status == {dead.run_id: "failed", live.run_id: "running"}
    live.commit(0)


def test_gc_removes_a_stray_file_that_it_counts(tmp_path):
    root = catalog.init_store(tmp_path / "s")
    stray = root / "staging" / "notes.txt"
    stray.write_text("left by hand")
    os.utime(stray, (0, 0))  # older than the grace a starting writer gets
    assert collect(root) == {"failed_runs": [], "removed_folders": 1}
    assert not stray.exists()


def test_not_a_store_is_refused(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="not a SparseScope store"):
        Reader(tmp_path / "junk")
    with pytest.raises(StoreError, match="not empty"):
        catalog.init_store(tmp_path / "junk")
    with pytest.raises(StoreError, match="does not exist"):
        Reader(tmp_path / "missing")


def test_users_own_duckdb_session_reads_the_shards(tmp_path):
    root = tmp_path / "s"
    writer = RunWriter(root, "probe", None, None, {})
    writer.write("tokens", TOKENS)
    run_id = writer.commit(3)
    con = duckdb.connect()
    n = con.execute(
        f"SELECT count(*) FROM read_parquet('{root}/data/tokens/*/*.parquet',"
        " hive_partitioning = true)"
        " WHERE run_id = ?",
        [run_id],
    ).fetchall()[0][0]
    assert n == 3
