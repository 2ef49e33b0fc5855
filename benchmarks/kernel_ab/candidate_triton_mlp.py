"""Triton kernels for input-sparse MLP projections (METHODS.md §7, decoding batches).

One kernel serves the down projection (``a @ W_out^T`` restricted to kept neurons) and the
fused gate/up projection (``act(x @ Wg^T) * (x @ Wu^T)`` restricted to kept input channels).
Each program owns ``BLOCK_N`` output columns and one K-split; per ``BLOCK_K`` chunk it loads
the tokens' inputs, computes ``keep = any_b |x[b]| > thresh`` in registers and loads the
weight tile with the row mask ``keep``, so dropped rows are never read (a masked-off lane
issues no memory request) and no index list goes through memory. Batch 1 accumulates
elementwise, batches of 2..64 use ``tl.dot`` (padded to 16 rows); both accumulate in fp32.
With several K-splits each program writes its fp32 partial and bumps a per-column-block
counter; the last program of a block sums the partials in a fixed order (deterministic),
applies the activation and writes the output, then resets the counter: one launch per call.
The counters live in a per-device buffer, so calls on one device must not overlap on
different streams (a decoding loop runs on one stream).

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
        y_ptr,
        part_ptr,
        cnt_ptr,
        B,
        K,
        N,
        k_split,
        stride_xb,
        stride_wk,
        BLOCK_B: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_R: tl.constexpr,
        GATED: tl.constexpr,
        SPLIT: tl.constexpr,
        ACT: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
        offs_b = tl.arange(0, BLOCK_B)
        n_ok = offs_n < N
        b_ok = offs_b < B
        k_lo = pid_s * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        if BLOCK_B == 1:
            acc1 = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
            acc2 = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
        else:
            acc1 = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
            acc2 = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_hi
            t = tl.load(t_ptr + offs_k, mask=k_ok, other=float("inf"))
            if BLOCK_B == 1:
                x = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                keep = tl.abs(x) > t
                x = tl.where(keep, x, 0.0)
            else:
                x_ok = b_ok[:, None] & k_ok[None, :]
                x_off = offs_b[:, None] * stride_xb + offs_k[None, :]
                x = tl.load(x_ptr + x_off, mask=x_ok, other=0.0)
                hit = (tl.abs(x.to(tl.float32)) > t[None, :]) & x_ok
                keep = tl.max(hit.to(tl.int32), axis=0) > 0
                x = tl.where(keep[None, :], x, 0.0)
            w_off = offs_k[:, None] * stride_wk + offs_n[None, :]
            w_ok = keep[:, None] & n_ok[None, :]
            w1 = tl.load(w1_ptr + w_off, mask=w_ok, other=0.0)
            if GATED:
                w2 = tl.load(w2_ptr + w_off, mask=w_ok, other=0.0)
            if BLOCK_B == 1:
                acc1 += x[:, None] * w1.to(tl.float32)
                if GATED:
                    acc2 += x[:, None] * w2.to(tl.float32)
            else:
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
            n_split = tl.num_programs(1)
            M = B * N
            tl.store(part_ptr + pid_s * M + o_off, r1, mask=o_ok)
            if GATED:
                tl.store(part_ptr + (n_split + pid_s) * M + o_off, r2, mask=o_ok)
            tl.debug_barrier()  # all partial stores precede the release below
            done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if done == n_split - 1:
                # Last program of this column block: sum the S partials at once (fixed order).
                offs_s = tl.arange(0, BLOCK_S)
                s_ok = offs_s < n_split
                for b0 in range(0, B, BLOCK_R):
                    offs_r = b0 + tl.arange(0, BLOCK_R)
                    r_off = offs_r[:, None] * N + offs_n[None, :]
                    r_ok = (offs_r < B)[:, None] & n_ok[None, :]
                    p_off = offs_s[:, None, None] * M + r_off[None, :, :]
                    p_ok = s_ok[:, None, None] & r_ok[None, :, :]
                    p = tl.load(part_ptr + p_off, mask=p_ok, other=0.0, cache_modifier=".cg")
                    s1 = tl.sum(p, axis=0)
                    if GATED:
                        p_off += n_split * M
                        p = tl.load(part_ptr + p_off, mask=p_ok, other=0.0, cache_modifier=".cg")
                        s1 = _act(s1, ACT) * tl.sum(p, axis=0)
                    tl.store(y_ptr + r_off, s1.to(y_ptr.dtype.element_ty), mask=r_ok)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)  # ready for the next call
        else:
            if GATED:
                r1 = _act(r1, ACT) * r2
            tl.store(y_ptr + o_off, r1.to(y_ptr.dtype.element_ty), mask=o_ok)


@functools.lru_cache
def _n_sm(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def default_config(B: int, K: int, N: int, gated: bool, device: torch.device) -> dict:
    """Launch parameters (tuned on an H100): tiles, and K-splits for ``PROGRAMS`` per SM."""
    block_b = 1 if B == 1 else max(16, triton.next_power_of_2(B))
    block_n = min(64 if block_b == 1 else 128, triton.next_power_of_2(N))
    block_k = (128 if not gated else 64) if block_b == 1 else (64 if not gated else 32)
    return {"BLOCK_B": block_b, "BLOCK_K": block_k, "BLOCK_N": block_n, "PROGRAMS": 4,
            "num_warps": 4, "num_stages": 1}  # fmt: skip


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters (the kernel leaves them zeroed); cached per device."""
    cnt = _COUNTERS.get(device)
    if cnt is None or cnt.numel() < n:
        cnt = torch.zeros(max(n, 1024), device=device, dtype=torch.int32)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return cnt  # zeroed by this graph; not cached (an eager call must not see it)
        _COUNTERS[device] = cnt
    return cnt


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
    bk, bn = cfg["BLOCK_K"], cfg["BLOCK_N"]
    n_blocks = triton.cdiv(N, bn)
    splits = cfg.get("splits") or triton.cdiv(cfg["PROGRAMS"] * _n_sm(x.device), n_blocks)
    splits = max(1, min(splits, triton.cdiv(K, bk)))
    k_split = triton.cdiv(triton.cdiv(K, splits), bk) * bk
    splits = triton.cdiv(K, k_split)
    grid = (n_blocks, splits)
    y = torch.empty((B, N), device=x.device, dtype=x.dtype)
    if splits > 1:
        part = torch.empty(
            (2 if gated else 1) * splits * B * N, device=x.device, dtype=torch.float32
        )
        cnt = _counters(x.device, n_blocks)
    else:
        part = cnt = y
    block_s = triton.next_power_of_2(splits)
    block_r = min(triton.next_power_of_2(B), max(1, 8192 // (block_s * bn)))
    thresh = thresh.to(device=x.device, dtype=torch.float32)
    _sparse_rows_kernel[grid](
        x2, thresh, w1, w1 if w2 is None else w2, y, part, cnt,
        B, K, N, k_split, x2.stride(0), w1.stride(0),
        BLOCK_B=cfg["BLOCK_B"], BLOCK_K=bk, BLOCK_N=bn, BLOCK_S=block_s, BLOCK_R=block_r,
        GATED=gated, SPLIT=splits > 1, ACT=act,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
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
