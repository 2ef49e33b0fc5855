"""Owner of METHODS.md §2 PPL-p% sparsity (Sparsing Law).

``norm_i = |a_i| · ||W_out[:, i]||``; ``CETT_l(t)`` (``kernels.thresholds.cett_error``, which
the sparse kernels' ``cett`` method shares) is the mean over tokens of the relative norm of
the MLP output carried by neurons with ``norm_i ≤ t``. PPL-p%
binary-searches one global CETT target ``c`` so that zeroing every neuron with
``norm_i ≤ t_l(c)`` raises held-out perplexity by exactly p%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sparsescope.kernels.thresholds import cett_error
from sparsescope.probes.hooks import hooked
from sparsescope.probes.models import LoadedModel

PS = (0.5, 1.0, 2.0, 5.0)
C_TOL = 1e-3  # tolerance of the binary search on the global CETT target c
PPL_TOL = 1e-3  # |ppl_ratio − (1 + p/100)| within 0.1%
_T_STEPS = 24


def _post_hook(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_post"


def w_out_norms(model: LoadedModel) -> list[torch.Tensor]:
    """||W_out[:, i]||₂ per neuron of every layer (W_out in TransformerLens layout [d_mlp, d])."""
    return [
        model.bridge.blocks[li].mlp.W_out.detach().float().norm(dim=1)
        for li in range(model.n_layers)
    ]


def capture_post(model: LoadedModel, token_batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Hidden activations a [N, d_mlp] of every layer over the batches."""
    acts: list[list[torch.Tensor]] = [[] for _ in range(model.n_layers)]
    hooks = [
        (_post_hook(li), lambda t, hook, li=li: acts[li].append(t.reshape(-1, t.shape[-1])))
        for li in range(model.n_layers)
    ]
    with torch.inference_mode(), model.fast_attention(), hooked(model.bridge, hooks):
        for ids in token_batches:
            model.backbone()(input_ids=ids)
    return [torch.cat(a).float() for a in acts]


def threshold_for_cett(
    a: torch.Tensor, w_out: torch.Tensor, norms: torch.Tensor, target: float
) -> float:
    """t with CETT(t) ≈ target, searched between min(norm_i) and their 99th percentile."""
    scores = (a.abs() * norms).flatten()
    sample = scores[
        torch.randperm(scores.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]
    ]
    lo, hi = float(scores.min()), float(torch.quantile(sample, 0.99))
    full_norm = (a @ w_out).norm(dim=1)
    for _ in range(_T_STEPS):
        mid = (lo + hi) / 2
        if cett_error(a, w_out, norms, mid, full_norm) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def lm_loss(
    model: LoadedModel,
    token_batches: list[torch.Tensor],
    thresholds: list[float] | None = None,
    norms: list[torch.Tensor] | None = None,
) -> float:
    """Mean next-token loss; with thresholds, neurons with |a_i|·norm_i ≤ t_l are zeroed."""
    hooks = []
    if thresholds is not None:

        def make(li):
            return lambda t, hook: t * ((t.abs() * norms[li]) > thresholds[li])

        hooks = [(_post_hook(li), make(li)) for li in range(model.n_layers)]
    total, count = 0.0, 0
    with torch.inference_mode(), model.fast_attention(), hooked(model.bridge, hooks):
        for ids in token_batches:
            out = model.bridge.original_model(input_ids=ids, labels=ids)
            n = ids[:, 1:].numel()
            total += float(out.loss) * n
            count += n
    return total / count


@dataclass
class PplThresholds:
    p: float
    cett: float
    thresholds: list[float]
    activation_ratio: list[float]  # per layer: mean over tokens of the CETT-active share
    ppl: float
    ppl_dense: float

    @property
    def reached(self) -> bool:
        """False when even c → 1 cannot raise perplexity by p% (a model that barely uses MLPs)."""
        return abs(self.ppl / self.ppl_dense - (1 + self.p / 100)) <= PPL_TOL * (1 + self.p / 100)


def ppl_p_thresholds(
    model: LoadedModel,
    token_batches: list[torch.Tensor],
    p: float,
    acts: list[torch.Tensor] | None = None,
) -> PplThresholds:
    """Binary search on the global CETT target c for a p% perplexity increase."""
    acts = acts or capture_post(model, token_batches)
    norms = w_out_norms(model)
    w_outs = [model.bridge.blocks[li].mlp.W_out.detach().float() for li in range(model.n_layers)]
    dense = lm_loss(model, token_batches)
    goal = 1 + p / 100
    lo, hi = 0.0, 1.0
    best = None
    while hi - lo > C_TOL:
        c = (lo + hi) / 2
        ts = [
            threshold_for_cett(acts[li], w_outs[li], norms[li], c) for li in range(model.n_layers)
        ]
        ratio = math.exp(lm_loss(model, token_batches, ts, norms) - dense)
        best = (c, ts, ratio)
        if abs(ratio - goal) <= PPL_TOL * goal:
            break
        if ratio < goal:
            lo = c
        else:
            hi = c
    c, ts, ratio = best
    active = [
        float(((acts[li].abs() * norms[li]) > ts[li]).float().mean())
        for li in range(model.n_layers)
    ]
    return PplThresholds(p, c, ts, active, math.exp(dense) * ratio, math.exp(dense))


def thresholds_rows(result: PplThresholds) -> dict[str, list]:
    """Rows of the store's ``thresholds`` table."""
    n = len(result.thresholds)
    return {
        "method": ["ppl-p"] * n,
        "p": [result.p] * n,
        "layer": list(range(n)),
        "threshold": result.thresholds,
        "cett": [result.cett] * n,
        "activation_ratio": result.activation_ratio,
        "ppl": [result.ppl] * n,
        "ppl_dense": [result.ppl_dense] * n,
    }


def mean_ratio(result: PplThresholds) -> float:
    return float(np.mean(result.activation_ratio))
