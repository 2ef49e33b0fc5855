"""Find neurons and SAE features: by the token they fire on, by frequency range, by category.

Token text is matched as text, never as a pattern: ``exact`` compares the token string
(leading spaces count: " block" is not "block"); otherwise a case-insensitive substring.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sparsescope.analysis.dead_neurons import CATEGORIES, neuron_categories
from sparsescope.store.reader import Reader

LIMIT = 200


def _match(exact: bool) -> str:
    return "t.token = ?" if exact else "contains(lower(t.token), lower(?))"


def neurons_by_token(
    reader: Reader, run_id: str, text: str, exact: bool = False, limit: int = LIMIT
) -> pd.DataFrame:
    """Neurons whose top contexts peak on a matching token: per neuron, ``hits`` (of its
    top-k entries, on matching tokens), the matching tokens, and its largest value there;
    most hits first."""
    return reader.sql(
        "SELECT n.layer, n.neuron, count(*) AS hits, max(n.value) AS top_value,"
        " string_agg(DISTINCT t.token, ' | ') AS tokens FROM neuron_top n"
        " JOIN tokens t USING (run_id, seq_id, pos)"
        f" WHERE n.run_id = ? AND {_match(exact)}"
        " GROUP BY n.layer, n.neuron ORDER BY hits DESC, top_value DESC, n.layer, n.neuron"
        " LIMIT ?",
        [run_id, text, limit],
    )


def features_by_token(
    reader: Reader, run_id: str, sae_id: str, text: str, exact: bool = False,
    limit: int = LIMIT,
) -> pd.DataFrame:  # fmt: skip
    """SAE features active on matching tokens: per feature, ``hits`` (matching tokens it is
    active on), ``share`` (hits over the matching tokens) and its largest value there."""
    return reader.sql(
        "WITH m AS (SELECT seq_id, pos, token FROM tokens t WHERE run_id = ? AND"
        f" {_match(exact)}) SELECT a.feature, count(*) AS hits,"
        " count(*) / (SELECT count(*) FROM m) AS share, max(a.value) AS top_value,"
        " string_agg(DISTINCT m.token, ' | ') AS tokens FROM sae_feature_acts a"
        " JOIN m USING (seq_id, pos) WHERE a.run_id = ? AND a.sae_id = ?"
        " GROUP BY a.feature ORDER BY hits DESC, top_value DESC, a.feature LIMIT ?",
        [run_id, text, run_id, sae_id, limit],
    )


def neurons_by_frequency(
    reader: Reader,
    run_id: str,
    lo: float = 0.0,
    hi: float = 1.0,
    categories: tuple[str, ...] = CATEGORIES,
    layers: list[int] | None = None,
) -> pd.DataFrame:
    """Neurons with firing frequency f in [lo, hi] and a category among ``categories``
    (METHODS.md §3), rarest first."""
    df = neuron_categories(reader, run_id)
    keep = df["freq"].between(lo, hi) & df["category"].isin(categories)
    if layers is not None:
        keep &= df["layer"].isin(layers)
    out = df[keep].sort_values(["freq", "layer", "neuron"])
    return out[["layer", "neuron", "n_active", "n_tokens", "freq", "category"]].reset_index(
        drop=True
    )


def log10_bounds(lo_exp: float, hi_exp: float) -> tuple[float, float]:
    """Frequency bounds from a log10 slider; the lowest end includes f = 0 (dead)."""
    return (0.0 if lo_exp <= -10 else float(10.0**lo_exp)), float(np.minimum(10.0**hi_exp, 1.0))
