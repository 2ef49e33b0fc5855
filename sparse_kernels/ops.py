"""Dispatch for sparse MLP projections: Triton on CUDA, torch reference elsewhere, dense fallback.

``sparsity`` is the expected sparsity of the kept set (the union over the batch), known from
calibration; when it is below ``crossover`` the layer runs dense (exact), because skipping
rows would not pay for itself. Without it the sparse path always runs.
"""

from __future__ import annotations

import torch

from . import reference, triton_mlp


def _triton_ok(x: torch.Tensor) -> bool:
    rows = x.numel() // x.shape[-1]
    return triton_mlp.HAS_TRITON and x.is_cuda and rows <= triton_mlp.MAX_BATCH


def sparse_matmul(
    x: torch.Tensor,
    w_t: torch.Tensor,
    thresh: torch.Tensor,
    sparsity: float | None = None,
    crossover: float = reference.DEFAULT_CROSSOVER,
) -> torch.Tensor:
    """Input-sparse ``x[..., keep] @ w_t[keep]`` (down projection: ``w_t = W_out^T``)."""
    if sparsity is not None and reference.use_dense(sparsity, crossover):
        return reference.dense_matmul(x, w_t)
    if _triton_ok(x):
        return triton_mlp.sparse_matmul(x, w_t, thresh)
    return reference.sparse_matmul_ref(x, w_t, thresh)


def sparse_gate_up(
    x: torch.Tensor,
    w_gate_t: torch.Tensor,
    w_up_t: torch.Tensor,
    thresh: torch.Tensor,
    act: str = "silu",
    sparsity: float | None = None,
    crossover: float = reference.DEFAULT_CROSSOVER,
) -> torch.Tensor:
    """Input-sparse gated projection ``act(x_k @ Wg_t[k]) * (x_k @ Wu_t[k])``."""
    if sparsity is not None and reference.use_dense(sparsity, crossover):
        return reference.dense_gate_up(x, w_gate_t, w_up_t, act)
    if _triton_ok(x):
        return triton_mlp.sparse_gate_up(x, w_gate_t, w_up_t, thresh, act)
    return reference.sparse_gate_up_ref(x, w_gate_t, w_up_t, thresh, act)
