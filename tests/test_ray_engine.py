"""The Ray engine: same store contents as the local engine, retried or aborted on worker death."""

from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd
import pytest

from sparsescope.probes.job import ProbeConfig, run_probe
from sparsescope.store.reader import Reader
from tests.conftest import run_cli

try:
    import ray
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("ray is not installed (pip install 'sparsescope[ray]')", allow_module_level=True)

from sparsescope.probes import ray_engine  # noqa: E402
from sparsescope.probes.ray_engine import EngineError, run_probe_ray  # noqa: E402

CONFIG = ProbeConfig(max_tokens=3072, seq_len=64, batch_size=8)  # 6 batches, 3 per shard
KEYS = {
    "tokens": "seq_id, pos",
    "layer_token_stats": "seq_id, pos, layer",
    "hash_codes": "seq_id, pos, layer",
    "neuron_stats": "layer, neuron",
    "neuron_top": "layer, neuron, rank",
}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray") / "local"
    run_probe("minilm", "stdlib-docs", root, CONFIG, quiet=True)
    return root


def _table(root, table: str) -> pd.DataFrame:
    return Reader(root).sql(f"SELECT * EXCLUDE (run_id) FROM {table} ORDER BY {KEYS[table]}")


def _top_contexts(df: pd.DataFrame) -> pd.DataFrame:
    """Top contexts keyed by (layer, neuron, value), without the k-th value: tokens tied at the
    cut may enter either list, and tied tokens have no defined rank order."""
    cut = df.groupby(["layer", "neuron"])["value"].transform("min")
    keep = df[df["value"] > cut].drop(columns="rank")
    return keep.sort_values(["layer", "neuron", "value", "seq_id", "pos"], ignore_index=True)


def assert_same_store(local, other) -> None:
    for table in ("tokens", "layer_token_stats", "hash_codes"):
        pd.testing.assert_frame_equal(_table(local, table), _table(other, table), obj=table)
    a, b = _table(local, "neuron_stats"), _table(other, "neuron_stats")
    exact = ["layer", "neuron", "n_tokens", "n_active", "max"]
    pd.testing.assert_frame_equal(a[exact], b[exact], obj="neuron_stats")
    for col in ("sum", "sum_sq"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-9, atol=1e-9, err_msg=col)
    a, b = _table(local, "neuron_top"), _table(other, "neuron_top")
    pd.testing.assert_series_equal(a["value"], b["value"], obj="neuron_top values by rank")
    pd.testing.assert_frame_equal(_top_contexts(a), _top_contexts(b), obj="neuron_top contexts")
    runs = Reader(other).sql("SELECT status, n_tokens FROM runs")
    assert runs.values.tolist() == [["complete", CONFIG.max_tokens]]
    assert not any((other / "staging").iterdir())


def test_two_workers_match_the_local_engine(cluster, local_store, tmp_path):
    [run_id] = run_probe_ray("minilm", "stdlib-docs", tmp_path, CONFIG, quiet=True, workers=2)
    assert_same_store(local_store, tmp_path)
    config = Reader(tmp_path).sql("SELECT config FROM runs WHERE run_id = ?", [run_id])
    assert '"engine": "ray"' in config["config"][0]


def test_a_worker_dying_mid_shard_is_retried(cluster, local_store, tmp_path, monkeypatch):
    monkeypatch.setenv(ray_engine.CRASH_ENV, "1:0")  # shard 1 exits after its first batch
    results = []
    run_shards = ray_engine._run_shards
    monkeypatch.setattr(
        ray_engine, "_run_shards", lambda *a: results.extend(run_shards(*a)) or results
    )
    run_probe_ray("minilm", "stdlib-docs", tmp_path, CONFIG, quiet=True, workers=2)
    assert [r["attempt"] for r in results] == [0, 1]
    assert_same_store(local_store, tmp_path)


def test_retries_exhausted_abort_the_run(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv(ray_engine.CRASH_ENV, "1:0")
    config = ProbeConfig(max_tokens=1024, seq_len=64, batch_size=8)
    with pytest.raises(EngineError, match="shard 1 failed 1 times, run aborted"):
        run_probe_ray(
            "minilm", "stdlib-docs", tmp_path, config, quiet=True, workers=2, max_attempts=1
        )
    reader = Reader(tmp_path)
    assert reader.sql("SELECT status FROM runs")["status"].tolist() == ["failed"]
    for table in KEYS:
        assert reader.sql(f"SELECT count(*) AS n FROM {table}")["n"][0] == 0, table
    assert not any((tmp_path / "staging").iterdir())
    assert not list(tmp_path.glob("data/*/run_id=*"))


def test_merge_matches_numpy_over_the_whole_data():
    rng = np.random.default_rng(0)
    k, values = 5, rng.normal(size=(1, 90, 7)).astype(np.float32)  # [layer, token, neuron]
    keys = np.arange(90)

    def state(lo: int, hi: int) -> dict:
        v = values[:, lo:hi]
        order = np.argsort(-v, axis=1)[:, :k].transpose(0, 2, 1)  # [layer, neuron, rank]
        return {
            "n_tokens": hi - lo,
            "n_active": (v > 0).sum(1),
            "sum": v.sum(1, dtype=np.float64),
            "sum_sq": (v.astype(np.float64) ** 2).sum(1),
            "max": v.max(1),
            "top_val": np.take_along_axis(v.transpose(0, 2, 1), order, 2),
            "top_key": keys[lo:hi][order],
        }

    merged = ray_engine.merge_states([state(0, 20), state(20, 61), state(61, 90)])
    whole = state(0, 90)
    assert merged["n_tokens"] == 90
    for name in ("n_active", "max", "top_val", "top_key"):
        np.testing.assert_array_equal(merged[name], whole[name], err_msg=name)
    for name in ("sum", "sum_sq"):
        np.testing.assert_allclose(merged[name], whole[name], rtol=1e-12, err_msg=name)


def test_missing_ray_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(EngineError, match=r"pip install 'sparsescope\[ray\]'"):
        run_probe_ray("minilm", "stdlib-docs", "unused", CONFIG)


def test_cli_ray_options_need_the_ray_engine(tmp_path):
    done = run_cli("probe", "--model", "minilm", "--store", str(tmp_path), "--workers", "2")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --ray-address and --workers need --engine ray"
    assert not tmp_path.joinpath("catalog.duckdb").exists()
