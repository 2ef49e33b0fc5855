"""Quality of sparsified models (METHODS.md §7), rows of the ``sparsify_eval`` table.

Per method × target: the achieved sparsity on held-out text (``SparseHandle.achieved``), the
model-level speed ceiling of batch-1 decoding it allows (``SparseHandle.ceiling``) and
the quality metric next to the dense model's: ``ppl`` (perplexity, causal LMs) or, for
encoders without an LM head (MiniLM), ``emb_rel_change``: the mean over sequences of
``||e_sparse − e_dense|| / ||e_dense||`` of the mean-pooled output embeddings (dense value 0).
Thresholds are calibrated on the training split, quality is measured on the held-out one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsescope.kernels.sparsify import METHODS, Calibration, capture, sparsify, weight_count
from sparsescope.probes import data as data_sources
from sparsescope.probes.batches import batches
from sparsescope.probes.models import LoadedModel, load_model
from sparsescope.store.catalog import check_writable
from sparsescope.store.errors import BadInput
from sparsescope.store.writer import RunWriter


@dataclass
class EvalConfig:
    tokens: int = 4096  # held-out tokens
    calib_tokens: int = 4096
    seq_len: int = 128
    batch_size: int = 8
    heldout: str = "stdlib-docs:heldout"
    calibration: str = "stdlib-docs"
    device: str = "cpu"


def token_batches(model: LoadedModel, data: str, n_tokens: int, cfg: EvalConfig) -> list:
    """Up to ``n_tokens`` tokens of a data spec as ``[B, T]`` id tensors."""
    docs = data_sources.documents(data)
    found = [b.input_ids for b in batches(model.tokenizer, docs, cfg.seq_len, cfg.batch_size,
                                          n_tokens)]  # fmt: skip
    found = [ids for ids in found if ids.shape[1] >= 2]
    if not found:
        raise data_sources.DataError(f"data {data!r} gave no tokens")
    return found


def _nll(model: LoadedModel, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens of one batch."""
    logits = model.bridge.original_model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                           reduction="sum")  # fmt: skip
    return float(loss), ids[:, 1:].numel()


def _embeddings(model: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """Mean-pooled output embeddings ``[B, d_model]`` (no padding in our batches)."""
    return model.backbone()(input_ids=ids).last_hidden_state.float().mean(1)


def _scorer(model: LoadedModel, held: list[torch.Tensor]) -> tuple[str, Callable[[], float]]:
    """(metric name, function computing it over the held-out batches)."""
    if model.is_causal_lm:

        def ppl() -> float:
            total, n = 0.0, 0
            for ids in held:
                nll, count = _nll(model, ids)
                total, n = total + nll, n + count
            return math.exp(total / n)

        return "ppl", ppl
    dense = [_embeddings(model, ids) for ids in held]

    def rel_change() -> float:
        changes = [((_embeddings(model, ids) - e).norm(dim=1) / e.norm(dim=1).clamp_min(1e-12))
                   for ids, e in zip(held, dense, strict=True)]  # fmt: skip
        return float(torch.cat(changes).mean())

    return "emb_rel_change", rel_change


def evaluate(
    model: LoadedModel,
    methods: Iterable[str],
    targets: Iterable[float],
    held: list[torch.Tensor],
    calibration: Calibration,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One ``sparsify_eval`` row per method × target (relu-exact once, at target 0);
    ``on_row`` sees each row as it is done."""
    device = next(model.bridge.parameters()).device
    held = [ids.to(device) for ids in held]
    rows = []
    with torch.inference_mode(), model.fast_attention():
        metric, score = _scorer(model, held)
        dense = score()
        n_w = weight_count(model)
        for method in methods:
            for target in [0.0] if method == "relu-exact" else targets:
                handle = sparsify(model, method, target, calibration)
                try:
                    handle.track = True
                    value = score()
                finally:
                    handle.restore()
                rel = value if metric == "emb_rel_change" else value / dense - 1.0
                rows.append({
                    "model_id": model.model_id, "method": method, "target": float(target),
                    "achieved_sparsity": handle.achieved(), "model_ceiling": handle.ceiling(n_w),
                    "metric": metric,
                    "dense_value": 0.0 if metric == "emb_rel_change" else dense,
                    "sparse_value": value, "relative_increase": rel,
                })  # fmt: skip
                if on_row:
                    on_row(rows[-1])
    return rows


def check_plan(methods: list[str], targets: list[float]) -> None:
    """Reject unknown methods and targets outside [0, 1) before any work starts."""
    unknown = [m for m in methods if m not in METHODS]
    if not methods:
        raise BadInput(f"--methods: give at least one of {', '.join(METHODS)}")
    if unknown:
        raise BadInput(f"--methods: unknown {', '.join(unknown)}; use {', '.join(METHODS)}")
    if not targets or any(not 0.0 <= t < 1.0 for t in targets):
        raise BadInput(f"--targets {targets}: give sparsities in [0, 1), e.g. 0.5,0.7")


def run_sparsify_eval(
    model_spec: str,
    methods: list[str],
    targets: list[float],
    store: Path,
    cfg: EvalConfig,
    name: str | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> tuple[str, list[dict]]:
    """Evaluate a model and write the rows into a run of kind ``sparsify-eval``."""
    check_plan(methods, targets)
    check_writable(store)
    data_sources.validate(cfg.heldout)
    data_sources.validate(cfg.calibration)
    model = load_model(model_spec, cfg.device)
    held = token_batches(model, cfg.heldout, cfg.tokens, cfg)
    calib = token_batches(model, cfg.calibration, cfg.calib_tokens, cfg)
    calibration = capture(model, calib)
    rows = evaluate(model, methods, targets, held, calibration, on_row)
    config = {"methods": methods, "targets": targets, **vars(cfg)}
    with RunWriter(store, "sparsify-eval", model.model_id, cfg.heldout, config, name) as writer:
        writer.write("sparsify_eval", {k: [r[k] for r in rows] for k in rows[0]})
        n_tokens = sum(ids.numel() for ids in held)
        return writer.commit(n_tokens, models=[model.info]), rows
