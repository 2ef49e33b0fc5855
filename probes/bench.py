"""Probe throughput benchmark: probing (all probes, writing a store) vs a bare forward.

Both sides run in one process on the same token batches; the bare side is the plain
Hugging Face ``AutoModel`` forward of the same checkpoint (for ``synthetic:`` specs, the
same random weights) with no hooks, which is what a user would otherwise run; it reuses host
memory between batches as a probe job does (``host_memory``), so the ratio is the probe's
cost alone. With ``--sparsify`` the model is sparsified once (calibration outside both
timings) and the bare side is its own forward with no probe attached: the ratio is "probed
sparse / bare sparse".
Model loading is excluded from both. Besides the ratio it reports what a probe costs in
memory and bytes: peak RSS while probing, bytes stored per token by the tables that grow
with the run, bytes of the tables that hold a fixed amount per run (per-neuron statistics and
pages), and bytes moved device -> host.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from sparsescope.probes import data as data_sources
from sparsescope.probes import host_memory
from sparsescope.probes.batches import batches
from sparsescope.probes.job import ProbeConfig, probe_model, seq_len_of
from sparsescope.probes.models import LoadedModel, load_model
from sparsescope.probes.sparsified import sparsified
from sparsescope.store.reader import Reader
from sparsescope.store.schema import PER_TOKEN_TABLES

_RSS_INTERVAL_S = 0.02


def _rss() -> int:
    """Resident set size of this process in bytes (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@contextmanager
def peak_rss() -> Iterator[dict]:
    """Sample the RSS while the block runs; ``result["peak"]`` is the largest seen."""
    result, done = {"peak": _rss()}, threading.Event()

    def sample() -> None:
        while not done.wait(_RSS_INTERVAL_S):
            result["peak"] = max(result["peak"], _rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result["peak"] = max(result["peak"], _rss())


def _bare_model(model: LoadedModel):
    if model.info.get("source") == "synthetic":
        from sparsescope.probes import synthetic

        return synthetic.build(model.model_id, model.dtype, causal_lm=False).to(model.device)
    from transformers import AutoModel

    return AutoModel.from_pretrained(model.info["path"], dtype=model.dtype).to(model.device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_forwards(forward, token_batches: list, device: torch.device) -> float:
    with torch.inference_mode(), host_memory.reused_memory():  # as in the probe job
        forward(input_ids=token_batches[0].input_ids[:1].to(device))  # warm-up
        _sync(device)
        start = time.perf_counter()
        for batch in token_batches:
            forward(input_ids=batch.input_ids.to(device))
        _sync(device)
        return time.perf_counter() - start


def _bare_sparse(model: LoadedModel, token_batches: list) -> float:
    """The (sparsified) model's own forward with no probe attached."""
    with model.fast_attention(), model.native_norms():
        return _timed_forwards(model.backbone(), token_batches, model.device)


def _store_bytes(store: Path) -> dict[str, int]:
    """Bytes of each data table's Parquet files."""
    return {
        table.name: sum(f.stat().st_size for f in table.rglob("*.parquet"))
        for table in sorted((store / "data").iterdir())
    }


def bench_probe(
    model_spec: str = "minilm",
    data: str = "stdlib-docs",
    tokens: int = 32_768,
    config: ProbeConfig | None = None,
    repeats: int = 5,
    report: Callable[[int, float, float], None] | None = None,
) -> dict:
    """Return tokens/s of both sides and their ratio (best of ``repeats`` each, interleaved;
    ``report(i, bare_s, probe_s)`` after each repeat); how the best probe run's time split
    (``probe_split_s``: forward calls, statistics, and the rest: token rows, store writes,
    commit); the peak RSS while probing; bytes stored per token (``PER_TOKEN_TABLES``) and per
    run (the other tables); and bytes moved to the host per token."""
    config = config or ProbeConfig(max_tokens=tokens)
    config.max_tokens = tokens
    model = load_model(model_spec, config.device, config.dtype)
    docs = data_sources.documents(data)
    token_batches = list(batches(model.tokenizer, docs, config.seq_len, config.batch_size, tokens))
    n = sum(b.input_ids.numel() for b in token_batches)
    with ExitStack() as stack:
        if config.sparsify:  # calibrated once, outside both timings; the probe job sees a
            seq_len = seq_len_of(model, config)  # model that already runs sparse
            stack.enter_context(
                sparsified(model, config.sparsify, data, seq_len, config.batch_size)
            )
        job = replace(config, sparsify=None)
        bare = None if config.sparsify else _bare_model(model)
        bare_times, probe_times, peaks, splits = [], [], [], []
        for _ in range(repeats):  # interleaved, so that load from elsewhere hits both alike
            if bare is None:
                bare_times.append(_bare_sparse(model, token_batches))
            else:
                bare_times.append(_timed_forwards(bare, token_batches, model.device))
            with tempfile.TemporaryDirectory() as tmp, peak_rss() as rss:
                store = Path(tmp) / "store"
                _sync(model.device)
                start = time.perf_counter()
                run_id = probe_model(model, data, store, job, quiet=True)
                _sync(model.device)
                probe_times.append(time.perf_counter() - start)
                stored = _store_bytes(store)
                settings = json.loads(
                    Reader(store)
                    .sql("SELECT config FROM runs WHERE run_id = ?", [run_id])
                    .iat[0, 0]
                )
            peaks.append(rss["peak"])
            splits.append(settings["seconds"])
            if report:
                report(len(bare_times), bare_times[-1], probe_times[-1])
    best_bare, best_probe = min(bare_times), min(probe_times)
    split = splits[probe_times.index(best_probe)]  # of the best probe run
    return {
        "model": model_spec,
        "device": str(model.device),
        "dtype": settings["dtype"],
        "codes": settings["codes"],
        "sparsify": config.sparsify,
        "tokens": n,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "bare_tok_s": n / best_bare,
        "probe_tok_s": n / best_probe,
        "ratio": best_bare / best_probe,
        "bare_s": best_bare,
        "probe_s": best_probe,
        "probe_split_s": {**split, "rest": best_probe - sum(split.values())},
        "peak_rss_mb": max(peaks) / 2**20,
        "stored_bytes_per_token": {t: b / n for t, b in stored.items() if t in PER_TOKEN_TABLES},
        "stored_bytes_per_run": {t: b for t, b in stored.items() if t not in PER_TOKEN_TABLES},
        "host_bytes_per_token": settings["host_bytes"] / n,
    }
