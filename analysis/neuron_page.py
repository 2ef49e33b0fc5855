"""The neuron page's look-ups (METHODS.md §1): top contexts with the neuron's activation
over each, its activation density over all probed tokens, examples from quantile intervals
of that density, the tokens that raise its firing, and readable token labels.

Each look-up returns None where the run did not record what it needs (runs probed before
these tables existed); the page then says so.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd

from sparsescope.analysis.hash_codes import last_sample_seq
from sparsescope.analysis.runs import tokens_around
from sparsescope.probes.mlp_stats import NAN_BIN, WINDOW, bin_bounds, token_hash, token_key
from sparsescope.store.reader import Reader

NOT_RECORDED = "not recorded by this run (probe again)"
LIFT_TOKENS = 100_000  # the lift reads the codes of the first sequences up to this many tokens
LIFT_MIN_COUNT = 20  # tokens seen fewer times than this get no lift
# interval edges (cumulative fractions of all probed tokens) for the quantile examples
QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999)
_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}
_SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# --- token labels ------------------------------------------------------------------------


def token_label(text: str, raw: bytes | None = None) -> str:
    """A token as the page shows it: from its ``raw`` bytes where known (UTF-8, each byte
    that does not decode as ``<0xNN>``), else its decoded ``text``; newlines as ``↵``, tabs
    as ``⇥``, a token of spaces only as ``␣``s, other control characters as ``<0xNN>``."""
    if raw is not None:
        text = _decode(raw)
    if text == "":
        return "∅"
    if text.isspace():
        return "".join(_VISIBLE.get(c, c) for c in text)
    out = []
    for c in text:
        if c in _VISIBLE and c != " ":
            out.append(_VISIBLE[c])
        elif unicodedata.category(c) == "Cc":
            out.append(f"<0x{ord(c):02X}>")
        else:
            out.append(c)
    return "".join(out)


def _decode(raw: bytes) -> str:
    out, i = [], 0
    while i < len(raw):
        for n in range(1, 5):  # the shortest prefix that is one UTF-8 character
            try:
                char = raw[i : i + n].decode("utf-8")
            except UnicodeDecodeError:
                continue
            out.append(char)
            i += n
            break
        else:
            out.append(f"<0x{raw[i]:02X}>")
            i += 1
    return "".join(out)


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable bytes stand for themselves, the others for
    chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in set(printable)]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


_BYTE_LEVEL = _byte_level_chars()


def token_bytes(tokenizer, token_ids) -> list[bytes | None]:
    """The raw bytes of each token id where the tokenizer's vocabulary tells them: byte-level
    BPE (GPT-2, Llama 3, the zoo) and SentencePiece byte tokens (``<0xNN>``); else None."""
    pieces = tokenizer.convert_ids_to_tokens([int(i) for i in token_ids])
    special = set(getattr(tokenizer, "all_special_tokens", []))
    byte_level = _is_byte_level(tokenizer)
    out = []
    for piece in pieces:
        if piece is None or piece in special:
            out.append(None)
        elif byte_level and all(c in _BYTE_LEVEL for c in piece):
            out.append(bytes(_BYTE_LEVEL[c] for c in piece))
        elif m := _SENTENCEPIECE_BYTE.fullmatch(piece):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(None)
    return out


def labels(texts: list, ids: list | None = None, tokenizer=None) -> list[str | None]:
    """``token_label`` of each token text (None stays None: outside a sequence), from its
    raw bytes where ``tokenizer`` knows those of ``ids``."""
    raws: list = [None] * len(texts)
    if tokenizer is not None and ids is not None:
        known = [k for k, i in enumerate(ids) if i is not None]
        for k, raw in zip(known, token_bytes(tokenizer, [ids[k] for k in known]), strict=True):
            raws[k] = raw
    return [None if t is None else token_label(t, raw) for t, raw in zip(texts, raws, strict=True)]


def run_tokenizer(reader: Reader, run_id: str):
    """The tokenizer of the run's model, read from its local folder (no weights); None where
    the model has none on this machine."""
    from transformers import AutoTokenizer

    df = reader.sql(
        "SELECT m.path FROM runs r JOIN models m USING (model_id) WHERE r.run_id = ?", [run_id]
    )
    path = df.iloc[0, 0] if not df.empty else None
    if not path or not Path(path).is_dir():
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and '"ByteLevel"' in backend.to_str()


# --- top contexts ------------------------------------------------------------------------


def top_windows(reader: Reader, run_id: str, layer: int, neuron: int) -> pd.DataFrame | None:
    """The neuron's stored top activations with its activation at each token of their
    ±WINDOW context: rank, value, seq_id, pos, ``window`` (2·WINDOW + 1 floats, NaN outside
    the sequence), ``token_ids`` and ``tokens`` (None outside). None: not recorded."""
    df = reader.sql(
        "SELECT t.rank, t.value, t.seq_id, t.pos, w.window,"
        " list(k.token_id ORDER BY k.pos) AS ids, list(k.pos ORDER BY k.pos) AS at,"
        " list(k.token ORDER BY k.pos) AS texts"
        " FROM neuron_top t JOIN neuron_top_window w USING (run_id, layer, neuron, rank)"
        " JOIN tokens k ON k.run_id = t.run_id AND k.seq_id = t.seq_id"
        " AND k.pos BETWEEN t.pos - $w AND t.pos + $w"
        " WHERE t.run_id = $run AND t.layer = $layer AND t.neuron = $neuron"
        " GROUP BY ALL ORDER BY t.rank",
        {"w": WINDOW, "run": run_id, "layer": int(layer), "neuron": int(neuron)},
    )
    if df.empty:
        return None
    width = 2 * WINDOW + 1
    ids, texts = [], []
    for row in df.itertuples():
        slot = {int(p) - row.pos + WINDOW: k for k, p in enumerate(row.at)}
        ids.append([int(row.ids[slot[i]]) if i in slot else None for i in range(width)])
        texts.append([row.texts[slot[i]] if i in slot else None for i in range(width)])
    df["window"] = [np.asarray(w, dtype=np.float64) for w in df["window"]]
    return df.drop(columns=["ids", "at", "texts"]).assign(token_ids=ids, tokens=texts)


# --- density and quantile examples ---------------------------------------------------------


def density(reader: Reader, run_id: str, layer: int, neuron: int) -> pd.DataFrame | None:
    """The neuron's activation counts over all probed tokens, per nonzero bin in value
    order: bin, lower, upper (``probes.mlp_stats.bin_bounds``), count. NaN values are
    counted in bin ``NAN_BIN`` (NaN bounds). None: not recorded."""
    df = reader.sql(
        "SELECT bin, sum(count) AS count FROM neuron_density"
        " WHERE run_id = ? AND layer = ? AND neuron = ? GROUP BY bin ORDER BY bin",
        [run_id, int(layer), int(neuron)],
    )
    if df.empty:
        return None
    lower, upper = bin_bounds()
    bins = df["bin"].to_numpy()
    return pd.DataFrame(
        {"bin": bins, "lower": lower[bins], "upper": upper[bins], "count": df["count"]}
    ).astype({"bin": "int64", "count": "int64"})


def quantile_intervals(dens: pd.DataFrame, quantiles=QUANTILES) -> pd.DataFrame:
    """Density bins (non-NaN) grouped into intervals of the cumulative distribution: a bin
    joins the interval between consecutive ``quantiles`` that holds its midpoint. Per
    interval, highest first: interval, bins (list), q_from and q_to (the cumulative fractions
    it spans), lower, upper (its value range) and count."""
    d = dens[dens["bin"] != NAN_BIN].sort_values("bin")
    total = d["count"].sum()
    if total == 0:
        return pd.DataFrame(
            columns=["interval", "bins", "q_from", "q_to", "lower", "upper", "count"]
        )
    after = d["count"].cumsum().to_numpy() / total
    before = after - d["count"].to_numpy() / total
    d = d.assign(
        interval=np.searchsorted(quantiles, (before + after) / 2, side="right"),
        q_from=before,
        q_to=after,
    )
    out = d.groupby("interval", sort=True).agg(
        bins=("bin", list),
        q_from=("q_from", "min"),
        q_to=("q_to", "max"),
        lower=("lower", "min"),
        upper=("upper", "max"),
        count=("count", "sum"),
    )
    return out.reset_index().sort_values("interval", ascending=False, ignore_index=True)


def interval_examples(
    reader: Reader,
    run_id: str,
    layer: int,
    neuron: int,
    intervals: pd.DataFrame,
    per_interval: int = 3,
    context: int = WINDOW,
) -> pd.DataFrame | None:
    """Up to ``per_interval`` example tokens per interval of ``quantile_intervals``: the
    kept samples of its bins (``neuron_samples``) of smallest ``token_hash``, the first
    ``SAMPLES`` a uniform sample of the interval's tokens. Rows: interval, bin, seq_id, pos,
    value, and the ``context`` tokens either side (``before_ids``, ``before``, ``token_id``,
    ``token``, ``after_ids``, ``after``). None: not recorded."""
    samples = reader.sql(
        "SELECT bin, seq_id, pos, value FROM neuron_samples"
        " WHERE run_id = ? AND layer = ? AND neuron = ?",
        [run_id, int(layer), int(neuron)],
    )
    if samples.empty:
        return None
    of_bin = {b: row.interval for row in intervals.itertuples() for b in row.bins}
    samples["interval"] = samples["bin"].map(of_bin)
    samples["hash"] = token_hash(token_key(samples["seq_id"], samples["pos"]))
    picked = (
        samples.dropna(subset=["interval"])
        .sort_values(["interval", "hash"])
        .groupby("interval")
        .head(per_interval)
        .astype({"interval": "int64"})
    )
    toks = tokens_around(reader, run_id, picked["seq_id"].tolist(), picked["pos"].tolist(), context)
    around = {key: g for key, g in toks.groupby(["seq_id", "at"])}
    rows = []
    for row in picked.itertuples():
        g = around[(row.seq_id, row.pos)]
        left, me, right = g[g["pos"] < row.pos], g[g["pos"] == row.pos], g[g["pos"] > row.pos]
        rows.append(
            {
                "interval": row.interval,
                "bin": row.bin,
                "seq_id": row.seq_id,
                "pos": row.pos,
                "value": row.value,
                "before_ids": left["token_id"].tolist(),
                "before": left["token"].tolist(),
                "token_id": int(me["token_id"].iloc[0]),
                "token": me["token"].iloc[0],
                "after_ids": right["token_id"].tolist(),
                "after": right["token"].tolist(),
            }
        )
    return pd.DataFrame(rows)


# --- lift ----------------------------------------------------------------------------------


def token_lift(
    reader: Reader,
    run_id: str,
    layer: int,
    neuron: int,
    min_count: int = LIFT_MIN_COUNT,
    max_tokens: int = LIFT_TOKENS,
) -> tuple[pd.DataFrame, dict] | None:
    """The tokens that most raise the neuron's firing: lift = P(fire | token) / P(fire),
    over the tokens whose hash codes the run kept at ``layer`` (the neuron's bit of the
    code: fires as METHODS §1 defines it), in the first sequences up to ``max_tokens``
    tokens. Rows (tokens seen at least ``min_count`` times, highest lift first): token_id,
    token, n, n_fire, p_fire, lift; and a dict of n_tokens, n_fire, p_fire over the sample.
    None: the run kept no codes at this layer."""
    last = last_sample_seq(reader, run_id, max_tokens)
    df = reader.sql(
        "SELECT t.token_id, any_value(t.token) AS token, count(*) AS n,"
        " sum(get_bit(h.code::BIT, $neuron::INTEGER)) AS n_fire"
        " FROM hash_codes h JOIN tokens t USING (run_id, seq_id, pos)"
        " WHERE h.run_id = $run AND h.layer = $layer AND h.seq_id <= $last"
        " GROUP BY t.token_id",
        {"run": run_id, "layer": int(layer), "neuron": int(neuron), "last": last},
    )
    if df.empty:
        return None
    n_tokens, n_fire = int(df["n"].sum()), int(df["n_fire"].sum())
    p_fire = n_fire / n_tokens
    seen = df[df["n"] >= min_count].astype({"n": "int64", "n_fire": "int64"})
    seen = seen.assign(p_fire=seen["n_fire"] / seen["n"])
    seen = seen.assign(lift=seen["p_fire"] / p_fire if p_fire > 0 else np.nan)
    seen = seen.sort_values(["lift", "n_fire", "token_id"], ascending=[False, False, True])
    return seen.reset_index(drop=True), {"n_tokens": n_tokens, "n_fire": n_fire, "p_fire": p_fire}
