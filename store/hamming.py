"""Hamming search over stored hash codes, in SQL (METHODS.md §4, Hamming neighbours).

The packed codes (BLOB, MSB-first) cast to BIT in DuckDB's bit order, so
``bit_count(xor(code::BIT, q::BIT))`` is the Hamming distance. Whole-model
distances sum the per-layer counts, each cast to INTEGER first.
"""

from __future__ import annotations

import pandas as pd

from sparsescope.store.errors import StoreError
from sparsescope.store.reader import Reader

ANY_SEQ = 2**62  # a last seq_id that bounds nothing

_LAYER_QUERY = """
SELECT h.seq_id, h.pos, bit_count(xor(h.code::BIT, ?::BLOB::BIT))::INTEGER AS distance
FROM hash_codes h
WHERE h.run_id = ? AND h.layer = ? AND h.seq_id <= ?
ORDER BY distance, h.seq_id, h.pos
LIMIT ?
"""

_MODEL_QUERY = """
WITH q AS (SELECT layer, code FROM hash_codes WHERE run_id = ? AND seq_id = ? AND pos = ?)
SELECT h.seq_id, h.pos,
    sum(bit_count(xor(h.code::BIT, q.code::BIT))::INTEGER)::BIGINT AS distance
FROM hash_codes h JOIN q USING (layer)
WHERE h.run_id = ? AND h.seq_id <= ?
GROUP BY h.seq_id, h.pos
ORDER BY distance, h.seq_id, h.pos
LIMIT ?
"""


def code_of(reader: Reader, run_id: str, layer: int, seq_id: int, pos: int) -> bytes:
    """The packed code of one token occurrence at one layer."""
    df = reader.sql(
        "SELECT code FROM hash_codes WHERE run_id = ? AND layer = ? AND seq_id = ? AND pos = ?",
        [run_id, layer, seq_id, pos],
    )
    if df.empty:
        raise StoreError(f"no hash code for run {run_id}, layer {layer}, seq {seq_id}, pos {pos}")
    return bytes(df["code"].iloc[0])


def nearest_to_code(
    reader: Reader, run_id: str, layer: int, code: bytes, k: int = 10, last_seq: int = ANY_SEQ
) -> pd.DataFrame:
    """The k stored codes of a layer closest to ``code`` (among sequences up to
    ``last_seq``): seq_id, pos, distance. Ties are broken by (seq_id, pos).
    """
    return reader.sql(_LAYER_QUERY, [code, run_id, layer, last_seq, k])


def nearest_codes(
    reader: Reader,
    run_id: str,
    layer: int | None,
    seq_id: int,
    pos: int,
    k: int = 10,
    last_seq: int = ANY_SEQ,
) -> pd.DataFrame:
    """The k token occurrences whose codes are nearest to the one at (seq_id, pos),
    the occurrence itself excluded; ``layer=None`` uses the whole-model code; only
    sequences up to ``last_seq`` are searched (default: all).

    Columns: seq_id, pos, distance, token_id, token (ordered by distance, seq_id, pos).
    """
    if layer is None:
        hits = reader.sql(_MODEL_QUERY, [run_id, seq_id, pos, run_id, last_seq, k + 1])
        if hits.empty:
            raise StoreError(f"no hash codes for run {run_id}, seq {seq_id}, pos {pos}")
    else:
        code = code_of(reader, run_id, layer, seq_id, pos)
        hits = nearest_to_code(reader, run_id, layer, code, k + 1, last_seq)
    hits = hits[~((hits["seq_id"] == seq_id) & (hits["pos"] == pos))].head(k)
    tokens = reader.sql(
        "SELECT t.seq_id, t.pos, t.token_id, t.token FROM tokens t"
        " JOIN (SELECT unnest(?::BIGINT[]) AS seq_id, unnest(?::INTEGER[]) AS pos) h"
        " USING (seq_id, pos) WHERE t.run_id = ?",
        [hits["seq_id"].tolist(), hits["pos"].tolist(), run_id],
    )
    return hits.merge(tokens, on=["seq_id", "pos"], how="left").reset_index(drop=True)
