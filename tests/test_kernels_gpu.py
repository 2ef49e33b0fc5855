"""Sparse-MLP Triton kernels on CUDA (fp16, bf16, fp32), checked against the torch reference."""

import pytest
import torch

from sparsescope.kernels import bench, ops, triton_mlp
from sparsescope.kernels import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not triton_mlp.HAS_TRITON, reason="needs triton"),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _problem(B, K, N, s, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, K, device="cuda", generator=g)
    w1 = torch.randn(K, N, device="cuda", generator=g) / K**0.5
    w2 = torch.randn(K, N, device="cuda", generator=g) / K**0.5
    thresh = torch.full((K,), float(x.abs().float().quantile(s)) if s > 0 else -1.0)
    return x.to(dtype), w1.to(dtype), w2.to(dtype), thresh.cuda()


def _check(y, expected, dtype):
    y, expected = y.double(), expected.double()
    err = (y - expected).norm() / expected.norm().clamp_min(1e-12)
    assert err <= TOL[dtype], float(err)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 3, 8, 16, 64])
@pytest.mark.parametrize("shape", [(1000, 777), (4096, 11008)])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.9])
def test_kernels_match_reference(dtype, B, shape, s):
    K, N = shape
    x, w1, w2, t = _problem(B, K, N, s, dtype)
    xd, w1d, w2d = x.double(), w1.double(), w2.double()
    _check(triton_mlp.sparse_matmul(x, w1, t), ref.sparse_matmul_ref(xd, w1d, t), dtype)
    y = triton_mlp.sparse_gate_up(x, w1, w2, t)
    _check(y, ref.sparse_gate_up_ref(xd, w1d, w2d, t), dtype)
    if s == 0.0:
        _check(triton_mlp.sparse_matmul(x, w1, t), xd @ w1d, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_mask_gives_zero_and_union(dtype):
    x, w1, w2, t = _problem(8, 513, 301, 0.95, dtype)
    drop = torch.full_like(t, float("inf"))
    assert triton_mlp.sparse_matmul(x, w1, drop).abs().max() == 0
    assert triton_mlp.sparse_gate_up(x, w1, w2, drop).abs().max() == 0
    union = (x.abs().float() > t).any(0)
    _check(triton_mlp.sparse_matmul(x, w1, t), (x.double() * union) @ w1.double(), dtype)


def test_dispatch_uses_triton_and_fallback():
    x, w1, _, t = _problem(2, 300, 200, 0.7, torch.float16)
    _check(ops.sparse_matmul(x, w1, t), ref.sparse_matmul_ref(x.double(), w1.double(), t), x.dtype)
    _check(ops.sparse_matmul(x, w1, t, sparsity=0.0), x.double() @ w1.double(), x.dtype)


def test_bench_runs_on_cuda():
    rows = bench.run_bench(
        "cuda", shapes=((256, 512),), batches=(1, 4), sparsities=(0.0, 0.9), dtypes=DTYPES[:2]
    )
    assert {r["method"] for r in rows} == {"triton", "torch"}
    assert all(r["ms_sparse"] > 0 and r["ms_sparse"] <= r["ms_dense"] for r in rows)
