"""Sparse-MLP kernels: torch reference, Triton kernels (interpreted on CPU), calibration."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from sparsescope.kernels import bench, ops, thresholds, triton_mlp
from sparsescope.kernels import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

needs_triton = pytest.mark.skipif(
    not triton_mlp.HAS_TRITON, reason="triton is not importable (pip install triton)"
)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _dense_masked(x, w_t, thresh):
    """Plain dense float64 ``(x * keep) @ w_t`` with keep the union over tokens."""
    keep = (x.abs().double() > thresh.double()).reshape(-1, x.shape[-1]).any(0)
    return (x.double() * keep) @ w_t.double()


def _problem(B, K, N, s, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g)
    w1 = torch.randn(K, N, generator=g) / K**0.5
    w2 = torch.randn(K, N, generator=g) / K**0.5
    thresh = torch.full((K,), float(x.abs().quantile(s)) if s > 0 else -1.0)
    return [t.to(device=device, dtype=dtype) for t in (x, w1, w2)] + [thresh.to(device)]


def _close(y, expected, dtype):
    y, expected = y.double().cpu(), expected.double().cpu()
    scale = expected.abs().max().clamp_min(1.0)
    assert (y - expected).abs().max() <= TOL[dtype] * 4 * scale


# ---- reference -------------------------------------------------------------------------


@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.9])
def test_reference_matches_dense(B, s):
    x, w1, w2, t = _problem(B, 37, 23, s, torch.float32)
    _close(ref.sparse_matmul_ref(x, w1, t), _dense_masked(x, w1, t), torch.float32)
    keep = ref.keep_mask(x, t)
    xm = x * keep
    expected = torch.nn.functional.silu(xm.double() @ w1.double()) * (xm.double() @ w2.double())
    _close(ref.sparse_gate_up_ref(x, w1, w2, t), expected, torch.float32)


def test_reference_shapes_and_dtype():
    x, w1, _, t = _problem(6, 16, 8, 0.5, torch.float16)
    assert ref.sparse_matmul_ref(x[0], w1, t).shape == (8,)
    y = ref.sparse_matmul_ref(x.reshape(2, 3, 16), w1, t)
    assert y.shape == (2, 3, 8) and y.dtype == torch.float16


def test_keep_mask_is_union_and_fallback_rule():
    x, _, _, t = _problem(4, 50, 3, 0.8, torch.float32)
    per_token = x.abs() > t
    assert torch.equal(ref.keep_mask(x, t), per_token.any(0))
    assert ref.use_dense(0.05, crossover=0.1) and not ref.use_dense(0.5, crossover=0.1)


def test_ops_dispatch_cpu_and_fallback():
    x, w1, w2, t = _problem(2, 40, 30, 0.7, torch.float32)
    _close(ops.sparse_matmul(x, w1, t), _dense_masked(x, w1, t), torch.float32)
    _close(ops.sparse_matmul(x, w1, t, sparsity=0.0), x @ w1, torch.float32)
    expected = torch.nn.functional.gelu(x.double() @ w1.double()) * (x.double() @ w2.double())
    _close(ops.sparse_gate_up(x, w1, w2, t, act="gelu", sparsity=0.0), expected, torch.float32)


# ---- Triton kernels (TRITON_INTERPRET=1 on CPU) -----------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("config", [None, {"splits": 1}, {"splits": 3, "BLOCK_C": 16}])
def test_triton_matches_reference(dtype, B, config):
    x, w1, w2, t = _problem(B, 97, 53, 0.6, dtype, device=DEVICE)
    _close(triton_mlp.sparse_matmul(x, w1, t, config=config), _dense_masked(x, w1, t), dtype)
    for act in ("silu", "gelu", "relu"):
        y = triton_mlp.sparse_gate_up(x, w1, w2, t, act=act, config=config)
        _close(y, ref.sparse_gate_up_ref(x.double(), w1.double(), w2.double(), t, act), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_no_sparsity_is_dense_and_full_mask_is_zero(dtype):
    x, w1, w2, _ = _problem(2, 70, 45, 0.0, dtype, device=DEVICE)
    keep_all = torch.full((70,), -1.0, device=DEVICE)
    _close(triton_mlp.sparse_matmul(x, w1, keep_all), x.double() @ w1.double(), dtype)
    _close(triton_mlp.sparse_gate_up(x, w1, w2, keep_all), ref.dense_gate_up(x, w1, w2), dtype)
    drop_all = torch.full((70,), float("inf"), device=DEVICE)
    assert triton_mlp.sparse_matmul(x, w1, drop_all).abs().max() == 0
    assert triton_mlp.sparse_gate_up(x, w1, w2, drop_all).abs().max() == 0


@needs_triton
def test_triton_batch_uses_union_of_masks():
    x, w1, _, t = _problem(4, 64, 33, 0.9, torch.float32, device=DEVICE)
    union = torch.zeros(64, dtype=torch.bool, device=DEVICE)
    for row in x:
        union |= row.abs() > t
    _close(triton_mlp.sparse_matmul(x, w1, t), (x * union) @ w1, torch.float32)
    # a token alone keeps fewer channels than inside the batch
    alone = triton_mlp.sparse_matmul(x[:1], w1, t)
    _close(alone, _dense_masked(x[:1], w1, t), torch.float32)


@needs_triton
@settings(max_examples=8, deadline=None)
@given(
    B=st.integers(1, 9),
    K=st.integers(1, 80),
    N=st.integers(1, 40),
    s=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    gated=st.booleans(),
)
def test_triton_property(B, K, N, s, seed, gated):
    x, w1, w2, t = _problem(B, K, N, s, torch.float32, seed=seed, device=DEVICE)
    if gated:
        expected = ref.sparse_gate_up_ref(x.double(), w1.double(), w2.double(), t)
        _close(triton_mlp.sparse_gate_up(x, w1, w2, t), expected, torch.float32)
    else:
        _close(triton_mlp.sparse_matmul(x, w1, t), _dense_masked(x, w1, t), torch.float32)


def test_without_triton_the_module_imports_and_refuses_clearly(monkeypatch):
    import importlib.util
    import sys

    monkeypatch.setitem(sys.modules, "triton", None)  # "import triton" now raises ImportError
    spec = importlib.util.find_spec("sparsescope.kernels.triton_mlp")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.HAS_TRITON is False
    x, w1, _, t = _problem(1, 8, 4, 0.5, torch.float32)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        mod.sparse_matmul(x, w1, t)


# ---- calibration -----------------------------------------------------------------------


def _sparsity(acts, thresh):
    return (acts.abs() <= thresh).float().mean().item()


@pytest.mark.parametrize("target", [0.3, 0.5, 0.9])
def test_calibration_hits_target_on_held_out(target):
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(64, generator=g) + 0.2
    acts = torch.randn(4000, 64, generator=g) * scale
    calib, held = acts[:2000], acts[2000:]
    w_t = torch.randn(64, 32, generator=g) * (torch.rand(64, 1, generator=g) + 0.5)
    for thresh in (
        thresholds.threshold(calib, target),
        thresholds.wina(calib, w_t, target),
        thresholds.wina(calib, (w_t, w_t.flip(1)), target),
    ):
        assert thresh.shape == (64,) and thresh.dtype == torch.float32
        assert abs(_sparsity(held, thresh) - target) < 0.02
    up = torch.randn(4000, 64, generator=g) * scale.flip(0)
    gate = torch.nn.functional.silu(acts)
    chess = thresholds.chess(gate[:2000], up[:2000], target)
    assert abs(_sparsity(gate[2000:], chess) - target) < 0.02


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_cett_one_global_target_over_layers(target):
    """Three layers with different activation spreads: the mean dropped share is the target,
    every layer's CETT at its threshold (numpy, from the definition) is the same c, and the
    layers' sparsities differ (unlike a per-layer quantile)."""
    g = torch.Generator().manual_seed(4)
    acts = [torch.randn(1500, 48, generator=g) * torch.rand(48, generator=g) ** p
            for p in (0.5, 2.0, 4.0)]  # fmt: skip
    w_ts = [torch.randn(48, 16, generator=g) for _ in acts]
    per_channel = thresholds.cett(acts, w_ts, target, grid=64, rows=1500)
    dropped, errors = [], []
    for a, w, t in zip(acts, w_ts, per_channel, strict=True):
        a, w, t = a.double().numpy(), w.double().numpy(), t.double().numpy()
        tail = a * (np.abs(a) <= t)
        errors.append((np.linalg.norm(tail @ w, axis=1) / np.linalg.norm(a @ w, axis=1)).mean())
        dropped.append((np.abs(a) <= t).mean())
    assert np.mean(dropped) == pytest.approx(target, abs=0.01)
    assert max(errors) - min(errors) < 0.01, errors
    assert max(dropped) - min(dropped) > 0.05, dropped


def test_relu_exact_is_lossless_on_relu_mlp():
    g = torch.Generator().manual_seed(2)
    w_in_t, w_out_t = torch.randn(32, 128, generator=g), torch.randn(128, 32, generator=g)
    x = torch.randn(16, 32, generator=g)
    a = torch.relu(x @ w_in_t)
    thresh = thresholds.relu_exact(a)
    for row in a:
        y = ops.sparse_matmul(row.to(DEVICE), w_out_t.to(DEVICE), thresh.to(DEVICE))
        torch.testing.assert_close(y.cpu(), row @ w_out_t, rtol=1e-5, atol=1e-4)  # fp32 order
    assert _sparsity(a, thresh) > 0.3


def test_stat_topk_keeps_about_k():
    z = torch.randn(200, 1024, generator=torch.Generator().manual_seed(3))
    out = thresholds.stat_topk(z, k=64)
    theta = z.mean(-1, keepdim=True) + z.std(-1, keepdim=True) * norm.ppf(1 - 64 / 1024)
    torch.testing.assert_close(out, torch.relu(z - theta), rtol=1e-5, atol=1e-6)
    assert abs((out > 0).sum(-1).float().mean().item() - 64) < 8
    assert set(thresholds.METHODS) == {
        "relu-exact", "threshold", "wina", "cett", "chess", "stat-topk",
    }  # fmt: skip


# ---- benchmark -------------------------------------------------------------------------


def test_bench_rows_and_crossover():
    rows = bench.run_bench(
        "cpu", shapes=((64, 96),), batches=(1, 2), sparsities=(0.0, 0.5, 0.95), quick=True
    )
    keys = {
        "device", "kernel", "method", "sparsity", "batch", "d_model", "d_mlp", "dtype",
        "ms_dense", "ms_sparse", "gbytes_per_s", "speedup", "ceiling",
    }  # fmt: skip
    assert len(rows) == 2 * 2 * 3 and all(set(r) == keys for r in rows)


def test_bench_fallback_and_figures_from_scripted_times(monkeypatch):
    """With scripted timings (dense 10 ms; sparse 12, 8, 11, 3, 2 ms at s = 0 … .95) the
    crossover is .9 (sparse loses at .7), rows below it report the dense call, and speedup,
    ceiling and GB/s follow from the bytes a down projection 96 → 64 in fp32 reads."""
    times = iter([10.0, 12.0, 8.0, 11.0, 3.0, 2.0])
    monkeypatch.setattr(bench, "_timer", lambda device: lambda fn, graph: next(times))
    sparsities = (0.0, 0.5, 0.7, 0.9, 0.95)
    rows = bench.run_bench(
        "cpu", shapes=((64, 96),), batches=(1,), sparsities=sparsities, kernels=("down",)
    )
    by_s = {r["sparsity"]: r for r in rows}
    assert [by_s[s]["ms_sparse"] for s in sparsities] == [10.0, 10.0, 10.0, 3.0, 2.0]
    assert by_s[0.9]["speedup"] == pytest.approx(10 / 3)
    assert by_s[0.9]["ceiling"] == pytest.approx(10)
    kept_rows = round(0.1 * 96)  # weight rows read at s = .9, plus x (fp32) and thresholds
    n_bytes = kept_rows * 64 * 4 + 96 * 4 + 96 * 4
    assert by_s[0.9]["gbytes_per_s"] == pytest.approx(n_bytes / 3.0 / 1e6)
    assert by_s[0.5]["gbytes_per_s"] == pytest.approx((96 * 64 * 4 + 2 * 96 * 4) / 10.0 / 1e6)
    assert bench.crossover(rows) == {("cpu", "down", "torch", 1, 64, 96, "float32"): 0.9}


def test_crossover_of_hand_made_rows():
    def rows(key, points):
        base = dict(zip(bench.GROUP_KEYS, key, strict=True))
        return [{**base, "sparsity": s, "ms_sparse": ms, "ms_dense": 5.0} for s, ms in points]

    a, b, c = ("cpu", "down", "torch", 1, 8, 16, "f"), ("cpu", "up", "torch", 1, 8, 16, "f"), (
        "cpu", "down", "torch", 8, 8, 16, "f")  # fmt: skip
    table = (
        rows(a, [(0.0, 6.0), (0.5, 4.0), (0.9, 1.0)])  # wins from .5 on
        + rows(b, [(0.0, 6.0), (0.5, 6.0), (0.9, 7.0)])  # never wins
        + rows(c, [(0.9, 5.0), (0.0, 4.0), (0.95, 1.0)])  # ties at .9 do not count as a win
    )
    assert bench.crossover(table) == {a: 0.5, b: float("inf"), c: 0.95}
