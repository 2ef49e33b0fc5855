"""``sparsescope bench store``: page and SQL-recipe latency on a store at scale.

It builds a store with the real probe path (a synthetic model of a real model's shape over
the stdlib docs repeated until the token budget is met), then renders every dashboard page
(Streamlit's AppTest, caches cleared before each render) and times the queries each render
issues through the store's reader, and runs every ``sql`` block of the README through the
sandboxed console. It reports p50 and p95 over the repeats.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from sparsescope.app import state
from sparsescope.store.reader import Reader

ROOT = Path(__file__).parents[1]
DASHBOARD = ROOT / "app" / "dashboard.py"
README = ROOT / "README.md"
PAGES = [path for path, _, _ in state.PAGES]  # every page, in the dashboard's order


def readme_queries(text: str) -> list[str]:
    """The statements of the README's ``sql`` blocks (one or more per block)."""
    blocks = re.findall(r"```sql\n(.*?)```", text, flags=re.S)
    out = []
    for block in blocks:
        body = "\n".join(line for line in block.splitlines() if not line.startswith("--"))
        out += [s.strip() for s in body.split(";") if s.strip()]
    return out


def build_store(root: Path, model: str, tokens: int, quiet: bool = False) -> str:
    """Probe ``model`` over the stdlib docs repeated until ``tokens``; returns the run id."""
    from sparsescope.probes import data as data_sources
    from sparsescope.probes.job import ProbeConfig, run_probe

    docs = list(data_sources.documents("stdlib-docs"))
    corpus = root.parent / "corpus.txt"
    chars = sum(len(d) for d in docs)
    repeats = max(1, int(np.ceil(tokens * 5 / chars)))  # about 4 characters per token
    corpus.write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs * repeats))
    config = ProbeConfig(max_tokens=tokens, batch_size=16, seq_len=128)
    (run_id,) = run_probe(model, str(corpus), root, config, "bench-store", quiet)
    return run_id


@contextmanager
def timed_queries() -> Iterator[list[float]]:
    """Record the seconds of every ``Reader.sql``/``Reader.arrow`` call in the block."""
    times: list[float] = []
    originals = {name: getattr(Reader, name) for name in ("sql", "arrow")}

    def timing(fn: Callable) -> Callable:
        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                times.append(time.perf_counter() - start)

        return wrapper

    for name, fn in originals.items():
        setattr(Reader, name, timing(fn))
    try:
        yield times
    finally:
        for name, fn in originals.items():
            setattr(Reader, name, fn)


def _percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95))}


def time_pages(root: Path, repeats: int, report: Callable[[str, dict], None]) -> list[dict]:
    """Per page: queries per render, the slowest query's and all queries' p50/p95 seconds,
    and the render's p50/p95 seconds."""
    import os

    import streamlit as st
    from streamlit import logger
    from streamlit.testing.v1 import AppTest

    from sparsescope.app.state import STORE_ENV

    logger.set_log_level("ERROR")  # AppTest's notes about running without a server

    os.environ[STORE_ENV] = str(root)
    rows = []
    for page in PAGES:
        total, slowest, render, n_queries = [], [], [], 0
        for _ in range(repeats):
            st.cache_data.clear()
            at = AppTest.from_file(str(DASHBOARD), default_timeout=600).run()
            with timed_queries() as times:
                start = time.perf_counter()
                at.switch_page(page).run()
                render.append(time.perf_counter() - start)
            if at.exception:
                raise RuntimeError(f"{page} raised: {at.exception[0].value}")
            total.append(sum(times))
            slowest.append(max(times, default=0.0))
            n_queries = len(times)
        row = {
            "page": page.removeprefix("views/").removesuffix(".py"),
            "queries": n_queries,
            **{f"queries_{k}_s": v for k, v in _percentiles(total).items()},
            **{f"slowest_{k}_s": v for k, v in _percentiles(slowest).items()},
            **{f"render_{k}_s": v for k, v in _percentiles(render).items()},
        }
        report("page", row)
        rows.append(row)
    return rows


def time_recipes(root: Path, repeats: int, report: Callable[[str, dict], None]) -> list[dict]:
    """Per README SQL statement: p50/p95 seconds through the sandboxed console."""
    from sparsescope.store.console import run_sql

    rows = []
    for i, query in enumerate(readme_queries(README.read_text())):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = run_sql(root, query)
            times.append(time.perf_counter() - start)
        first = " ".join(query.split())[:60]
        row = {"recipe": i, "query": first, "rows": result.table.num_rows, **_percentiles(times)}
        report("recipe", row)
        rows.append(row)
    return rows


def bench_store(
    model: str,
    tokens: int,
    repeats: int,
    store: Path | None,
    report: Callable[[str, dict], None],
) -> dict:
    """Build (or reuse, when ``store`` holds a bench run) the store and time it."""
    with tempfile.TemporaryDirectory() as tmp:
        root = store or Path(tmp) / "store"
        if not (root / "catalog.duckdb").exists():
            start = time.perf_counter()
            build_store(root, model, tokens)
            report("build", {"seconds": time.perf_counter() - start})
        r = Reader(root)
        size = r.sql(
            "SELECT count(*) AS n, (SELECT count(*) FROM tokens) AS t FROM layer_token_stats"
        ).iloc[0]
        report("store", {"token_layer_rows": int(size["n"]), "tokens": int(size["t"])})
        r.close()
        return {
            "token_layer_rows": int(size["n"]),
            "pages": time_pages(root, repeats, report),
            "recipes": time_recipes(root, repeats, report),
        }
