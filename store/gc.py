"""Garbage collection: remove what dead jobs left behind.

A live writer holds ``flock`` on ``staging/<run_id>/.lock``; the kernel drops
that lock when its process dies, however it dies. Everything of a run whose
lock is free and that is not ``complete`` is debris.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

from sparsescope.store import catalog

LOCK_NAME = ".lock"
GRACE_S = 10.0  # a staging folder this young may belong to a writer that is starting


def is_live(staging: Path) -> bool:
    """True if a live writer holds the lock of this staging folder."""
    lock = staging / LOCK_NAME
    if not lock.exists():
        return time.time() - staging.stat().st_mtime < GRACE_S if staging.exists() else False
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def collect(root: Path) -> dict:
    """Mark runs of dead jobs failed and delete their staged and half-published shards."""
    root = catalog.check_store(Path(root))
    staging = root / "staging"
    with catalog.connect(root) as con:
        rows = con.execute("SELECT run_id, status FROM runs").fetchall()
        dead = [r for r, s in rows if s == "running" and not is_live(staging / r)]
        if dead:
            con.executemany(
                "UPDATE runs SET status = 'failed', error = 'the job died (found by gc)'"
                " WHERE run_id = ?",
                [[r] for r in dead],
            )
    complete = {r for r, s in rows if s == "complete"}
    removed = 0
    for folder in list(staging.iterdir()) if staging.exists() else []:
        if not is_live(folder):
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)
            else:  # a stray file or link
                folder.unlink(missing_ok=True)
            removed += 1
    for part in (root / "data").glob("*/run_id=*"):
        run_id = part.name.removeprefix("run_id=")
        if run_id not in complete and not is_live(staging / run_id):
            # out of data/ in one rename first, so readers never list a half-deleted folder
            trash = staging / f"_gc-{part.parent.name}-{run_id}"
            os.replace(part, trash)
            shutil.rmtree(trash, ignore_errors=True)
            removed += 1
    return {"failed_runs": dead, "removed_folders": removed}
