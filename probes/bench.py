"""Probe throughput benchmark: probing (all probes, writing a store) vs a bare forward.

Both sides run in one process on the same token batches; the bare side is the
plain Hugging Face ``AutoModel`` forward of the same checkpoint with no hooks,
which is what a user would otherwise run. Model loading is excluded from both.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sparsescope.probes import data as data_sources
from sparsescope.probes.batches import batches
from sparsescope.probes.job import ProbeConfig, probe_model
from sparsescope.probes.models import load_model


def _bare_forward(path: str, token_batches: list, device: str) -> float:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path).to(device).eval()
    with torch.inference_mode():
        model(input_ids=token_batches[0].input_ids[:1].to(device))  # warm-up
        start = time.perf_counter()
        for batch in token_batches:
            model(input_ids=batch.input_ids.to(device))
        return time.perf_counter() - start


def bench_probe(
    model_spec: str = "minilm",
    data: str = "stdlib-docs",
    tokens: int = 32_768,
    config: ProbeConfig | None = None,
    repeats: int = 5,
    report: Callable[[int, float, float], None] | None = None,
) -> dict:
    """Return tokens/s of both sides and their ratio (best of ``repeats`` each, interleaved;
    ``report(i, bare_s, probe_s)`` after each repeat)."""
    config = config or ProbeConfig(max_tokens=tokens)
    config.max_tokens = tokens
    model = load_model(model_spec, config.device)
    token_batches = list(
        batches(
            model.tokenizer, data_sources.documents(data), config.seq_len, config.batch_size, tokens
        )
    )
    n = sum(b.input_ids.numel() for b in token_batches)
    bare_times, probe_times = [], []
    for _ in range(repeats):  # interleaved, so that load from elsewhere hits both sides alike
        bare_times.append(_bare_forward(model.info["path"], token_batches, config.device))
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            probe_model(model, data, Path(tmp) / "store", config, quiet=True)
            probe_times.append(time.perf_counter() - start)
        if report:
            report(len(bare_times), bare_times[-1], probe_times[-1])
    bare, probe = min(bare_times), min(probe_times)
    return {
        "model": model_spec,
        "tokens": n,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "bare_tok_s": n / bare,
        "probe_tok_s": n / probe,
        "ratio": bare / probe,
    }
