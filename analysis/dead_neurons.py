"""Owner of METHODS.md §3: dead, nearly dead and dense neurons, DNR, death over training.

Also the per-neuron look-ups of the neuron browser (summary, top contexts, output
direction). Frequencies come from ``sparsity.firing_frequency`` (owner of f) and DNR
from ``sparsity.activation_ratio`` (DNR = sparsity under the firing indicator).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from sparsescope.analysis.contexts import group_contexts
from sparsescope.analysis.sparsity import activation_ratio, firing_frequency
from sparsescope.store.reader import Reader

NEARLY_DEAD = 1e-5
DENSE = 0.1
CATEGORIES = ("dead", "nearly dead", "normal", "dense")
CONTEXT = 8


def categorize(freq, nearly_dead: float = NEARLY_DEAD, dense: float = DENSE) -> np.ndarray:
    """dead (f = 0), nearly dead (0 < f < nearly_dead), dense (f > dense), else normal."""
    f = np.asarray(freq, dtype=float)
    return np.select(
        [f == 0, f < nearly_dead, f > dense], list(CATEGORIES[:2]) + ["dense"], "normal"
    )


def dead_over(n_tokens: int) -> str:
    return f"dead over {int(n_tokens):,} tokens"


def neuron_categories(
    reader: Reader, run_id: str, nearly_dead: float = NEARLY_DEAD, dense: float = DENSE
) -> pd.DataFrame:
    """Per neuron: layer, neuron, n_tokens, n_active, freq, log10_freq and category."""
    df = firing_frequency(reader, run_id)
    df["category"] = categorize(df["freq"], nearly_dead, dense)
    return df


def layer_summary(
    reader: Reader, run_id: str, nearly_dead: float = NEARLY_DEAD, dense: float = DENSE
) -> pd.DataFrame:
    """Per layer: N tokens, a count per category (nearly dead excludes dead) and DNR."""
    neurons = neuron_categories(reader, run_id, nearly_dead, dense)
    counts = pd.crosstab(neurons["layer"], neurons["category"]).reindex(
        columns=list(CATEGORIES), fill_value=0
    )
    out = neurons.groupby("layer").agg(n_tokens=("n_tokens", "max"), d_mlp=("neuron", "size"))
    out = out.join(counts).reset_index().astype({"n_tokens": "int64"})
    dnr = activation_ratio(reader, run_id).set_index("layer")["sparsity"]
    out["dnr"] = out["layer"].map(dnr)
    return out


# --- checkpoints -------------------------------------------------------------------------


def checkpoint_runs(reader: Reader, run_id: str) -> pd.DataFrame:
    """Probe runs of the same series' checkpoints on the run's data set, in step order.

    Checkpoints of a series (the zoo's, ``series:GLOB``, Hub revisions) share a family and
    have a step in the models table; one run (the newest) per step. A run whose model has
    no step is its own single checkpoint.
    """
    runs = reader.sql(
        "SELECT r.run_id, r.model_id, r.dataset, r.n_tokens, r.finished_at, m.family, m.step,"
        " m.tokens_seen FROM runs r LEFT JOIN models m USING (model_id)"
        " WHERE r.status = 'complete' AND r.kind = 'probe'"
    )
    me = runs[runs["run_id"] == run_id]
    if me.empty:
        raise ValueError(f"run {run_id} is not a complete probe run of this store")
    row = me.iloc[0]
    if pd.isna(row["step"]):
        return me.drop(columns="family").reset_index(drop=True)
    same = runs[
        (runs["family"] == row["family"])
        & (runs["dataset"] == row["dataset"])
        & runs["step"].notna()
    ]
    newest = same.sort_values("finished_at").groupby("step").tail(1)
    return newest.drop(columns="family").sort_values("step").reset_index(drop=True)


def _firing_counts(reader: Reader, run_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """n_active [K, L, D] and n_tokens [K] of runs that share one model shape."""
    counts, tokens = [], []
    for run_id in run_ids:
        df = firing_frequency(reader, run_id)
        if df.empty:
            raise ValueError(f"run {run_id} has no neuron_stats")
        n_layers, d_mlp = int(df["layer"].max()) + 1, int(df["neuron"].max()) + 1
        if counts and counts[0].shape != (n_layers, d_mlp):
            raise ValueError(f"run {run_id} has another shape than run {run_ids[0]}")
        grid = np.zeros((n_layers, d_mlp), dtype=np.int64)
        grid[df["layer"], df["neuron"]] = df["n_active"]
        counts.append(grid)
        tokens.append(int(df["n_tokens"].max()))
    return np.stack(counts), np.array(tokens)


@dataclass
class DeathOverTraining:
    """Per neuron and per (checkpoint, layer) results of ``death_over_checkpoints``."""

    neurons: pd.DataFrame  # layer, neuron, death_checkpoint (-1: alive at the end), revivals
    checkpoints: pd.DataFrame  # checkpoint, run_id, n_tokens, layer, dead, died, revived


def death_over_checkpoints(reader: Reader, run_ids: list[str]) -> DeathOverTraining:
    """Death over training (METHODS §3) for runs given in checkpoint order.

    A neuron dies for good at the first checkpoint from which it is dead (f = 0) at every
    later checkpoint. A revival is a neuron dead at one checkpoint and firing at the next;
    ``revivals`` counts them per neuron and ``revived`` per checkpoint.
    """
    if not run_ids:
        raise ValueError("give at least one run id")
    n_active, n_tokens = _firing_counts(reader, run_ids)
    dead = n_active == 0  # [K, L, D]
    dead_from_here = np.logical_and.accumulate(dead[::-1], axis=0)[::-1]
    death = np.where(dead_from_here.any(0), dead_from_here.argmax(0), -1)
    revived = np.zeros_like(dead)
    revived[1:] = dead[:-1] & ~dead[1:]
    n_layers, d_mlp = dead.shape[1:]
    layer, neuron = np.meshgrid(np.arange(n_layers), np.arange(d_mlp), indexing="ij")
    neurons = pd.DataFrame(
        {
            "layer": layer.ravel(),
            "neuron": neuron.ravel(),
            "death_checkpoint": death.ravel(),
            "revivals": revived.sum(0).ravel(),
        }
    )
    ks = np.arange(len(run_ids))[:, None, None]
    died = (death[None] == ks).sum(2)
    checkpoints = pd.DataFrame(
        {
            "checkpoint": np.repeat(np.arange(len(run_ids)), n_layers),
            "run_id": np.repeat(run_ids, n_layers),
            "n_tokens": np.repeat(n_tokens, n_layers),
            "layer": np.tile(np.arange(n_layers), len(run_ids)),
            "dead": dead.sum(2).ravel(),
            "died": died.ravel(),
            "revived": revived.sum(2).ravel(),
        }
    )
    return DeathOverTraining(neurons, checkpoints)


def checkpoint_frequencies(reader: Reader, runs: pd.DataFrame) -> pd.DataFrame:
    """``firing_frequency`` of each run of ``checkpoint_runs``, with step and tokens_seen."""
    frames = [
        firing_frequency(reader, row.run_id).assign(
            checkpoint=k, run_id=row.run_id, step=row.step, tokens_seen=row.tokens_seen
        )
        for k, row in enumerate(runs.itertuples())
    ]
    return pd.concat(frames, ignore_index=True)


# --- one neuron --------------------------------------------------------------------------


def neuron_summary(reader: Reader, run_id: str, layer: int, neuron: int) -> dict:
    """n_tokens, n_active, freq, category, mean, std and max of one neuron's activation."""
    df = reader.sql(
        "SELECT sum(n_tokens) AS n_tokens, sum(n_active) AS n_active, sum(sum) AS s,"
        " sum(sum_sq) AS s2, max(max) AS max FROM neuron_stats"
        " WHERE run_id = ? AND layer = ? AND neuron = ?",
        [run_id, int(layer), int(neuron)],
    )
    row = df.iloc[0]
    if pd.isna(row["n_tokens"]):
        raise ValueError(f"run {run_id} has no neuron {neuron} in layer {layer}")
    n = float(row["n_tokens"])
    mean = row["s"] / n
    freq = row["n_active"] / n
    return {
        "n_tokens": int(n),
        "n_active": int(row["n_active"]),
        "freq": freq,
        "category": str(categorize([freq])[0]),
        "mean": mean,
        "std": float(np.sqrt(max(row["s2"] / n - mean * mean, 0.0))),
        "max": float(row["max"]),
    }


def top_contexts(
    reader: Reader, run_id: str, layer: int, neuron: int, window: int = CONTEXT
) -> pd.DataFrame:
    """The neuron's stored top activations: rank, value, seq_id, pos, token, before, after.

    ``before``/``after`` are the lists of up to ``window`` token strings either side.
    """
    df = reader.sql(
        "SELECT t.rank, t.value, t.seq_id, t.pos, k.pos AS ctx_pos, k.token"
        " FROM neuron_top t JOIN tokens k ON k.run_id = t.run_id AND k.seq_id = t.seq_id"
        " AND k.pos BETWEEN t.pos - ? AND t.pos + ?"
        " WHERE t.run_id = ? AND t.layer = ? AND t.neuron = ? ORDER BY t.rank, k.pos",
        [window, window, run_id, int(layer), int(neuron)],
    )
    return group_contexts(df)


def unembedding(hf_model: torch.nn.Module) -> tuple[torch.Tensor, str]:
    """[vocab, d_model] matrix that maps a residual direction to token logits, and its name.

    Causal LMs: the output embedding (lm_head). Other models (BERT, whose MLM head the
    bridge initialises at random): the word-embedding matrix, which the MLM decoder ties to.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if type(hf_model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return hf_model.get_output_embeddings().weight, "unembedding (lm_head)"
    return hf_model.get_input_embeddings().weight, "word embeddings (tied MLM decoder)"


@torch.no_grad()
def output_logits(bridge, layer: int, neuron: int, k: int = 10) -> tuple[pd.DataFrame, str]:
    """Tokens whose logit the neuron's output direction ``W_out[:, i]`` raises/lowers most.

    Direct path only (final LayerNorm ignored). Returns (rows with side, rank, token_id,
    token, logit) and the unembedding's name.
    """
    direction = bridge.blocks[layer].mlp.W_out[neuron]  # TransformerLens W_out: [d_mlp, d_model]
    matrix, name = unembedding(bridge.original_model)
    logits = matrix.float() @ direction.float()
    top, bottom = logits.topk(k), logits.topk(k, largest=False)
    rows = [
        {"side": side, "rank": r, "token_id": int(i), "token": bridge.tokenizer.decode([int(i)])}
        | {"logit": float(v)}
        for side, (vals, ids) in (("top", top), ("bottom", bottom))
        for r, (v, i) in enumerate(zip(vals, ids, strict=True))
    ]
    return pd.DataFrame(rows), name
