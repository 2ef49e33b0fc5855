"""Owner of METHODS.md §1 (activation ratio, sparsity) and §3's firing frequency."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sparsescope.analysis.runs import d_mlp
from sparsescope.store.reader import Reader

LOG10_EPS = 1e-10


def activation_ratio(reader: Reader, run_id: str) -> pd.DataFrame:
    """Per layer: mean over tokens of (#firing neurons / d_mlp), and sparsity = 1 − ratio.

    Read from the run's ``layer_summary`` (written at commit); a run that predates it is
    summed from its token rows."""
    width = d_mlp(reader, run_id)
    df = reader.sql(
        "SELECT layer, sum(n_active) / sum(n_tokens) / ? AS activation_ratio,"
        " sum(n_tokens) AS n_tokens FROM layer_summary WHERE run_id = ?"
        " GROUP BY layer ORDER BY layer",
        [width, run_id],
    )
    if df.empty:
        df = reader.sql(
            "SELECT layer, avg(n_active) / ? AS activation_ratio, count(*) AS n_tokens"
            " FROM layer_token_stats WHERE run_id = ? GROUP BY layer ORDER BY layer",
            [width, run_id],
        )
    df["sparsity"] = 1.0 - df["activation_ratio"]
    return df


def mean_activation_ratio(per_layer: pd.DataFrame) -> float:
    """Average over layers, each layer weighted equally."""
    return float(per_layer["activation_ratio"].mean())


def firing_frequency(reader: Reader, run_id: str) -> pd.DataFrame:
    """Per neuron: f = n_active / n_tokens (summed over shards) and log10(f + 1e-10)."""
    df = reader.sql(
        "SELECT layer, neuron, sum(n_tokens) AS n_tokens, sum(n_active) AS n_active"
        " FROM neuron_stats WHERE run_id = ? GROUP BY layer, neuron ORDER BY layer, neuron",
        [run_id],
    )
    df["freq"] = df["n_active"] / df["n_tokens"]
    df["log10_freq"] = np.log10(df["freq"] + LOG10_EPS)
    return df


def sequence_activity(reader: Reader, run_id: str, seq_id: int, layer: int) -> pd.DataFrame:
    """Tokens of one sequence with their n_active (and ratio) at one layer."""
    width = d_mlp(reader, run_id)
    df = reader.sql(
        "SELECT t.pos, t.token, s.n_active, s.l1, s.max_abs FROM tokens t"
        " JOIN layer_token_stats s USING (run_id, seq_id, pos)"
        " WHERE t.run_id = ? AND t.seq_id = ? AND s.layer = ? ORDER BY t.pos",
        [run_id, seq_id, layer],
    )
    df["activation_ratio"] = df["n_active"] / width
    return df
