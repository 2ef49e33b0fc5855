"""Benchmark of sparse vs dense MLP projections (rows for the ``kernel_bench`` table).

Inputs are built so the kept set of the batch (the union over its tokens) has exactly the
requested sparsity, at random positions. On CUDA times are medians of
CUDA-event timings of CUDA-graph replays (as a decoding loop runs them; the torch reference,
which synchronises, runs eagerly), with L2 evicted before every call; on CPU medians of
``perf_counter`` repeats. Per (shape, dtype, kernel, method, batch) the crossover is the
smallest tested sparsity from which the sparse path beats dense at every higher one; below it
the dense fallback runs, and ``ms_sparse`` is then the time of that dense call (``ms_dense``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import torch

from . import reference, triton_mlp

SHAPES = ((4096, 11008), (4096, 14336), (8192, 28672))
QUICK_SHAPES = ((512, 1408), (1024, 2816))
BATCHES = (1, 2, 4, 8, 16)
SPARSITIES = (0.0, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95)
GROUP_KEYS = ("device", "kernel", "method", "batch", "d_model", "d_mlp", "dtype")


def _graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured once in a CUDA graph; returns its replay (no host launch cost)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _cuda_ms(fn: Callable[[], object], graph: bool, reps: int = 40) -> float:
    """Median CUDA-event time of ``fn`` (replayed from a CUDA graph if ``graph``). Before each
    call a 256 MiB read evicts L2 and keeps the GPU busy while the host queues ``fn``."""
    flush = torch.ones(2**26, device="cuda")
    run = _graphed(fn) if graph else fn
    for _ in range(3):
        run()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]  # fmt: skip
    for start, end in events:
        flush.amax()
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _timer(device: str) -> Callable[[Callable[[], object], bool], float]:
    """``timer(fn, graph)`` in ms; ``graph`` says ``fn`` never synchronises (CUDA only)."""
    if device.startswith("cuda"):
        return _cuda_ms

    def cpu_ms(fn: Callable[[], object], graph: bool, budget_s: float = 0.2) -> float:
        fn()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 50):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    return cpu_ms


def make_inputs(
    batch: int, d_in: int, sparsity: float, dtype: torch.dtype, device: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Activations whose union kept set (``|x| > 0.5``) has ``round((1-s)·d_in)`` channels."""
    n_keep = round((1.0 - sparsity) * d_in)
    kept = torch.randperm(d_in, generator=gen)[:n_keep]
    x = torch.rand(batch, d_in, generator=gen) - 0.5
    big = (1.0 + torch.rand(batch, n_keep, generator=gen)) * torch.randn(
        batch, n_keep, generator=gen
    ).sign()
    x[:, kept] = big
    thresh = torch.full((d_in,), 0.5)
    return x.to(device=device, dtype=dtype), thresh.to(device), n_keep


def _first_winning(points: list[tuple[float, float, float]]) -> float:
    """Smallest sparsity from which ``ms_sparse < ms_dense`` at every higher tested sparsity."""
    best = float("inf")
    for s, ms_sparse, ms_dense in sorted(points, reverse=True):
        if ms_sparse >= ms_dense:
            break
        best = s
    return best


def crossover(rows: Iterable[dict]) -> dict[tuple, float]:
    """Measured crossover sparsity per group (GROUP_KEYS); ``inf`` when sparse never wins."""
    groups: dict[tuple, list[tuple[float, float, float]]] = {}
    for r in rows:
        key = tuple(r[k] for k in GROUP_KEYS)
        groups.setdefault(key, []).append((r["sparsity"], r["ms_sparse"], r["ms_dense"]))
    return {key: _first_winning(points) for key, points in groups.items()}


def _ops(kernel: str, method: str, weights: list[torch.Tensor]):
    if kernel == "down":
        dense = lambda x, t: reference.dense_matmul(x, weights[0])  # noqa: E731
        sparse = triton_mlp.sparse_matmul if method == "triton" else reference.sparse_matmul_ref
        return dense, lambda x, t: sparse(x, weights[0], t)
    dense = lambda x, t: reference.dense_gate_up(x, *weights)  # noqa: E731
    sparse = triton_mlp.sparse_gate_up if method == "triton" else reference.sparse_gate_up_ref
    return dense, lambda x, t: sparse(x, *weights, t)


def run_bench(
    device: str,
    shapes: Iterable[tuple[int, int]] | None = None,
    batches: Iterable[int] | None = None,
    sparsities: Iterable[float] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    kernels: Iterable[str] = ("down", "gate_up"),
    quick: bool = False,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Time dense vs sparse projections; one row per configuration (see module docstring).

    ``quick`` picks small shapes and few points (for a 2-core CPU). Methods: ``triton`` on
    CUDA when Triton is installed, ``torch`` (the reference) everywhere.
    """
    cuda = device.startswith("cuda")
    shapes = shapes or (QUICK_SHAPES if quick else SHAPES)
    batches = batches or ((1, 8) if quick else BATCHES)
    sparsities = sparsities or ((0.0, 0.5, 0.9) if quick else SPARSITIES)
    dtypes = dtypes or ((torch.float16, torch.bfloat16) if cuda else (torch.float32,))
    methods = ("triton", "torch") if cuda and triton_mlp.HAS_TRITON else ("torch",)
    timer = _timer(device)
    gen = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    for (d_model, d_mlp), dtype, kernel in (
        (s, d, k) for s in shapes for d in dtypes for k in kernels
    ):
        k_in, n_out = (d_mlp, d_model) if kernel == "down" else (d_model, d_mlp)
        n_w = 1 if kernel == "down" else 2
        w_gen = torch.Generator(device=device).manual_seed(1)
        weights = [
            (torch.randn(k_in, n_out, generator=w_gen, device=device) / k_in**0.5).to(dtype)
            for _ in range(n_w)
        ]
        el = weights[0].element_size()
        for batch, method in ((b, m) for b in batches for m in methods):
            dense, sparse = _ops(kernel, method, weights)
            x0, t0, _ = make_inputs(batch, k_in, 0.0, dtype, device, gen)
            ms_dense = timer(lambda f=dense, x=x0, t=t0: f(x, t), True)
            group = []
            for s in sparsities:
                x, t, n_keep = make_inputs(batch, k_in, s, dtype, device, gen)
                ms = timer(lambda f=sparse, x=x, t=t: f(x, t), method == "triton")
                group.append((s, n_keep, ms))
            cross = _first_winning([(s, ms, ms_dense) for s, _, ms in group])
            for s, n_keep, ms in group:
                fallback = reference.use_dense(s, cross)
                ms_sparse = ms_dense if fallback else ms
                rows_read = k_in if fallback else n_keep
                n_bytes = n_w * rows_read * n_out * el + batch * k_in * el + 4 * k_in
                row = {
                    "device": device, "kernel": kernel, "method": method, "sparsity": s,
                    "batch": batch, "d_model": d_model, "d_mlp": d_mlp,
                    "dtype": str(dtype).removeprefix("torch."), "ms_dense": ms_dense,
                    "ms_sparse": ms_sparse, "gbytes_per_s": n_bytes / ms_sparse / 1e6,
                    "speedup": ms_dense / ms_sparse, "ceiling": 1.0 / max(1.0 - s, 1e-9),
                }  # fmt: skip
                rows.append(row)
                if progress:
                    progress(row)
        del weights
        if cuda:
            torch.cuda.empty_cache()
    return rows
