"""Calibration of per-channel threshold vectors for the sparse kernels (METHODS.md §7).

Every method returns a float32 vector ``thresh`` of length d (the kernels keep channel i when
``|v_i| > thresh[i]``), computed from calibration activations ``[n_tokens, d]`` of one layer
and, where the method needs them, that layer's weights in the kernels' transposed layout
``w_t = W^T`` (``[d_in, d_out]``: row i is ``W[:, i]``). ``sparsity`` is the target fraction
of dropped (token, channel) pairs on the calibration data. ``stat_topk`` is a transform, not a
calibration: it returns the sparsified activations directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The value with a fraction ``q`` of ``values`` at or below it (0 for ``q <= 0``)."""
    flat = values.detach().reshape(-1).float()
    k = min(round(q * flat.numel()), flat.numel())
    if k <= 0:
        return flat.new_zeros(())
    return flat.kthvalue(k).values


def _row_norms(w_t: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """``||W[:, i]||₂`` per input channel, over several matrices sharing the input."""
    mats = [w_t] if isinstance(w_t, torch.Tensor) else list(w_t)
    return torch.stack([m.float().pow(2).sum(1) for m in mats]).sum(0).sqrt()


def relu_exact(acts: torch.Tensor) -> torch.Tensor:
    """Skip exactly the zero activations (``|a_i| > 0``): lossless for ReLU models."""
    return torch.zeros(acts.shape[-1], dtype=torch.float32, device=acts.device)


def threshold(acts: torch.Tensor, sparsity: float) -> torch.Tensor:
    """TEAL/CATS: one magnitude cut-off, the ``sparsity`` quantile of ``|x|`` over the layer."""
    t = _quantile(acts.abs(), sparsity)
    return torch.full((acts.shape[-1],), float(t), dtype=torch.float32, device=acts.device)


def wina(
    acts: torch.Tensor, w_t: torch.Tensor | Sequence[torch.Tensor], sparsity: float
) -> torch.Tensor:
    """WINA: keep ``|x_i|·||W[:, i]||₂ > t``, i.e. per-channel ``t / ||W[:, i]||₂``.

    ``w_t`` is the consuming matrix transposed, or several (gate and up) sharing the input.
    """
    norms = _row_norms(w_t).to(acts.device)
    t = _quantile(acts.abs().float() * norms, sparsity)
    return (t / norms).float()


def cett(
    acts: torch.Tensor,
    w_out_t: torch.Tensor,
    sparsity: float | None = None,
    t: float | None = None,
) -> torch.Tensor:
    """Sparsing Law CETT-activity ``|a_i|·||W_out[:, i]||₂ > t_l`` as ``t_l / ||W_out[:, i]||₂``.

    ``t`` is the layer threshold (e.g. the PPL-p% ``t_l`` from the thresholds table); without
    it ``t_l`` is the ``sparsity`` quantile of ``norm_i`` on the calibration activations.
    """
    norms = _row_norms(w_out_t).to(acts.device)
    if t is None:
        if sparsity is None:
            raise ValueError("cett needs a layer threshold t or a target sparsity")
        t = float(_quantile(acts.abs().float() * norms, sparsity))
    return (t / norms).float()


def chess(gate_acts: torch.Tensor, up_acts: torch.Tensor, sparsity: float) -> torch.Tensor:
    """CHESS: importance ``|σ(gate)_j|·E|up_j|``, layer quantile ``τ_l``, threshold ``τ_l/E|up_j|``.

    ``gate_acts`` are the activated gates ``σ(W_gate x)``; the returned vector is compared with
    ``|σ(gate)_j|`` (mask ``σ(gate)`` with it before the up/down projections).
    """
    mean_up = up_acts.abs().float().mean(0)
    tau = _quantile(gate_acts.abs().float() * mean_up, sparsity)
    return (tau / mean_up).float()


def stat_topk(z: torch.Tensor, k: int) -> torch.Tensor:
    """Spark's statistical top-k: ``relu(z − θ)`` with ``θ = mean(z) + std(z)·Φ⁻¹(1 − k/d)``.

    Per token (last dim), no sorting; about k of d entries stay positive for Gaussian-like z.
    """
    d = z.shape[-1]
    zf = z.float()
    q = torch.special.ndtri(torch.tensor(1.0 - k / d, device=z.device))
    theta = zf.mean(-1, keepdim=True) + zf.std(-1, keepdim=True) * q
    return torch.relu(zf - theta).to(z.dtype)


METHODS = {
    "relu-exact": relu_exact,
    "threshold": threshold,
    "wina": wina,
    "cett": cett,
    "chess": chess,
    "stat-topk": stat_topk,
}
