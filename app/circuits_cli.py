"""``sparsescope circuits``: activation patching, AtP and RelP on a task; scores to the store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sparsescope.app.output import echo_error

IOI_MODEL = "zoo:gelu-l3-d128"  # the zoo's ioi preset


def _load(model: str):
    """Load the model; the default IOI zoo model is trained first if it is missing."""
    from sparsescope.analysis import tasks  # noqa: F401 (registers the zoo's ioi data mixer)
    from sparsescope.probes import zoo
    from sparsescope.probes.models import load_model

    if model == IOI_MODEL:
        try:
            zoo.resolve(model)
        except zoo.ZooError:
            typer.echo("training the zoo's ioi model (about 12 minutes on two CPU cores)")
            zoo.train_zoo("ioi")
    return load_model(model)


def circuits(
    store: Annotated[Path, typer.Option(help="Store folder (a 'circuits' run is added).")],
    model: Annotated[str, typer.Option(help="Model spec; the default is the zoo's ioi model.")] = (
        IOI_MODEL
    ),
    task: Annotated[
        str,
        typer.Option(
            help="Task: ioi, or a .jsonl file of prompt pairs, one JSON object per line with"
            " 'clean', 'corrupted', 'answer' and 'wrong' (answers one token each; every prompt"
            " one token length)."
        ),
    ] = "ioi",
    n: Annotated[
        int | None,
        typer.Option(
            min=2,
            max=1024,
            help="Prompt pairs: IOI's (default 32), a file's first N (default all).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the IOI prompts.")] = 0,
    ah_rule: Annotated[bool, typer.Option(help="RelP: detach attention patterns too.")] = False,
) -> None:
    """Score every component with activation patching, AtP and RelP; report r and circuits."""
    from sparsescope.analysis.circuits import circuits as score_circuits
    from sparsescope.analysis.tasks import TASKS, TaskError, make_task
    from sparsescope.probes.models import ModelError
    from sparsescope.probes.zoo import ZooError
    from sparsescope.store.catalog import check_writable
    from sparsescope.store.errors import StoreError

    try:
        check_writable(store)
        loaded = _load(model)
        data = make_task(task, loaded.tokenizer, n=n, split="test", seed=seed)
        config = {"seed": seed, "split": "test"} if task in TASKS else {}
        report = score_circuits(loaded, data, store, ah_rule, config)
        run_id = report.run_id
    except (ModelError, ZooError, TaskError, StoreError) as err:
        echo_error(err)
        raise typer.Exit(2) from None
    typer.echo(f"LD clean {report.ld[0]:.3f}, corrupted {report.ld[1]:.3f}")
    typer.echo("Pearson r against activation patching:")
    for site, rs in report.agreement.items():
        typer.echo(f"  {site:10} " + "  ".join(f"{m} {r:+.3f}" for m, r in rs.items()))
    typer.echo("faithfulness of the top-k attn/mlp-output circuit:")
    for method, rows in report.faithfulness.items():
        typer.echo(f"  {method:12} " + "  ".join(f"k={k:g}: {f:.2f}" for k, f in rows))
    secs = report.seconds
    typer.echo("wall time: " + ", ".join(f"{m} {s:.2f} s" for m, s in secs.items()))
    typer.echo(f"activation / RelP time ratio: {secs['activation'] / secs['relp']:.1f}")
    typer.echo(run_id)
