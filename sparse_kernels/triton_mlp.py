"""Triton kernels for input-sparse MLP projections (METHODS.md §7, decoding batches).

One kernel serves the down projection (``a @ W_out^T`` restricted to kept neurons) and the
fused gate/up projection (``act(x @ Wg^T) * (x @ Wu^T)`` restricted to kept input channels).
Each program owns ``BLOCK_N`` output columns and one K-split; per ``BLOCK_K`` chunk it loads
the tokens' inputs, computes ``keep = any_b |x[b]| > thresh`` and loads weight rows with that
mask, so dropped rows are never read. Batch 1 accumulates elementwise, batches of 2..64 use
``tl.dot`` (padded to 16 rows); both accumulate in fp32. With several K-splits the programs
write fp32 partials that a second kernel sums (deterministic two-stage reduction).

Importing this module never fails: ``HAS_TRITON`` says whether the kernels exist.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - any import failure means "no Triton"
    HAS_TRITON = False

MAX_BATCH = 64

if HAS_TRITON:

    @triton.jit
    def _act(g, ACT: tl.constexpr):
        if ACT == "silu":
            r = g * tl.sigmoid(g)
        elif ACT == "gelu":
            r = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
        else:
            r = tl.maximum(g, 0.0)
        return r

    @triton.jit
    def _mac(acc, x, w):
        """acc += x @ w (dot path) with exact fp32 products for fp32 inputs."""
        if x.dtype == tl.float32:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
        return acc

    @triton.jit
    def _sparse_rows_kernel(
        x_ptr,
        t_ptr,
        w1_ptr,
        w2_ptr,
        out_ptr,
        idx_ptr,
        B,
        K,
        N,
        k_split,
        stride_xb,
        stride_wk,
        stride_os,
        BLOCK_B: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        GATED: tl.constexpr,
        SPLIT: tl.constexpr,
        ACT: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_b = tl.arange(0, BLOCK_B)
        n_ok = offs_n < N
        b_ok = offs_b < B
        k_lo = pid_s * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        # Phase 1: compact the kept rows of this K-split into a private index list.
        idx_base = idx_ptr + (pid_s * tl.num_programs(0) + pid_n) * k_split
        count = tl.zeros((), dtype=tl.int32)
        for c0 in range(k_lo, k_hi, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < k_hi
            t = tl.load(t_ptr + offs_c, mask=c_ok, other=float("inf"))
            x_ok = b_ok[:, None] & c_ok[None, :]
            x_off = offs_b[:, None] * stride_xb + offs_c[None, :]
            xc = tl.load(x_ptr + x_off, mask=x_ok, other=0.0)
            hit = (tl.abs(xc.to(tl.float32)) > t[None, :]) & x_ok
            keep = tl.max(hit.to(tl.int32), axis=0)
            pos = count + tl.cumsum(keep, axis=0) - 1
            tl.store(idx_base + pos, offs_c, mask=keep > 0)
            count += tl.sum(keep, axis=0)
        tl.debug_barrier()
        # Phase 2: stream only the kept weight rows.
        if BLOCK_B == 1:
            acc1 = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
            acc2 = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
        else:
            acc1 = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
            acc2 = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
        for j0 in range(0, count, BLOCK_K):
            offs_j = j0 + tl.arange(0, BLOCK_K)
            j_ok = offs_j < count
            rows = tl.load(idx_base + offs_j, mask=j_ok, other=0)
            w_off = rows[:, None] * stride_wk + offs_n[None, :]
            w_ok = j_ok[:, None] & n_ok[None, :]
            w1 = tl.load(w1_ptr + w_off, mask=w_ok, other=0.0)
            if GATED:
                w2 = tl.load(w2_ptr + w_off, mask=w_ok, other=0.0)
            if BLOCK_B == 1:
                x = tl.load(x_ptr + rows, mask=j_ok, other=0.0).to(tl.float32)[:, None]
                acc1 += x * w1.to(tl.float32)
                if GATED:
                    acc2 += x * w2.to(tl.float32)
            else:
                x_ok = b_ok[:, None] & j_ok[None, :]
                x_off = offs_b[:, None] * stride_xb + rows[None, :]
                x = tl.load(x_ptr + x_off, mask=x_ok, other=0.0)
                acc1 = _mac(acc1, x, w1)
                if GATED:
                    acc2 = _mac(acc2, x, w2)
        if BLOCK_B == 1:
            r1 = tl.sum(acc1, axis=0)[None, :]
            r2 = tl.sum(acc2, axis=0)[None, :]
        else:
            r1 = acc1
            r2 = acc2
        o_off = offs_b[:, None] * N + offs_n[None, :]
        o_ok = b_ok[:, None] & n_ok[None, :]
        if SPLIT:
            tl.store(out_ptr + pid_s * stride_os + o_off, r1, mask=o_ok)
            if GATED:
                n_split = tl.num_programs(1)
                tl.store(out_ptr + (n_split + pid_s) * stride_os + o_off, r2, mask=o_ok)
        else:
            if GATED:
                r1 = _act(r1, ACT) * r2
            tl.store(out_ptr + o_off, r1.to(out_ptr.dtype.element_ty), mask=o_ok)

    @triton.jit
    def _reduce_kernel(
        p_ptr,
        y_ptr,
        S,
        M,
        BLOCK_S: tl.constexpr,
        BLOCK: tl.constexpr,
        GATED: tl.constexpr,
        ACT: tl.constexpr,
    ):
        """Sum the S partials of each output at once (one memory latency, not S)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs_s = tl.arange(0, BLOCK_S)
        ok = (offs_s[:, None] < S) & (offs[None, :] < M)
        p_off = offs_s[:, None] * M + offs[None, :]
        r = tl.sum(tl.load(p_ptr + p_off, mask=ok, other=0.0), axis=0)
        if GATED:
            up = tl.sum(tl.load(p_ptr + S * M + p_off, mask=ok, other=0.0), axis=0)
            r = _act(r, ACT) * up
        tl.store(y_ptr + offs, r.to(y_ptr.dtype.element_ty), mask=offs < M)


@functools.lru_cache
def _n_sm(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def default_config(B: int, K: int, N: int, gated: bool, device: torch.device) -> dict:
    """Launch parameters (tuned on an H100): tiles, and K-splits for ~8 programs per SM."""
    block_b = 1 if B == 1 else max(16, triton.next_power_of_2(B))
    block_n = min(64 if block_b == 1 else 128, triton.next_power_of_2(N))
    block_k = 64 if block_b == 1 and not gated else 32
    n_blocks = triton.cdiv(N, block_n)
    splits = max(1, min(triton.cdiv(8 * _n_sm(device), n_blocks), triton.cdiv(K, block_k)))
    return {"BLOCK_B": block_b, "BLOCK_C": 2048 if block_b == 1 else 256, "BLOCK_K": block_k,
            "BLOCK_N": block_n, "splits": splits, "num_warps": 4, "num_stages": 1}  # fmt: skip


def _launch(x, thresh, w1, w2, act, config):
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use sparsescope.kernels.reference")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    B, K = x2.shape
    N = w1.shape[1]
    if B > MAX_BATCH:
        raise ValueError(f"batch {B} > {MAX_BATCH}: run prefill dense")
    if w1.shape[0] != K or w1.stride(1) != 1 or (w2 is not None and w2.stride() != w1.stride()):
        raise ValueError("weights must be [d_in, d_out] row-major with matching strides")
    gated = w2 is not None
    cfg = {**default_config(B, K, N, gated, x.device), **(config or {})}
    bk = cfg["BLOCK_K"]
    k_split = triton.cdiv(triton.cdiv(K, cfg["splits"]), bk) * bk
    splits = triton.cdiv(K, k_split)
    block_c = min(cfg["BLOCK_C"], triton.next_power_of_2(k_split))
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), splits)
    idx = torch.empty(grid[0] * splits * k_split, device=x.device, dtype=torch.int32)
    y = torch.empty((B, N), device=x.device, dtype=x.dtype)
    out = (
        y
        if splits == 1
        else torch.empty(((2 if gated else 1) * splits, B, N), device=x.device, dtype=torch.float32)
    )
    thresh = thresh.to(device=x.device, dtype=torch.float32)
    _sparse_rows_kernel[grid](
        x2, thresh, w1, w1 if w2 is None else w2, out, idx,
        B, K, N, k_split, x2.stride(0), w1.stride(0), B * N,
        BLOCK_B=cfg["BLOCK_B"], BLOCK_C=block_c, BLOCK_K=bk, BLOCK_N=cfg["BLOCK_N"],
        GATED=gated, SPLIT=splits > 1, ACT=act,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    if splits > 1:
        block_s = triton.next_power_of_2(splits)
        block = max(32, 4096 // block_s)
        _reduce_kernel[(triton.cdiv(B * N, block),)](
            out, y, splits, B * N, BLOCK_S=block_s, BLOCK=block, GATED=gated, ACT=act
        )
    return y.reshape(*shape[:-1], N)


def sparse_matmul(
    x: torch.Tensor, w_t: torch.Tensor, thresh: torch.Tensor, config: dict | None = None
) -> torch.Tensor:
    """Input-sparse ``x[..., keep] @ w_t[keep]`` (the down projection with ``w_t = W_out^T``)."""
    return _launch(x, thresh, w_t, None, "none", config)


def sparse_gate_up(
    x: torch.Tensor,
    w_gate_t: torch.Tensor,
    w_up_t: torch.Tensor,
    thresh: torch.Tensor,
    act: str = "silu",
    config: dict | None = None,
) -> torch.Tensor:
    """Fused input-sparse ``act(x_k @ Wg_t[k]) * (x_k @ Wu_t[k])`` with one kept set."""
    if act not in ("silu", "gelu", "relu"):
        raise ValueError(f"act must be silu, gelu or relu, not {act!r}")
    return _launch(x, thresh, w_gate_t, w_up_t, act, config)
