"""``sparsescope sae``: train TopK SAEs and g-SAEs, list the store's SAEs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from sparsescope.app.output import echo_error

sae_app = typer.Typer(help="Sparse autoencoders: train and list.", no_args_is_help=True)


def _fail(err: Exception, code: int = 2) -> typer.Exit:
    echo_error(err)
    return typer.Exit(code)


@sae_app.command()
def train(
    model: Annotated[str, typer.Option(help="minilm, zoo:<name>\\[@step], a folder or org/name.")],
    hook: Annotated[str, typer.Option(help="Hook name, e.g. blocks.1.hook_resid_post.")],
    store: Annotated[Path, typer.Option(help="Store folder (the SAE is registered there).")],
    data: Annotated[str, typer.Option(help="stdlib-docs[:heldout], a .txt or .jsonl.")] = (
        "stdlib-docs"
    ),
    arch: Annotated[str, typer.Option(help="topk, or gsae (gradient-aware; causal LMs).")] = "topk",
    k: Annotated[int, typer.Option(min=1, help="Active latents per token.")] = 32,
    expansion: Annotated[int, typer.Option(min=1, max=256, help="d_sae / d_in.")] = 8,
    tokens: Annotated[int, typer.Option(min=1, help="Training tokens.")] = 200_000,
    beta: Annotated[float, typer.Option(help="g-SAE gradient weight β.")] = 1.0,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    out: Annotated[
        Path | None, typer.Option(help="SAE folder (default: <store>/saes/<sae_id>).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto (cuda when present), cpu or cuda.")] = "auto",
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train a SAE on streamed activations (a rerun with the same options resumes)."""
    from sparsescope.analysis.sae_train import TrainConfig, TrainError, train_sae
    from sparsescope.probes.data import DataError
    from sparsescope.probes.models import ModelError, resolve_device
    from sparsescope.probes.sae import SaeError
    from sparsescope.store.errors import StoreError

    if not (math.isfinite(lr) and lr > 0) or not math.isfinite(beta):
        raise _fail(ValueError(f"--lr {lr} must be a positive number and --beta {beta} finite"))
    if out is not None and out.exists() and not out.is_dir():
        raise _fail(ValueError(f"--out {out} is a file, not a folder"))
    cfg = TrainConfig(
        model, hook, data, arch, k=k, expansion=expansion, tokens=tokens, beta=beta, lr=lr
    )
    try:
        row = train_sae(cfg, store, out, resolve_device(device), quiet)
    except (TrainError, DataError, ModelError, SaeError, StoreError) as err:
        raise _fail(err) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: checkpoint saved; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    typer.echo(json.dumps(row["metrics"], indent=1))
    typer.echo(row["sae_id"])


@sae_app.command("list")
def list_(store: Annotated[Path, typer.Option(help="Store folder.")]) -> None:
    """The store's SAEs with their metrics."""
    from sparsescope.analysis.sae_metrics import sae_table
    from sparsescope.app.output import emit
    from sparsescope.store.errors import StoreError
    from sparsescope.store.reader import Reader

    try:
        emit(sae_table(Reader(store)).drop(columns="path"), title=f"SAEs in {store}")
    except StoreError as err:
        raise _fail(err) from None
