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


def cett_error(
    a: torch.Tensor,
    w_out_t: torch.Tensor,
    norms: torch.Tensor,
    t: float,
    full_norm: torch.Tensor | None = None,
) -> float:
    """CETT_l(t) (Sparsing Law): the mean over tokens of ``||Σ_{norm_i ≤ t} a_i W_out[:, i]||``
    over ``||Σ_i a_i W_out[:, i]||`` with ``norm_i = |a_i|·norms_i``; ``a`` is [N, d_mlp],
    ``w_out_t`` is ``W_out^T`` ([d_mlp, d_model]), ``norms`` its row norms."""
    if full_norm is None:
        full_norm = (a @ w_out_t).norm(dim=1)
    tail = (a * ((a.abs() * norms) <= t)) @ w_out_t
    return float((tail.norm(dim=1) / full_norm.clamp_min(1e-12)).mean())


def cett_curve(
    a: torch.Tensor, w_out_t: torch.Tensor, qs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``CETT_l`` at the ``qs`` quantiles of ``norm_i = |a_i|·||W_out[:, i]||₂`` over ``a``
    [N, d_mlp]: (the thresholds, their CETT)."""
    norms = _row_norms(w_out_t)
    scores = (a.abs() * norms).flatten().sort().values
    ts = scores[(qs * (scores.numel() - 1)).long()]
    full = (a @ w_out_t).norm(dim=1)
    return ts, torch.tensor([cett_error(a, w_out_t, norms, float(t), full) for t in ts])


def cett(
    acts: Sequence[torch.Tensor],
    w_out_ts: Sequence[torch.Tensor],
    sparsity: float,
    grid: int = 32,
    rows: int = 1024,
) -> list[torch.Tensor]:
    """Sparsing Law thresholds of a whole model: one global CETT target ``c``; layer l keeps
    ``|a_i|·||W_out[:, i]||₂ > t_l`` with ``CETT_l(t_l) = c``, and ``c`` is chosen so the mean
    over layers of the dropped share is ``sparsity`` (layers get different sparsities).

    Per layer, CETT is measured (on up to ``rows`` tokens) at the ``grid`` quantiles of
    ``norm_i`` from 0 to 0.99 and interpolated. Returns per layer ``t_l / ||W_out[:, i]||₂``.
    """
    qs = torch.linspace(0.0, 0.99, grid)
    layers = []
    for a, w in zip(acts, w_out_ts, strict=True):
        a, w = a[:rows].float(), w.float().to(a.device)
        _, curve = cett_curve(a, w, qs)
        curve = curve.cummax(0).values + torch.arange(grid) * 1e-9  # strictly increasing
        layers.append((a, _row_norms(w), curve))

    def dropped(c: float) -> list[float]:
        """Per layer, the dropped share whose CETT is ``c`` (interpolated on the grid)."""
        out = []
        for _, _, curve in layers:
            i = int(torch.searchsorted(curve, torch.tensor(c)).clamp(1, grid - 1))
            frac = float(((c - curve[i - 1]) / (curve[i] - curve[i - 1])).clamp(0, 1))
            out.append(float(qs[i - 1] + frac * (qs[i] - qs[i - 1])))
        return out

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(dropped(mid)) / len(layers) < sparsity else (lo, mid)
    out = []
    for (a, norms, _), q in zip(layers, dropped((lo + hi) / 2), strict=True):
        out.append((_quantile(a.abs() * norms, q) / norms).float())
    return out


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
