"""Sparse-MLP kernel benchmark: dense vs sparse, printed as a table.

Runs the full grid on CUDA, the quick grid on CPU. Usage:
``python benchmarks/bench_kernels.py [rows.json]`` (the optional path receives the rows).
"""

import json
import sys

import torch
from rich.console import Console
from rich.table import Table

from sparsescope.kernels.bench import crossover, run_bench


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    console = Console()
    with console.status(f"benchmarking on {device}") as status:
        rows = run_bench(
            device,
            quick=device == "cpu",
            progress=lambda r: status.update(
                f"{r['kernel']} {r['d_model']}x{r['d_mlp']} {r['dtype']} B={r['batch']}"
            ),
        )
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(rows, f, indent=1)
    table = Table(title=f"sparse MLP kernels on {device}")
    for col in ("kernel", "method", "shape", "dtype", "B", "s", "dense ms", "sparse ms"):
        table.add_column(col)
    for col in ("speedup", "ceiling", "of ceiling", "GB/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["kernel"], r["method"], f"{r['d_model']}x{r['d_mlp']}", r["dtype"],
            str(r["batch"]), f"{r['sparsity']:.2f}", f"{r['ms_dense']:.4f}",
            f"{r['ms_sparse']:.4f}", f"{r['speedup']:.2f}", f"{r['ceiling']:.1f}",
            f"{r['speedup'] / r['ceiling']:.0%}", f"{r['gbytes_per_s']:.0f}",
        )  # fmt: skip
    console.print(table)
    cross = Table(title="crossover sparsity (sparse beats dense from here on)")
    for col in ("kernel", "method", "batch", "shape", "dtype", "crossover"):
        cross.add_column(col)
    for (_, kernel, method, batch, d_model, d_mlp, dtype), s in crossover(rows).items():
        cross.add_row(kernel, method, str(batch), f"{d_model}x{d_mlp}", dtype, f"{s:.2f}")
    console.print(cross)


if __name__ == "__main__":
    main()
