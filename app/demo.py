"""``sparsescope demo``: MiniLM data first, the dashboard at once, every other page filled in
the background.

The foreground probes MiniLM (the Overview, Sparsity, Dead neurons, Neuron browser, Hash
codes and SQL pages have data as soon as it lands) and starts the dashboard. A background
worker (``python -m sparsescope.app.demo STORE``, at low priority) then runs the steps below
one after the other, each a ``sparsescope`` command whose log goes to
``STORE/demo/<step>.log``; it records their state in ``STORE/demo/progress.json``, which
pages read (``note``) to say what is on its way. A step whose data is in the store already
is skipped, so a second ``make demo`` reuses everything and resumes an interrupted worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SAE_HOOK = "blocks.3.hook_resid_post"
SAE_DIR = "saes/demo-minilm"


@dataclass(frozen=True)
class Step:
    name: str
    pages: tuple[str, ...]  # the dashboard pages it fills
    done: str  # a query that returns rows once the step's data is in the store
    commands: tuple[tuple[str, ...], ...]  # sparsescope arguments; {store} is the store


STEPS = (
    Step(
        "sae",
        ("SAE features",),
        "SELECT 1 FROM sae_feature_acts LIMIT 1",
        (
            ("sae", "train", "--model", "minilm", "--hook", SAE_HOOK, "--store", "{store}",
             "--k", "16", "--expansion", "4", "--tokens", "60000", "--quiet",
             "--out", "{store}/" + SAE_DIR),
            ("probe", "--model", "minilm", "--store", "{store}", "--max-tokens", "20000",
             "--sae", "{store}/" + SAE_DIR, "--name", "demo-sae"),
        ),
    ),
    Step(
        "sparsify",
        ("Kernels",),
        "SELECT 1 WHERE EXISTS (FROM sparsify_eval) AND EXISTS (FROM kernel_bench)",
        (
            ("sparsify-eval", "--model", "minilm", "--methods", "threshold,cett,wina",
             "--targets", "0.5,0.7", "--store", "{store}"),
            ("bench", "kernels", "--quick", "--store", "{store}"),
        ),
    ),
    Step(
        "laws",
        ("Sparsity laws", "Dead neurons"),
        "SELECT 1 FROM runs WHERE kind = 'laws' AND status = 'complete'",
        (("laws", "--store", "{store}"),),
    ),
    Step(
        "circuits",
        ("Circuits",),
        "SELECT 1 FROM runs WHERE kind = 'circuits' AND status = 'complete'",
        (("circuits", "--task", "ioi", "--store", "{store}"),),
    ),
)  # fmt: skip


def folder(store: Path) -> Path:
    return Path(store) / "demo"


def is_done(store: Path, step: Step) -> bool:
    from sparsescope.store.catalog import is_store
    from sparsescope.store.reader import Reader

    if not is_store(Path(store)):
        return False
    with Reader(store) as reader:
        return not reader.sql(step.done).empty


def _write(store: Path, progress: dict) -> None:
    path = folder(store) / "progress.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(progress, indent=1))
    tmp.replace(path)


def read_progress(store: Path) -> dict | None:
    try:
        return json.loads((folder(store) / "progress.json").read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if not isinstance(pid, int) or pid <= 0:  # os.kill(0, ...) would signal our own group
        return False
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def run_worker(store: Path) -> int:
    """Run the steps not done yet, in order; returns the number that failed."""
    store = Path(store).resolve()
    folder(store).mkdir(parents=True, exist_ok=True)
    states = {s.name: {"pages": list(s.pages), "state": "pending"} for s in STEPS}
    progress = {"pid": os.getpid(), "started": time.time(), "steps": states}
    _write(store, progress)
    failed = 0
    for step in STEPS:
        state = states[step.name]
        if is_done(store, step):
            state["state"] = "done"
            _write(store, progress)
            continue
        state.update(state="running", started=time.time())
        _write(store, progress)
        log = folder(store) / f"{step.name}.log"
        with log.open("w") as out:
            for command in step.commands:
                args = [a.replace("{store}", str(store)) for a in command]
                code = subprocess.call(
                    [sys.executable, "-m", "sparsescope.app.cli", *args],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
                if code:
                    break
        state.update(state="failed" if code else "done", ended=time.time(), log=str(log))
        failed += bool(code)
        _write(store, progress)
    progress["ended"] = time.time()
    _write(store, progress)
    return failed


def start_worker(store: Path) -> subprocess.Popen | None:
    """Start the background worker unless every step is done; None when nothing is left."""
    if all(is_done(store, s) for s in STEPS):
        return None
    progress = read_progress(store)
    if progress and "ended" not in progress and _alive(progress.get("pid", 0)):
        return None  # a worker from an earlier `make demo` is still at it
    folder(store).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "sparsescope.app.demo", str(Path(store).resolve())],
        stdout=subprocess.DEVNULL,
        stderr=(folder(store) / "worker.log").open("w"),
        start_new_session=True,
        preexec_fn=lambda: os.nice(10),
    )


def note(store: Path, page: str) -> str | None:
    """What a page with no data yet can say about the demo step that fills it, or None."""
    progress = read_progress(store)
    if not progress:
        return None
    for name, state in progress["steps"].items():
        if page not in state["pages"] or state["state"] == "done":
            continue
        stopped = "ended" not in progress and not _alive(progress.get("pid", 0))
        if state["state"] == "failed" or stopped:
            why = "failed" if state["state"] == "failed" else "stopped"
            return (
                f"The demo's {name} step {why} (log: {state.get('log', folder(store))});"
                " run `make demo` again to resume."
            )
        if state["state"] == "running":
            minutes = (time.time() - state["started"]) / 60
            return (
                f"The demo is computing this page's data now (step {name!r}, running for"
                f" {minutes:.0f} min); the page fills when it lands."
            )
        return f"The demo will compute this page's data (step {name!r} is queued)."
    return None


if __name__ == "__main__":
    sys.exit(run_worker(Path(sys.argv[1])))
