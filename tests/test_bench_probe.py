"""``sparsescope bench probe`` on a tiny synthetic model: what it reports against a real job."""

from __future__ import annotations

import json
from pathlib import Path

from sparsescope.store.reader import Reader
from tests.conftest import run_cli

MODEL, TOKENS = "synthetic:pythia-14m:2", 512


def _parquet_bytes(store: Path) -> dict[str, int]:
    return {
        table.name: sum(f.stat().st_size for f in table.rglob("*.parquet"))
        for table in (store / "data").iterdir()
    }


def test_bench_probe_reports_what_the_same_probe_job_stores(tmp_path):
    out = tmp_path / "bench.json"
    bench = run_cli(
        "bench", "probe", "--model", MODEL, "--tokens", str(TOKENS), "--repeats", "2",
        "--json", str(out),
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr
    assert "ratio probe/bare" in bench.stdout and "statistics" in bench.stdout
    r = json.loads(out.read_text())
    assert r["tokens"] == TOKENS and r["device"] == "cpu" and r["host_bytes_per_token"] == 0
    assert r["ratio"] == r["bare_s"] / r["probe_s"]
    split = r["probe_split_s"]  # measured inside the probe run: parts of its time
    assert 0 < split["forward"] < r["probe_s"] and 0 < split["statistics"] < r["probe_s"]
    assert split["rest"] > 0

    # the same job through `sparsescope probe` writes the same Parquet bytes per table
    store = tmp_path / "store"
    job = run_cli("probe", "--model", MODEL, "--max-tokens", str(TOKENS), "--store", str(store))
    assert job.returncode == 0, job.stderr
    stored = _parquet_bytes(store)
    per_token = {t: round(b * TOKENS) for t, b in r["stored_bytes_per_token"].items()}
    assert per_token == {t: stored[t] for t in per_token}
    assert set(per_token) == {"tokens", "layer_token_stats", "hash_codes"}
    assert r["stored_bytes_per_run"] == {t: b for t, b in stored.items() if t not in per_token}
    (config,) = Reader(store).sql("SELECT config FROM runs")["config"]
    seconds = json.loads(config)["seconds"]  # the job's own split, kept with its run
    assert set(seconds) == {"forward", "statistics"} and all(s > 0 for s in seconds.values())
