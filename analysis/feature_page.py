"""One SAE feature's page, computed at page time from a run's stored rows.

``sae_feature_acts`` holds every nonzero activation, so everything here follows from it and
the run's ``tokens``: activations across context windows (zero where no row), the density
over all probed tokens, examples from quantile intervals of the nonzero values, and the
tokens whose presence most raises the feature's firing. Every query filters on run_id,
sae_id and feature (the acts are sorted by sae_id, feature, so Parquet statistics skip the
other features' row groups). Probed tokens are those at positions ``FIRST`` and later, as
the feature probe records them.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pandas as pd

from sparsescope.analysis.sae_metrics import FIRST
from sparsescope.store.reader import Reader

WINDOW = 8  # tokens shown either side of an activating token
DENSITY_BINS = 40  # equal-width bins over (0, max] of the feature's nonzero values
INTERVALS = 5  # quantile intervals of the nonzero values
PER_INTERVAL = 3  # examples shown per interval
MIN_COUNT = 5  # a token needs this many probed occurrences to get a lift
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def feature_summary(reader: Reader, run_id: str, sae_id: str, feature: int) -> dict:
    """The feature's ``sae_feature_stats`` in the run (mergeable rows summed): n_tokens
    (probed), n_active, max; 0 where the run has none."""
    df = reader.sql(
        "SELECT sum(n_tokens) AS n_tokens, sum(n_active) AS n_active, max(max) AS max"
        " FROM sae_feature_stats WHERE run_id = ? AND sae_id = ? AND feature = ?",
        [run_id, sae_id, int(feature)],
    )
    row = df.iloc[0]
    return {k: (0 if pd.isna(v) else v) for k, v in row.items()}


def context_windows(
    reader: Reader,
    run_id: str,
    sae_id: str,
    feature: int,
    hits: pd.DataFrame,
    window: int = WINDOW,
) -> pd.DataFrame:
    """The tokens within ±``window`` of each hit (rows of ``hits``: seq_id, pos) with the
    feature's activation on each (0 where it did not fire or was not probed).

    Rows: hit (row number in ``hits``), offset, pos, token_id, token, value; by hit, pos.
    """
    return reader.sql(
        "WITH h AS (SELECT unnest(?::BIGINT[]) AS seq_id, unnest(?::BIGINT[]) AS pos,"
        " unnest(range(?)) AS hit),"
        " a AS (SELECT seq_id, pos, value FROM sae_feature_acts"
        " WHERE run_id = ? AND sae_id = ? AND feature = ?)"
        " SELECT h.hit, k.pos - h.pos AS offset, k.pos, k.token_id, k.token,"
        " coalesce(a.value, 0) AS value"
        " FROM h JOIN tokens k ON k.run_id = ? AND k.seq_id = h.seq_id"
        " AND k.pos BETWEEN h.pos - ? AND h.pos + ?"
        " LEFT JOIN a ON a.seq_id = k.seq_id AND a.pos = k.pos ORDER BY h.hit, k.pos",
        [
            hits["seq_id"].astype(int).tolist(),
            hits["pos"].astype(int).tolist(),
            len(hits),
            run_id,
            sae_id,
            int(feature),
            run_id,
            window,
            window,
        ],
    )


def density(values: pd.Series, n_tokens: int, bins: int = DENSITY_BINS) -> pd.DataFrame:
    """Counts of the feature's activation over all ``n_tokens`` probed tokens: first the
    tokens where it is 0, then ``bins`` equal-width bins from 0 to the largest value
    (``numpy.histogram``: [lo, hi), the last bin closed). Rows: lo, hi, count."""
    v = np.asarray(values, dtype=np.float64)
    zero = pd.DataFrame({"lo": [0.0], "hi": [0.0], "count": [int(n_tokens) - len(v)]})
    if not len(v):
        return zero
    counts, edges = np.histogram(v, np.linspace(0.0, v.max(), bins + 1))
    rest = pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "count": counts})
    return pd.concat([zero, rest], ignore_index=True)


def quantile_examples(
    values: pd.DataFrame, intervals: int = INTERVALS, per: int = PER_INTERVAL
) -> pd.DataFrame:
    """A few examples from each quantile interval of the nonzero values (seq_id, pos, value).

    Edges are the values' quantiles at 0, 1/intervals, ..., 1 (``numpy.quantile``, linear);
    interval i holds the values in (edge_i, edge_i+1], the first also its lower edge (as
    ``pandas.qcut``). Within an interval, sorted by (value, seq_id, pos), the m values
    give ``min(per, m)`` examples at the evenly spread ranks ⌊(j + ½)·m / min(per, m)⌋.
    Rows: interval, lo, hi, n (values in it), seq_id, pos, value; top interval first.
    """
    order = np.lexsort((values["pos"], values["seq_id"], values["value"]))
    v = values.iloc[order].reset_index(drop=True)
    x = v["value"].to_numpy(np.float64)
    columns = ["interval", "lo", "hi", "n", "seq_id", "pos", "value"]
    if not len(x):
        return pd.DataFrame(columns=columns)
    edges = np.quantile(x, np.linspace(0, 1, intervals + 1))
    which = np.searchsorted(edges[1:-1], x, side="left")
    parts = []
    for i in range(intervals - 1, -1, -1):
        members = v[which == i]
        m = len(members)
        if not m:
            continue
        shown = min(per, m)
        picks = members.iloc[((np.arange(shown) + 0.5) * m / shown).astype(int)]
        parts.append(picks.assign(interval=i, lo=edges[i], hi=edges[i + 1], n=m))
    return pd.concat(parts, ignore_index=True)[columns]


def token_lift(
    reader: Reader,
    run_id: str,
    sae_id: str,
    feature: int,
    min_count: int = MIN_COUNT,
    n: int = 20,
) -> pd.DataFrame:
    """Tokens (by id) on which the feature fires more often than on average over the run's
    probed tokens: lift = P(active | token) / P(active), for tokens seen at least
    ``min_count`` times and active at least once; the n highest.

    Rows: token_id, token, count, n_active, p_active (P(active | token)), lift.
    """
    return reader.sql(
        "WITH a AS (SELECT seq_id, pos FROM sae_feature_acts"
        " WHERE run_id = ? AND sae_id = ? AND feature = ?),"
        " per AS (SELECT k.token_id, min(k.token) AS token, count(*) AS count,"
        " count(a.pos) AS n_active FROM tokens k LEFT JOIN a USING (seq_id, pos)"
        " WHERE k.run_id = ? AND k.pos >= ? GROUP BY k.token_id),"
        " base AS (SELECT sum(n_active) / sum(count) AS p FROM per)"
        " SELECT token_id, token, count, n_active, n_active / count AS p_active,"
        " n_active / count / base.p AS lift FROM per, base"
        " WHERE count >= ? AND n_active > 0"
        " ORDER BY lift DESC, n_active DESC, token_id LIMIT ?",
        [run_id, sae_id, int(feature), run_id, FIRST, int(min_count), int(n)],
    )


@functools.cache
def _byte_level() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: character -> the byte it stands for (printable
    Latin-1 bytes stand for themselves, the others for chr(256 + n) in byte order)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in keep]
    return {chr(b): b for b in keep} | {chr(256 + i): b for i, b in enumerate(moved)}


def token_bytes(tokenizer, token_id: int) -> bytes | None:
    """A token's bytes where its vocabulary entry spells them: a byte-fallback piece
    ``<0xNN>`` (SentencePiece) or a byte-level BPE piece (GPT-2 style); else None."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(piece, str) or not piece:
        return None
    if match := _BYTE_PIECE.fullmatch(piece):
        return bytes([int(match[1], 16)])
    alphabet = _byte_level()
    if all(ch in alphabet for ch in piece):
        return bytes(alphabet[ch] for ch in piece)
    return None
