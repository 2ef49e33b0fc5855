"""Owner of METHODS.md §4 analyses: redundancy, code statistics and categorization.

Codes are handled packed (``probes.activity.pack_codes``: MSB-first bytes, one row per
input); the whole-model code is the concatenation of the per-layer codes. Pure
functions take packed arrays; ``*_run`` functions read a probe run from the store.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.multiclass import OneVsOneClassifier
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from sparsescope.analysis.runs import tokens_around
from sparsescope.store.hamming import ANY_SEQ
from sparsescope.store.reader import Reader

K_NEIGHBOURS = 9
TEST_SIZE = 0.3
N_CLASSES = 10  # language models: the most frequent current/next tokens only
MAX_SAMPLES = 3000  # categorization subsample cap (after the class restriction)
ALL_LAYERS = -1  # the ``layer`` value of the whole-model code in summaries


def _unique_rows(packed: np.ndarray) -> int:
    rows = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1])))
    return len(np.unique(rows))


def constant_mask(packed: np.ndarray) -> np.ndarray:
    """Packed mask of the bits that are constant over all rows (always 0 or always 1)."""
    always_one = np.bitwise_and.reduce(packed, axis=0)
    always_zero = ~np.bitwise_or.reduce(packed, axis=0)
    return always_one | always_zero


def redundancy_ratio(packed: np.ndarray, drop_constant: bool = False) -> float:
    """(N − #unique codes) / N; optionally after dropping bits constant over the rows.

    On one set both give the same value (a constant bit never tells two codes apart);
    ``drop_constant`` is kept to mirror the hash-encoder study.
    """
    n = len(packed)
    if n == 0:
        raise ValueError("redundancy of an empty code set")
    if drop_constant:
        packed = packed & ~constant_mask(packed)
    return (n - _unique_rows(packed)) / n


def bit_entropy(packed: np.ndarray, n_bits: int) -> np.ndarray:
    """Binary entropy (bits) of each bit's firing frequency over the rows."""
    p = np.unpackbits(packed, axis=1, count=n_bits, bitorder="big").mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.nan_to_num(h)


def code_frequencies(packed: np.ndarray) -> np.ndarray:
    """Counts of each distinct code, most frequent first."""
    rows = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1])))
    _, counts = np.unique(rows, return_counts=True)
    return np.sort(counts)[::-1]


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between rows of two 0/1 matrices (exact integers, as float64)."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    return (a @ (1 - b).T + (1 - a) @ b.T).astype(np.float64)


def split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test row indices (30% test)."""
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=TEST_SIZE, random_state=seed, stratify=labels)
    return train, test


def knn_accuracy(bits_train, y_train, bits_test, y_test, k: int = K_NEIGHBOURS) -> float:
    """k-NN (Hamming) fit on train codes, accuracy on test codes; equal distances are
    common, and are ranked as scikit-learn's brute-force search ranks them."""
    knn = KNeighborsClassifier(n_neighbors=k, metric="precomputed")
    knn.fit(hamming_matrix(bits_train, bits_train), y_train)
    return float((knn.predict(hamming_matrix(bits_test, bits_train)) == y_test).mean())


def kmeans_accuracy(bits_train, y_train, bits_test, y_test, seed: int = 0) -> float:
    """k-means (as many clusters as classes) on train codes; clusters matched to classes
    by the Hungarian method on the train confusion matrix; accuracy on test codes."""
    classes = np.unique(y_train)
    km = KMeans(n_clusters=len(classes), n_init=4, random_state=seed)
    with warnings.catch_warnings():  # fewer distinct codes than clusters is a valid outcome
        warnings.simplefilter("ignore", ConvergenceWarning)
        clusters = km.fit_predict(bits_train.astype(np.float32))
    y_idx = np.searchsorted(classes, y_train)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (clusters, y_idx), 1)
    rows, cols = linear_sum_assignment(-confusion)
    to_class = classes[cols[np.argsort(rows)]]
    return float((to_class[km.predict(bits_test.astype(np.float32))] == y_test).mean())


def logreg_accuracy(bits_train, y_train, bits_test, y_test) -> float:
    """One-vs-one logistic regression on codes; accuracy on test codes."""
    clf = OneVsOneClassifier(LogisticRegression(solver="liblinear"))
    clf.fit(bits_train.astype(np.float32), y_train)
    return float((clf.predict(bits_test.astype(np.float32)) == y_test).mean())


def categorize(bits: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """k-NN, k-means + Hungarian and one-vs-one logistic regression accuracies (test split).

    One BLAS/OpenMP thread: on a small shared CPU, thread pools oversubscribe and run
    several times slower.
    """
    train, test = split(labels, seed)
    parts = (bits[train], labels[train], bits[test], labels[test])
    with threadpool_limits(1):
        return {
            "knn_acc": knn_accuracy(*parts),
            "kmeans_acc": kmeans_accuracy(*parts, seed=seed),
            "logreg_acc": logreg_accuracy(*parts),
        }


# ---- probe runs in the store -------------------------------------------------------------


_FIRST_LAYER = "(SELECT min(layer) FROM hash_codes WHERE run_id = $run)"


def last_sample_seq(reader: Reader, run_id: str, max_tokens: int) -> int:
    """The last seq_id of the first whole sequences with codes that hold at most
    ``max_tokens`` tokens (at least one sequence): the page sample's bound."""
    per_seq = reader.sql(
        "SELECT seq_id, count(*) AS n FROM hash_codes"
        f" WHERE run_id = $run AND layer = {_FIRST_LAYER} GROUP BY seq_id ORDER BY seq_id",
        {"run": run_id},
    )
    if per_seq.empty:
        return ANY_SEQ
    within = per_seq[per_seq["n"].cumsum() <= max_tokens]
    return int((within if not within.empty else per_seq.head(1))["seq_id"].max())


def run_codes(
    reader: Reader, run_id: str, last_seq: int = ANY_SEQ
) -> tuple[pd.DataFrame, dict[int, np.ndarray]]:
    """Token keys (seq_id, pos, token_id) and packed codes per layer, rows in key order:
    the tokens whose codes the run kept (all of them, or the sample of ``--codes every:K``)
    up to sequence ``last_seq``."""
    bound = {"run": run_id, "last": last_seq}
    keys = reader.sql(
        "SELECT seq_id, pos, token_id FROM tokens t SEMI JOIN (SELECT seq_id, pos FROM hash_codes"
        f" WHERE run_id = $run AND layer = {_FIRST_LAYER} AND seq_id <= $last) h"
        " USING (seq_id, pos)"
        " WHERE t.run_id = $run AND t.seq_id <= $last ORDER BY seq_id, pos",
        bound,
    )
    codes = reader.arrow(
        "SELECT layer, code FROM hash_codes WHERE run_id = $run AND seq_id <= $last"
        " ORDER BY layer, seq_id, pos",
        bound,
    )
    if codes.num_rows == 0:
        raise ValueError(f"run {run_id} has no hash codes")
    layer = codes["layer"].to_numpy()
    blob = b"".join(codes["code"].to_pylist())
    packed = np.frombuffer(blob, np.uint8).reshape(codes.num_rows, -1)
    per_layer = {int(i): packed[layer == i] for i in np.unique(layer)}
    if any(len(p) != len(keys) for p in per_layer.values()):
        raise ValueError(f"run {run_id}: hash_codes and tokens disagree on the token count")
    return keys, per_layer


def whole_model(per_layer: dict[int, np.ndarray]) -> np.ndarray:
    """Concatenation over layers (packed bytes; every MiniLM/zoo width is a multiple of 8)."""
    return np.concatenate([per_layer[i] for i in sorted(per_layer)], axis=1)


def _code_sets(per_layer: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    return {**per_layer, ALL_LAYERS: whole_model(per_layer)}


def summary(per_layer: dict[int, np.ndarray], n_bits: int) -> pd.DataFrame:
    """Per layer and whole model (layer −1): codes, distinct codes, redundancy, bit entropy."""
    rows = []
    for layer, packed in _code_sets(per_layer).items():
        bits = n_bits * (len(per_layer) if layer == ALL_LAYERS else 1)
        h = bit_entropy(packed, bits) if layer != ALL_LAYERS else None
        counts = code_frequencies(packed)
        rows.append(
            {
                "layer": layer,
                "n_codes": len(packed),
                "n_unique": len(counts),
                "redundancy": redundancy_ratio(packed),
                "redundancy_nonconst": redundancy_ratio(packed, drop_constant=True),
                "n_constant_bits": int(np.unpackbits(constant_mask(packed))[:bits].sum()),
                "top_code_share": counts[0] / len(packed),
                "mean_bit_entropy": None if h is None else float(h.mean()),
            }
        )
    out = pd.DataFrame(rows)
    whole = out["layer"] == ALL_LAYERS
    out.loc[whole, "mean_bit_entropy"] = out.loc[~whole, "mean_bit_entropy"].mean()
    return out


def token_labels(keys: pd.DataFrame, n_classes: int = N_CLASSES) -> dict[str, np.ndarray]:
    """Current and next token id per row (−1 = excluded: no next token, or not among the
    ``n_classes`` most frequent labels)."""
    cur = keys["token_id"].to_numpy()
    nxt = keys.groupby("seq_id")["token_id"].shift(-1).fillna(-1).to_numpy().astype(np.int64)
    out = {}
    for name, y in (("current token", cur), ("next token", nxt)):
        valid = y[y >= 0]
        top = pd.Series(valid).value_counts().index[:n_classes].to_numpy()
        out[name] = np.where(np.isin(y, top), y, -1)
    return out


def _subsample(rows: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    if len(rows) <= MAX_SAMPLES:
        return rows
    keep, _ = train_test_split(rows, train_size=MAX_SAMPLES, random_state=seed, stratify=labels)
    return np.sort(keep)


def categorize_run(
    keys: pd.DataFrame,
    per_layer: dict[int, np.ndarray],
    n_bits: int,
    n_classes: int = N_CLASSES,
    seed: int = 0,
    layers: tuple[int, ...] | None = None,
) -> pd.DataFrame:
    """Accuracies per layer (and whole model, −1) × label (current / next token), restricted
    to the ``n_classes`` most frequent tokens and at most ``MAX_SAMPLES`` tokens;
    ``layers`` limits the code sets (default: all)."""
    rows = []
    for label, y in token_labels(keys, n_classes).items():
        idx = np.flatnonzero(y >= 0)
        idx = _subsample(idx, y[idx], seed)
        for layer, packed in _code_sets(per_layer).items():
            if layers is not None and layer not in layers:
                continue
            bits = n_bits * (len(per_layer) if layer == ALL_LAYERS else 1)
            unpacked = np.unpackbits(packed[idx], axis=1, count=bits, bitorder="big")
            acc = categorize(unpacked, y[idx], seed)
            rows.append({"label": label, "layer": layer, "n_samples": len(idx), **acc})
    return pd.DataFrame(rows)


def frequent_codes(
    reader: Reader, run_id: str, layer: int, limit: int = 10, last_seq: int = ANY_SEQ
) -> pd.DataFrame:
    """The most frequent codes of a layer (over sequences up to ``last_seq``), with their
    size and the tokens that share them."""
    return reader.sql(
        "SELECT h.code64, count(*) AS n, any_value(h.n_active) AS n_active,"
        " count(DISTINCT t.token) AS n_distinct_tokens,"
        " string_agg(DISTINCT t.token, ' · ') AS tokens"
        " FROM hash_codes h JOIN tokens t USING (run_id, seq_id, pos)"
        " WHERE h.run_id = ? AND h.layer = ? AND h.seq_id <= ? AND t.seq_id <= ?"
        " GROUP BY h.code64 ORDER BY n DESC, h.code64 LIMIT ?",
        [run_id, layer, last_seq, last_seq, limit],
    )


def token_contexts(reader: Reader, run_id: str, places: pd.DataFrame, window: int = 5) -> pd.Series:
    """``left [token] right`` for each (seq_id, pos) row of ``places``."""
    if places.empty:
        return pd.Series([], dtype=str)
    toks = tokens_around(reader, run_id, places["seq_id"].tolist(), places["pos"].tolist(), window)
    text = {}
    for (seq, at), g in toks.groupby(["seq_id", "at"]):
        words = [f"[{w}]" if p == at else w for p, w in zip(g["pos"], g["token"], strict=True)]
        text[(seq, at)] = " ".join(words)
    return pd.Series(
        [text.get((s, p), "") for s, p in zip(places["seq_id"], places["pos"], strict=True)]
    )
