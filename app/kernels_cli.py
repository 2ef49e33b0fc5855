"""``sparsescope sparsify-eval`` and ``sparsescope bench kernels``: sparse-MLP quality and speed.

``kernels_app`` holds both commands (``sparsify-eval``, ``bench-kernels``); the main CLI
mounts the functions under its own names.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import typer
from rich.console import Console
from rich.table import Table

from sparsescope.store.catalog import check_writable
from sparsescope.store.errors import BadInput
from sparsescope.store.schema import DATA_TABLES

kernels_app = typer.Typer(help="Sparse MLP kernels: quality and speed.", no_args_is_help=True)
BENCH_COLUMNS = ("device", "kernel", "method", "sparsity", "batch", "d_model", "d_mlp", "dtype",
                 "ms_dense", "ms_sparse", "gbytes_per_s")  # fmt: skip


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BadInput(f"{option} {text!r}: give comma-separated numbers, e.g. 0.5,0.7") from None


@kernels_app.command("sparsify-eval")
def sparsify_eval(
    model: str = typer.Option(..., "--model", help="minilm, zoo:<name>, a folder or org/name."),
    methods: str = typer.Option(
        "threshold,wina,cett,chess,stat-topk", "--methods", help="Comma-separated methods."
    ),
    targets: str = typer.Option("0.5,0.7", "--targets", help="Comma-separated sparsities."),
    store: Path = typer.Option(..., "--store", help="Store folder."),
    tokens: int = typer.Option(4096, "--tokens", min=2, help="Held-out tokens."),
    calib_tokens: int = typer.Option(4096, "--calib-tokens", min=2, help="Calibration tokens."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu or cuda."),
):
    """Perplexity (or embedding) change, achieved sparsity and the model-level speed ceiling
    1/ρ of batch-1 decoding, per method x target."""
    from sparsescope.analysis.sparsify_eval import EvalConfig, run_sparsify_eval

    plan = [m.strip() for m in methods.split(",") if m.strip()]
    from sparsescope.probes.models import resolve_device

    cfg = EvalConfig(tokens=tokens, calib_tokens=calib_tokens, device=resolve_device(device))
    start = time.perf_counter()

    def report(r: dict) -> None:
        typer.echo(f"{r['method']} {r['target']:.2f}: achieved {r['achieved_sparsity']:.3f}, "
                   f"1/ρ {r['model_ceiling']:.2f}×, {r['metric']} {r['relative_increase']:+.2%}"
                   f" ({time.perf_counter() - start:.0f} s)", err=True)  # fmt: skip

    run_id, rows = run_sparsify_eval(
        model, plan, _floats(targets, "--targets"), store, cfg, on_row=report
    )
    table = Table(title=f"sparsify-eval {model}")
    cols = ("method", "target", "achieved", "1/ρ", "metric", "dense", "sparse", "increase")
    for col in cols:
        table.add_column(col, justify="left" if col in ("method", "metric") else "right")
    for r in rows:
        table.add_row(r["method"], f"{r['target']:.2f}", f"{r['achieved_sparsity']:.3f}",
                      f"{r['model_ceiling']:.2f}×", r["metric"], f"{r['dense_value']:.4g}",
                      f"{r['sparse_value']:.4g}", f"{r['relative_increase']:+.2%}")  # fmt: skip
    Console().print(table)
    print(run_id)


def _bench_table(rows: list[dict]) -> pa.Table:
    """Rows as the ``kernel_bench`` table (extra keys such as speedup dropped)."""
    return pa.Table.from_pylist(
        [{c: r[c] for c in BENCH_COLUMNS} for r in rows], schema=DATA_TABLES["kernel_bench"]
    )


def load_rows(path: Path) -> pa.Table:
    """Benchmark rows from a JSON list (as ``benchmarks/bench_kernels.py`` writes), checked
    against the ``kernel_bench`` schema before anything is written."""
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        rows = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInput(f"{path}: not valid JSON ({getattr(err, 'msg', err)})") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise BadInput(f"{path}: expected a non-empty JSON list of row objects")
    missing = sorted({c for r in rows for c in BENCH_COLUMNS if c not in r})
    if missing:
        raise BadInput(f"{path}: rows lack {', '.join(missing)}")
    try:
        table = _bench_table(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as err:
        raise BadInput(f"{path}: a value has the wrong type ({err})") from None
    times = pc.min(pc.min_element_wise(table["ms_dense"], table["ms_sparse"]))
    if times.as_py() is None or times.as_py() <= 0:
        raise BadInput(f"{path}: ms_dense and ms_sparse must be positive")
    return table


def _check_device(device: str) -> None:
    import torch

    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise BadInput(f"--device {device!r}: use cpu, or cuda on a machine with a CUDA GPU")


def _report_row(row: dict) -> None:
    """A console line per timed configuration (the full grid takes minutes)."""
    typer.echo(
        f"{row['kernel']:7s} {row['d_model']}x{row['d_mlp']} {row['dtype']:8s} "
        f"{row['method']:6s} B={row['batch']:<2d} s={row['sparsity']:.2f} "
        f"speedup {row['speedup']:.2f} (ceiling {row['ceiling']:.2f})",
        err=True,
    )


@kernels_app.command("bench-kernels")
def bench_kernels(
    store: Path = typer.Option(..., "--store", help="Store folder."),
    device: str = typer.Option("cpu", "--device", help="cuda or cpu."),
    quick: bool = typer.Option(False, "--quick", help="Small shapes, few points."),
    from_json: Path = typer.Option(None, "--from-json", help="Import rows instead of timing."),
):
    """Time dense vs sparse MLP projections (or import rows); write them to ``kernel_bench``."""
    from sparsescope.store.writer import RunWriter

    if from_json is not None:
        rows = load_rows(from_json)
    else:
        from sparsescope.kernels.bench import run_bench

        _check_device(device)
        check_writable(store)  # a bad store fails before the timing
        rows = _bench_table(run_bench(device, quick=quick, progress=_report_row))
    config = {"device": device, "quick": quick, "from_json": str(from_json or "")}
    with RunWriter(store, "bench", None, None, config) as writer:
        writer.write("kernel_bench", rows)
        run_id = writer.commit()
    typer.echo(f"{rows.num_rows} kernel_bench rows")
    print(run_id)
