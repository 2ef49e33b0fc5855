"""A killed job leaves nothing visible; a reader works while another process commits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sparsescope.store.reader import Reader
from tests.conftest import run_cli


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


KILLED_JOB = textwrap.dedent("""
    import sys
    from sparsescope.app import cli
    from sparsescope.store import writer
    writer.FLUSH_BYTES = 1 << 16  # shards reach the disk after every batch
    sys.argv = ["sparsescope", "probe", "--model", "minilm", "--store", sys.argv[1],
                "--max-tokens", "400000", "--batch-size", "4", "--seq-len", "64"]
    cli.main()
""")


@pytest.mark.slow
def test_sigkill_mid_run_leaves_no_visible_rows_and_next_job_completes(tmp_path):
    root = tmp_path / "store"
    job = subprocess.Popen(
        [sys.executable, "-c", KILLED_JOB, str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    staging = root / "staging"
    try:
        _wait_for(lambda: len(list(staging.glob("*/*/part-*.parquet"))) >= 5, 180, "shards")
        assert job.poll() is None, "the job ended before it could be killed"
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
    finally:
        if job.poll() is None:
            job.kill()
    assert len(list(staging.glob("*/*/part-*.parquet"))) >= 5  # its rows were on disk
    killed = Reader(root).sql("SELECT run_id, status FROM runs")
    assert killed["status"].tolist() == ["running"]  # never marked complete
    killed_id = killed["run_id"][0]
    reader = Reader(root)
    for table in ("tokens", "layer_token_stats", "neuron_stats", "neuron_top", "hash_codes"):
        n = reader.sql(f"SELECT count(*) AS n FROM {table} WHERE run_id = ?", [killed_id])["n"][0]
        assert n == 0, table
    done = run_cli(
        "probe",
        "--model",
        "minilm",
        "--store",
        str(root),
        "--max-tokens",
        "256",
        "--seq-len",
        "64",
        "--batch-size",
        "4",
    )
    assert done.returncode == 0, done.stderr
    new_id = done.stdout.strip().splitlines()[-1]
    reader.refresh()
    status = dict(reader.sql("SELECT run_id, status FROM runs").values.tolist())
    assert status == {killed_id: "failed", new_id: "complete"}  # the new writer's gc ran
    assert reader.sql("SELECT count(*) AS n FROM tokens")["n"][0] == 256
    assert not (root / "staging" / killed_id).exists()


WRITER = textwrap.dedent("""
    import sys
    from sparsescope.store.writer import RunWriter
    root, n = sys.argv[1], int(sys.argv[2])
    for k in range(2):
        w = RunWriter(root, "probe", "m", "d", {}, name=f"run{k}")
        for part in range(4):
            sys.stdin.readline()  # one step per line from the reader
            w.write("tokens", {"seq_id": [part] * n, "pos": list(range(n)),
                               "token_id": [k] * n, "token": ["t"] * n})
            w._flush("tokens")
            print("flushed", w.run_id, flush=True)
        sys.stdin.readline()
        w.commit(4 * n)
        print("committed", w.run_id, flush=True)
""")


def test_reader_process_sees_runs_only_once_complete(tmp_path):
    """Writer and reader in lock step: after every flushed shard of a run (on disk, in
    staging) the reader sees none of its rows; after the commit it sees all of them."""
    from sparsescope.store.catalog import init_store

    root = init_store(tmp_path / "store")
    n = 1000
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reader = Reader(root)
    committed: list[str] = []
    try:
        for _ in range(2 * 5):
            writer.stdin.write("\n")
            writer.stdin.flush()
            event, run_id = writer.stdout.readline().split()
            reader.refresh()
            n_rows = reader.sql("SELECT count(*) AS n FROM tokens WHERE run_id = ?", [run_id])
            if event == "flushed":
                assert list((root / "staging" / run_id / "tokens").glob("part-*.parquet"))
                assert n_rows["n"][0] == 0
            else:
                committed.append(run_id)
                assert n_rows["n"][0] == 4 * n
    finally:
        writer.stdin.close()
        writer.wait(60)
    assert writer.returncode == 0, writer.stderr.read()
    status = dict(reader.sql("SELECT run_id, status FROM runs").values.tolist())
    assert status == {run_id: "complete" for run_id in committed} and len(committed) == 2
