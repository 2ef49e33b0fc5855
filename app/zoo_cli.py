"""``sparsescope zoo``: train and list the built-in zoo of small causal LMs."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sparsescope.app.output import echo_error, wide_console

zoo_app = typer.Typer(
    help="Train and list the built-in zoo of small causal LMs.", no_args_is_help=True
)

Preset = Annotated[str, typer.Option(help="Zoo preset: tiny, small, micro or ioi.")]
Out = Annotated[Path | None, typer.Option(help="Zoo folder (default: $SPARSESCOPE_ZOO/<preset>).")]


class Format(str, Enum):
    table = "table"
    json = "json"


def _fail(error: Exception) -> typer.Exit:
    echo_error(error)
    return typer.Exit(2)


def _table(rows: list[dict]) -> Table:
    """One line per model: shape, size and its final checkpoint, with the metrics a data
    mixer added to it (such as held-out IOI accuracy)."""
    from sparsescope.probes.zoo import mixer_metrics

    final = {row["name"]: row for row in rows}
    extras = sorted({k for row in final.values() for k in mixer_metrics(row)})
    table = Table("model", "act_fn", "layers", "d_model", "d_mlp", "params", "checkpoints")
    for col in ("final step", "tokens seen", "train loss", "val loss", *extras):
        table.add_column(col, justify="right")
    for name, row in final.items():
        n = sum(r["name"] == name for r in rows)
        table.add_row(
            name,
            row["act_fn"],
            str(row["n_layers"]),
            str(row["d_model"]),
            str(row["d_mlp"]),
            f"{row['n_params']:,}",
            str(n),
            str(row["step"]),
            f"{row['tokens_seen']:,}",
            f"{row['train_loss']:.3f}",
            f"{row['val_loss']:.3f}",
            *(f"{row[k]:.3f}" if k in row else "" for k in extras),
        )
    return table


@zoo_app.command()
def train(
    preset: Preset = "tiny",
    out: Out = None,
    only: Annotated[str | None, typer.Option(help="Train only this model.")] = None,
) -> None:
    """Train the preset's models that are missing (finished models are reused)."""
    from sparsescope.analysis import tasks  # noqa: F401 (registers the ioi preset's data mixer)
    from sparsescope.probes.zoo import ZooError, train_zoo

    try:
        rows = train_zoo(preset, out, only)
    except ZooError as e:
        raise _fail(e) from None
    wide_console().print(_table(rows))


@zoo_app.command("list")
def list_(
    preset: Preset = "tiny",
    out: Out = None,
    format: Annotated[Format, typer.Option(help="table, or json (the manifest rows).")] = (
        Format.table
    ),
) -> None:
    """List the trained models (table) or every checkpoint (json)."""
    from sparsescope.probes.zoo import ZooError, list_zoo

    try:
        rows = list_zoo(out, preset)
    except ZooError as e:
        raise _fail(e) from None
    if format is Format.json:
        typer.echo(json.dumps(rows, indent=1))
    else:
        wide_console().print(_table(rows))
