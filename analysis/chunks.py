"""Owner of METHODS.md §2 token- and chunk-level sparsity (TLS, CLS), from stored codes.

CLS(c) = mean over chunks of c consecutive tokens (within a sequence) of
1 − |∪ active(t)| / d_mlp; CLS(1) is the token-level sparsity (TLS).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sparsescope.analysis.runs import d_mlp
from sparsescope.store.reader import Reader

CHUNK_SIZES = (1, 2, 4, 8, 16, 32)


def _bits(codes: pd.Series, width: int) -> np.ndarray:
    packed = np.frombuffer(b"".join(codes), np.uint8).reshape(len(codes), -1)
    return np.unpackbits(packed, axis=1, bitorder="big")[:, :width].astype(bool)


def chunk_sparsity(bits: np.ndarray, sizes=CHUNK_SIZES) -> dict[int, float]:
    """CLS of one sequence's firing bits [T, d] for each chunk size (whole chunks only)."""
    out = {}
    n_tok, width = bits.shape
    for c in sizes:
        n_chunks = n_tok // c
        if n_chunks == 0:
            continue
        union = bits[: n_chunks * c].reshape(n_chunks, c, width).any(axis=1)
        out[c] = float(1.0 - union.mean())
    return out


def cls_curve(reader: Reader, run_id: str, sizes=CHUNK_SIZES) -> pd.DataFrame:
    """Per layer and chunk size: CLS averaged over all whole chunks of all sequences."""
    width = d_mlp(reader, run_id)
    codes = reader.sql(
        "SELECT seq_id, layer, code FROM hash_codes WHERE run_id = ? ORDER BY layer, seq_id, pos",
        [run_id],
    )
    rows = []
    for (layer, _), group in codes.groupby(["layer", "seq_id"], sort=True):
        bits = _bits(group["code"], width)
        for c, value in chunk_sparsity(bits, sizes).items():
            rows.append((layer, c, value, len(bits) // c))
    df = pd.DataFrame(rows, columns=["layer", "chunk", "cls", "n_chunks"])
    # weight each sequence's mean by its number of chunks
    df["weighted"] = df["cls"] * df["n_chunks"]
    agg = df.groupby(["layer", "chunk"], as_index=False)[["weighted", "n_chunks"]].sum()
    agg["cls"] = agg["weighted"] / agg["n_chunks"]
    return agg[["layer", "chunk", "cls", "n_chunks"]]
