"""``sparsescope sparsify-eval`` and ``sparsescope bench kernels``: sparse-MLP quality and speed.

``kernels_app`` holds both commands (``sparsify-eval``, ``bench-kernels``); the main CLI
mounts the functions under its own names.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from sparsescope.store.errors import StoreError

kernels_app = typer.Typer(help="Sparse MLP kernels: quality and speed.", no_args_is_help=True)
BENCH_COLUMNS = ("device", "kernel", "method", "sparsity", "batch", "d_model", "d_mlp", "dtype",
                 "ms_dense", "ms_sparse", "gbytes_per_s")  # fmt: skip


def _one_line_errors(fn):
    """Bad input (ValueError, StoreError, unreadable files) -> ``error: ...`` and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, StoreError, OSError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{option} {text!r}: give comma-separated numbers, e.g. 0.5,0.7") from None


@kernels_app.command("sparsify-eval")
@_one_line_errors
def sparsify_eval(
    model: str = typer.Option(..., "--model", help="minilm, zoo:<name>, a folder or org/name."),
    methods: str = typer.Option(
        "threshold,wina,cett,chess,stat-topk", "--methods", help="Comma-separated methods."
    ),
    targets: str = typer.Option("0.5,0.7", "--targets", help="Comma-separated sparsities."),
    store: Path = typer.Option(..., "--store", help="Store folder."),
    tokens: int = typer.Option(4096, "--tokens", min=2, help="Held-out tokens."),
    calib_tokens: int = typer.Option(4096, "--calib-tokens", min=2, help="Calibration tokens."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
):
    """Perplexity (or embedding) change, achieved sparsity and the model-level speed ceiling
    1/ρ of batch-1 decoding, per method x target."""
    from sparsescope.analysis.sparsify_eval import EvalConfig, run_sparsify_eval

    plan = [m.strip() for m in methods.split(",") if m.strip()]
    cfg = EvalConfig(tokens=tokens, calib_tokens=calib_tokens, device=device)
    run_id, rows = run_sparsify_eval(model, plan, _floats(targets, "--targets"), store, cfg)
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


def load_rows(path: Path) -> list[dict]:
    """Benchmark rows from a JSON list (as ``benchmarks/bench_kernels.py`` writes)."""
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg})") from None
    missing = sorted({c for r in rows for c in BENCH_COLUMNS if c not in r}) if rows else []
    if not isinstance(rows, list) or not rows or missing:
        raise ValueError(f"{path}: expected a non-empty list of rows with {', '.join(missing)}")
    return rows


@kernels_app.command("bench-kernels")
@_one_line_errors
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

        rows = run_bench(device, quick=quick)
    config = {"device": device, "quick": quick, "from_json": str(from_json or "")}
    with RunWriter(store, "bench", None, None, config) as writer:
        writer.write("kernel_bench", {c: [r[c] for r in rows] for c in BENCH_COLUMNS})
        run_id = writer.commit()
    typer.echo(f"{len(rows)} kernel_bench rows")
    print(run_id)
