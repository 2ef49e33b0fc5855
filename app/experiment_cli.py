"""``sparsescope experiment``: reproductions of published experiments into a store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sparsescope.app.output import echo_error
from sparsescope.store.catalog import check_writable
from sparsescope.store.errors import StoreError

experiment_app = typer.Typer(no_args_is_help=True)


@experiment_app.callback()
def experiment() -> None:
    """Reproduce published experiments into a store."""


def _table(rows: list[dict]) -> Table:
    cols = (
        "redundancy_train",
        "redundancy_test",
        "knn_acc",
        "kmeans_acc",
        "logreg_acc",
        "model_acc",
    )
    table = Table("depth", "width", "epochs", *cols, title="hash-encoder grid (digits)")
    for r in rows:
        table.add_row(
            str(r["depth"]), str(r["width"]), str(r["epochs"]), *(f"{r[c]:.3f}" for c in cols)
        )
    return table


@experiment_app.command("hash-encoder")
def hash_encoder(
    store: Annotated[Path, typer.Option("--store", help="Store folder (created if missing).")],
    seed: Annotated[
        int, typer.Option(min=0, help="Seed of the split, the init and the batches.")
    ] = 0,
    quick: Annotated[
        bool, typer.Option("--quick", help="A small grid (seconds), for tests.")
    ] = False,
) -> None:
    """ReLU MLPs on digits as hash encoders: redundancy and code accuracy over width,
    depth and training length; one 'experiment' run of hash_encoder_grid rows."""
    from sparsescope.analysis.hash_encoder import FULL, QUICK, run_experiment

    try:
        check_writable(store)
    except StoreError as err:
        echo_error(err)
        raise typer.Exit(2) from None
    grid = QUICK if quick else FULL
    rows: list[dict] = []
    columns = (
        TextColumn("[bold]hash-encoder"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("grid", total=grid.size)

        def on_point(row: dict) -> None:
            rows.append(row)
            progress.update(task, advance=1, description=f"w={row['width']} d={row['depth']}")

        try:
            run_id = run_experiment(store, grid, seed, on_point)
        except StoreError as err:
            echo_error(err)
            raise typer.Exit(2) from None
    Console().print(_table(rows))
    print(run_id)
