"""The neuron page's data: top-context windows, activation density, bin samples and their
quantile intervals against MiniLM's activations from plain Hugging Face forward hooks; the
lift against pandas on the stored firing bits; merged shards against one run; token labels
against the tokenizer's own decoding."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from sparsescope.analysis import neuron_page as page
from sparsescope.probes.mlp_probe import MlpProbe
from sparsescope.probes.mlp_stats import SAMPLES, WINDOW, bin_bounds, token_hash
from sparsescope.probes.ray_engine import merge_states, probe_state
from sparsescope.store.reader import Reader
from tests.conftest import hf_minilm_activations
from tests.test_device_stats import MAGNITUDE_EDGES, _batches, _feed, numpy_bins, numpy_density

NEURONS = (0, 17, 901)  # a few neurons per layer for the per-bin look-ups
EDGES = np.array([0.0, *MAGNITUDE_EDGES])


@pytest.fixture(scope="module")
def minilm(minilm_store):
    """(reader, run_id, tokens [seq_id, pos, token_id], hooked activations per layer)."""
    reader = Reader(minilm_store)
    run_id = reader.sql("SELECT run_id FROM runs").iloc[0, 0]
    tokens = reader.sql(
        "SELECT seq_id, pos, token_id FROM tokens WHERE run_id = ? ORDER BY seq_id, pos", [run_id]
    )
    return reader, run_id, tokens, hf_minilm_activations(tokens)


def _near_edge(x: np.ndarray) -> np.ndarray:
    """Values whose bin a float difference between two forwards could change."""
    mag = np.abs(x)
    at = np.searchsorted(EDGES, mag).clip(1, len(EDGES) - 1)
    gap = np.minimum(mag - EDGES[at - 1], np.abs(EDGES[at] - mag))
    return gap <= 1e-5 + 1e-4 * mag


def splitmix64(x: int) -> int:
    """The splitmix64 generator's output for state ``x`` (Vigna), in plain Python."""
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_token_hash_is_splitmix64():
    assert splitmix64(0) == 0xE220A8397B1DCDAF  # the published first output for seed 0
    keys = np.random.default_rng(0).integers(0, 1 << 50, 200)
    assert token_hash(keys).tolist() == [splitmix64(int(k)) >> 2 for k in keys]


def test_bin_bounds_hold_the_values_of_their_bins():
    lower, upper = bin_bounds()
    x = np.concatenate([EDGES, -EDGES, EDGES * 1.2, -EDGES * 1.2, [1e3, -1e3, 1e-9, -1e-9]])
    b = numpy_bins(x)
    assert ((lower[b] <= x) & (x <= upper[b])).all()
    pos, neg = b > 34, b < 34  # positive bins [lower, upper), negative (lower, upper]
    assert (x[pos] < upper[b[pos]]).all() and (x[neg] > lower[b[neg]]).all()


def test_windows_equal_the_hooked_activations(minilm):
    reader, run_id, tokens, acts = minilm
    seq_len = int(tokens["pos"].max()) + 1
    for layer, neuron in [(0, 3), (2, 901), (5, 1500)]:
        got = page.top_windows(reader, run_id, layer, neuron)
        assert got["rank"].tolist() == list(range(20))
        grid = acts[layer][:, neuron].reshape(-1, seq_len)  # [seq, pos]
        for row in got.itertuples():
            at = row.pos + np.arange(-WINDOW, WINDOW + 1)
            inside = (at >= 0) & (at < seq_len)
            expected = np.where(inside, grid[row.seq_id, np.clip(at, 0, seq_len - 1)], np.nan)
            np.testing.assert_allclose(row.window, expected, rtol=2e-3, atol=1e-4)
            assert row.window[WINDOW] == pytest.approx(row.value, rel=1e-3)
            ids = tokens[tokens["seq_id"] == row.seq_id]["token_id"].to_numpy()
            want = [int(ids[p]) if ok else None for p, ok in zip(at, inside, strict=True)]
            assert row.token_ids == want


def test_density_equals_numpy_histogram_of_the_hooked_activations(minilm):
    reader, run_id, _, acts = minilm
    stored = reader.sql(
        "SELECT layer, neuron, bin, count FROM neuron_density WHERE run_id = ?", [run_id]
    )
    for layer, x in acts.items():
        grid = np.zeros((x.shape[1], 70), np.int64)
        mine = stored[stored["layer"] == layer]
        grid[mine["neuron"], mine["bin"]] = mine["count"]
        cells = numpy_bins(x) + 70 * np.arange(x.shape[1])  # numpy_bins: numpy_density's bins
        expected = np.bincount(cells.ravel(), minlength=70 * x.shape[1]).reshape(-1, 70)
        assert (grid.sum(1) == len(x)).all()
        moved = np.abs(grid - expected).sum(1)  # a value near an edge moves 2 counts at most
        assert (moved <= 2 * _near_edge(x).sum(0)).all(), layer
        assert (moved == 0).mean() > 0.9
    x = acts[5][:, 17]
    dens = page.density(reader, run_id, 5, 17)
    full = np.zeros(70, np.int64)
    full[dens["bin"]] = dens["count"]
    if not _near_edge(x).any():
        np.testing.assert_array_equal(full, numpy_density(x))
    assert (dens["count"] > 0).all() and dens["bin"].is_monotonic_increasing


def test_bin_samples_are_the_smallest_hashes_of_the_hooked_bins(minilm):
    reader, run_id, tokens, acts = minilm
    keys = (tokens["seq_id"].to_numpy() << 24) | tokens["pos"].to_numpy()
    hashes = token_hash(keys)
    for layer, neuron in itertools.product((1, 4), NEURONS):
        x = acts[layer][:, neuron]
        bins, near = numpy_bins(x), _near_edge(x)
        got = reader.sql(
            "SELECT bin, seq_id, pos, value FROM neuron_samples"
            " WHERE run_id = ? AND layer = ? AND neuron = ?",
            [run_id, layer, neuron],
        )
        index = got["seq_id"].to_numpy() * (int(tokens["pos"].max()) + 1) + got["pos"].to_numpy()
        np.testing.assert_allclose(got["value"], x[index], rtol=1e-4, atol=1e-5)
        ok = ~near[index]
        assert (got["bin"].to_numpy()[ok] == bins[index][ok]).all()
        checked = 0
        for b, sample in got.groupby("bin"):
            members = np.flatnonzero(bins == b)
            if near[np.abs(bins - b) <= 2].any():  # across zero, 33 and 35 are neighbours
                continue  # a token may have crossed into or out of bin b
            chosen = members[np.argsort(hashes[members], kind="stable")[:SAMPLES]]
            got_keys = (sample["seq_id"].to_numpy() << 24) | sample["pos"].to_numpy()
            assert sorted(got_keys) == sorted(keys[chosen])
            checked += 1
        assert checked >= 10


def test_quantile_intervals_and_their_examples(minilm):
    reader, run_id, tokens, acts = minilm
    seq_len = int(tokens["pos"].max()) + 1
    layer, neuron = 3, 17
    dens = page.density(reader, run_id, layer, neuron)
    intervals = page.quantile_intervals(dens)
    # the intervals partition the bins in value order, highest first
    assert sum(intervals["bins"][::-1], []) == dens["bin"].tolist()
    assert intervals["count"].sum() == len(tokens)
    assert intervals["q_to"].iloc[0] == pytest.approx(1.0)
    cdf = np.cumsum(dens["count"]) / len(tokens)
    mid = cdf - dens["count"] / len(tokens) / 2
    for row in intervals.itertuples():  # each bin's midpoint lies between its quantile edges
        lo, hi = ([0, *page.QUANTILES, 1])[row.interval : row.interval + 2]
        assert (
            (mid[dens["bin"].isin(row.bins)] >= lo) & (mid[dens["bin"].isin(row.bins)] <= hi)
        ).all()
    examples = page.interval_examples(reader, run_id, layer, neuron, intervals)
    x = acts[layer][:, neuron]
    for ex in examples.itertuples():
        value = x[ex.seq_id * seq_len + ex.pos]
        assert ex.value == pytest.approx(value, rel=1e-4, abs=1e-5)
        row = intervals[intervals["interval"] == ex.interval].iloc[0]
        assert row.lower - 1e-5 <= value <= row.upper + 1e-5
        seq = tokens[tokens["seq_id"] == ex.seq_id]["token_id"].tolist()
        assert ex.token_id == seq[ex.pos]
        assert ex.before_ids == seq[max(0, ex.pos - WINDOW) : ex.pos]
        assert ex.after_ids == seq[ex.pos + 1 : ex.pos + 1 + WINDOW]
    assert (examples.groupby("interval").size() <= 3).all()


def test_lift_equals_pandas_on_the_stored_firing_bits(minilm):
    reader, run_id, _, _ = minilm
    codes = reader.sql(
        "SELECT h.code, t.token_id FROM hash_codes h JOIN tokens t USING (run_id, seq_id, pos)"
        " WHERE h.run_id = ? AND h.layer = 4",
        [run_id],
    )
    bits = np.unpackbits(np.stack([np.frombuffer(c, np.uint8) for c in codes["code"]]), axis=1)
    for neuron in NEURONS:
        df = pd.DataFrame({"token_id": codes["token_id"], "fire": bits[:, neuron]})
        p = df["fire"].mean()
        by = df.groupby("token_id")["fire"].agg(["size", "sum"])
        by = by[by["size"] >= 5]
        expected = (by["sum"] / by["size"] / p).sort_values(ascending=False)
        rows, sample = page.token_lift(reader, run_id, 4, neuron, min_count=5)
        assert sample["n_tokens"] == len(df) and sample["p_fire"] == pytest.approx(p)
        got = rows.set_index("token_id")
        assert set(got.index) == set(by.index)
        np.testing.assert_allclose(got.loc[expected.index, "lift"], expected, rtol=1e-12)
        np.testing.assert_array_equal(got.loc[by.index, "n"], by["size"])
        assert rows["lift"].is_monotonic_decreasing


def test_merged_shards_equal_one_run_over_their_union():
    batches = _batches(gated=False, relu=False, d=24, seed=7)  # continuous: no ties
    whole, even, odd = (MlpProbe(2, 24, False, top_k=4) for _ in range(3))
    _feed(whole, batches)
    _feed(even, batches[::2])
    _feed(odd, batches[1::2])
    merged = merge_states([probe_state(even), probe_state(odd)])
    one = probe_state(whole)
    for name in ("density", "top_val", "top_key", "top_window", "sample_hash", "sample_key",
                 "sample_val"):  # fmt: skip
        np.testing.assert_array_equal(merged[name], one[name], err_msg=name)


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A small byte-level BPE (the zoo's trainer) over text with accents and whitespace."""
    from sparsescope.probes.tokenizer import train_tokenizer

    docs = ["café naïve  façade\n\tdéjà vu — “quotes”", "plain words and more words"] * 50
    return train_tokenizer(docs, 300, 64)


def test_token_labels_of_a_byte_level_tokenizer(byte_tokenizer):
    tok = byte_tokenizer
    ids = list(range(len(tok)))
    raws = page.token_bytes(tok, ids)
    for i, raw in zip(ids, raws, strict=True):
        text = tok.decode([i])
        if raw is None:  # only the special token
            assert text == "<|endoftext|>"
            continue
        assert raw.decode("utf-8", errors="replace") == text  # the tokenizer's own decoding
        label = page.token_label(text, raw)
        assert "Ġ" not in label or "Ġ" in text
        if "\ufffd" in text:  # a lone byte of a multi-byte character
            assert "<0x" in label and "\ufffd" not in label
    assert page.token_label(" ") == "␣" and page.token_label("  ") == "␣␣"
    assert page.token_label("\n") == "↵" and page.token_label("a\tb") == "a⇥b"
    assert page.token_label(" the") == " the" and page.token_label("") == "∅"
    assert page.token_label("x", bytes([0xC3])) == "<0xC3>"
    assert page.token_label("", "é".encode() + bytes([0xE2, 0x80])) == "é<0xE2><0x80>"
    assert page.token_label("\x07") == "<0x07>"


def test_token_labels_of_sentencepiece_byte_tokens():
    class Pieces:  # the part of a SentencePiece tokenizer that token_bytes reads
        all_special_tokens = ["<s>"]

        def convert_ids_to_tokens(self, ids):
            return [["<0x0A>", "▁the", "<s>", "<0xE2>"][i] for i in ids]

    assert page.token_bytes(Pieces(), [0, 1, 2, 3]) == [b"\n", None, None, b"\xe2"]


def test_lift_says_when_no_codes_were_kept(tmp_path):
    from sparsescope.probes.job import ProbeConfig, run_probe

    config = ProbeConfig(max_tokens=256, seq_len=32, batch_size=4, codes="layers:1")
    [run_id] = run_probe("minilm", "stdlib-docs", tmp_path, config, quiet=True)
    reader = Reader(tmp_path)
    assert page.token_lift(reader, run_id, 0, 5) is None
    rows, sample = page.token_lift(reader, run_id, 1, 5, min_count=1)
    assert sample["n_tokens"] == 256 and rows["n"].sum() == 256
