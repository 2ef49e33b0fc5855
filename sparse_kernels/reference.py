"""Torch reference of the sparse-MLP kernel contract (METHODS.md §7); what CPU users run.

Every projection here is *input-sparse*: ``y = x[:, keep] @ w_t[keep]`` where ``w_t`` is the
weight stored transposed (``[d_in, d_out]``, row-major, so a kept input channel is one
contiguous row) and ``keep = |x| > thresh`` per channel. For a batch of B tokens the kept set
is the union of the tokens' sets, and every token uses its own values on that union. The down
projection is this product with ``x = a`` and ``w_t = W_out^T``; the gate/up projection shares
one kept set between the two weights. Accumulation is in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Sparsity of the kept set below which a layer runs dense. Measured by ``kernels.bench`` on an
#: H100 (benchmarks/results/kernel_bench_h100.json): Triton, batch 1: 0.0-0.25 (gate/up) and
#: 0.25-0.5 (down); batches of 2-16: 0.5 (gate/up) and 0.7 (down).
DEFAULT_CROSSOVER = 0.5

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def keep_mask(x: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    """Boolean ``[d_in]`` mask of kept channels: ``|x| > thresh``, OR-ed over leading dims."""
    hit = x.abs().float() > thresh.float()
    return hit.reshape(-1, x.shape[-1]).any(dim=0)


def use_dense(sparsity: float, crossover: float = DEFAULT_CROSSOVER) -> bool:
    """Dense-fallback rule: run dense when the kept set's sparsity is below ``crossover``."""
    return sparsity < crossover


def _rows(x: torch.Tensor, w_t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[:, idx] @ w_t[idx]`` with fp32 accumulation (upcast on CPU, cuBLAS does it on GPU)."""
    xk, wk = x[:, idx], w_t.index_select(0, idx)
    if x.device.type == "cpu":
        return xk.float() @ wk.float()
    return (xk @ wk).float()


def sparse_matmul_ref(x: torch.Tensor, w_t: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    """Input-sparse ``x[..., keep] @ w_t[keep]``; x is ``[..., d_in]``, w_t ``[d_in, d_out]``."""
    x2 = x.reshape(-1, x.shape[-1])
    idx = keep_mask(x2, thresh).nonzero().squeeze(1)
    y = _rows(x2, w_t, idx)
    return y.to(x.dtype).reshape(*x.shape[:-1], w_t.shape[1])


def sparse_gate_up_ref(
    x: torch.Tensor,
    w_gate_t: torch.Tensor,
    w_up_t: torch.Tensor,
    thresh: torch.Tensor,
    act: str = "silu",
) -> torch.Tensor:
    """Input-sparse gated projection ``act(x_k @ Wg_t[k]) * (x_k @ Wu_t[k])`` on one kept set."""
    x2 = x.reshape(-1, x.shape[-1])
    idx = keep_mask(x2, thresh).nonzero().squeeze(1)
    h = ACTIVATIONS[act](_rows(x2, w_gate_t, idx)) * _rows(x2, w_up_t, idx)
    return h.to(x.dtype).reshape(*x.shape[:-1], w_gate_t.shape[1])


def dense_matmul(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """Dense ``x @ w_t`` (the fallback and the baseline)."""
    return x @ w_t


def dense_gate_up(
    x: torch.Tensor, w_gate_t: torch.Tensor, w_up_t: torch.Tensor, act: str = "silu"
) -> torch.Tensor:
    """Dense gated projection ``act(x @ Wg_t) * (x @ Wu_t)`` (the fallback and the baseline)."""
    return ACTIVATIONS[act](x @ w_gate_t) * (x @ w_up_t)
