"""Two runs side by side, and one neuron across a model's checkpoints (issue: comparisons).

Both read the per-run tables only (``layer_summary``, ``neuron_stats``), so a comparison
costs a few queries whatever the run lengths.
"""

from __future__ import annotations

import pandas as pd

from sparsescope.analysis.dead_neurons import CATEGORIES, checkpoint_runs, layer_summary
from sparsescope.store.reader import Reader


def compare_layers(reader: Reader, run_a: str, run_b: str) -> pd.DataFrame:
    """Per run and layer: activation ratio and neuron counts per category (METHODS.md §1,
    §3), long format with a ``run`` column of "A" or "B"."""
    frames = []
    for label, run_id in (("A", run_a), ("B", run_b)):
        summary = layer_summary(reader, run_id)
        summary["activation_ratio"] = 1.0 - summary["dnr"]
        frames.append(summary.assign(run=label, run_id=run_id))
    columns = ["run", "run_id", "layer", "n_tokens", "d_mlp", "activation_ratio", *CATEGORIES]
    return pd.concat(frames, ignore_index=True)[columns]


def neuron_over_checkpoints(reader: Reader, run_id: str, layer: int, neuron: int) -> pd.DataFrame:
    """One neuron's firing frequency at every checkpoint of the run's model (checkpoint
    order, see ``checkpoint_runs``): step, tokens_seen, run_id, n_active, n_tokens, freq and
    ``last_fired`` (True on the last checkpoint where it still fired, if it is dead at the
    final one)."""
    runs = checkpoint_runs(reader, run_id)
    stats = reader.sql(
        "SELECT run_id, sum(n_active) AS n_active, sum(n_tokens) AS n_tokens FROM neuron_stats"
        " WHERE layer = ? AND neuron = ? AND run_id IN (SELECT unnest(?)) GROUP BY run_id",
        [layer, neuron, runs["run_id"].tolist()],
    )
    out = runs[["run_id", "model_id", "step", "tokens_seen"]].merge(stats, on="run_id")
    out["freq"] = out["n_active"] / out["n_tokens"]
    fired = out.index[out["n_active"] > 0]
    out["last_fired"] = False
    if len(fired) and out["n_active"].iloc[-1] == 0:
        out.loc[fired[-1], "last_fired"] = True
    return out.reset_index(drop=True)
