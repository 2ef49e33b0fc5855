"""The demo's background worker: steps run in order, skip what is in the store, record
their state for the pages, and a failed step says so."""

from __future__ import annotations

import json
import shutil

import pytest

from sparsescope.app import demo
from sparsescope.store.reader import Reader


@pytest.fixture
def steps(monkeypatch):
    quick = (
        demo.Step(
            "tiny", ("Sparsity laws",), "SELECT 1 FROM runs WHERE name = 'tiny'",
            (("probe", "--model", "minilm", "--store", "{store}", "--max-tokens", "64",
              "--seq-len", "32", "--name", "tiny"),),
        ),
        demo.Step(
            "broken", ("Circuits",), "SELECT 1 FROM runs WHERE name = 'never'",
            (("probe", "--model", "no/such/model", "--store", "{store}"),),
        ),
    )  # fmt: skip
    monkeypatch.setattr(demo, "STEPS", quick)
    return quick


def test_worker_runs_missing_steps_and_pages_read_its_progress(store_copy, steps):
    assert demo.note(store_copy, "Sparsity laws") is None  # no demo worker ever ran here
    assert demo.run_worker(store_copy) == 1  # the broken step fails, the worker goes on
    with Reader(store_copy) as reader:
        assert reader.sql("SELECT count(*) FROM runs WHERE name = 'tiny'").iloc[0, 0] == 1
    progress = json.loads((store_copy / "demo" / "progress.json").read_text())
    assert {n: s["state"] for n, s in progress["steps"].items()} == {
        "tiny": "done",
        "broken": "failed",
    }
    assert "error:" in (store_copy / "demo" / "broken.log").read_text()
    assert demo.note(store_copy, "Sparsity laws") is None  # its data is there
    assert "broken step failed" in demo.note(store_copy, "Circuits")
    # a second run skips the step whose data is in the store
    shutil.rmtree(store_copy / "demo")
    assert demo.run_worker(store_copy) == 1
    with Reader(store_copy) as reader:
        assert reader.sql("SELECT count(*) FROM runs WHERE name = 'tiny'").iloc[0, 0] == 1


def test_pages_say_what_is_queued_or_running(tmp_path, steps):
    (tmp_path / "demo").mkdir()
    progress = {"pid": 0, "started": 0, "steps": {
        "tiny": {"pages": ["Sparsity laws"], "state": "running", "started": 0},
        "broken": {"pages": ["Circuits"], "state": "pending"},
    }}  # fmt: skip
    (tmp_path / "demo" / "progress.json").write_text(json.dumps(progress))
    assert "stopped" in demo.note(tmp_path, "Sparsity laws")  # pid 0 is not a live worker
    progress["pid"] = __import__("os").getpid()
    (tmp_path / "demo" / "progress.json").write_text(json.dumps(progress))
    assert "computing this page's data now" in demo.note(tmp_path, "Sparsity laws")
    assert "queued" in demo.note(tmp_path, "Circuits")
    assert demo.note(tmp_path, "Overview") is None
