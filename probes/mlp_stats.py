"""One-pass statistics of a layer's MLP activations, compiled with numba.

``token_rows`` reads a range of tokens (rows): per token the firing code, packed MSB-first
as ``activity.pack_codes`` packs it, its popcount ``n_active``, ``l1`` and ``max_abs``.
``neuron_columns`` reads a range of neurons (columns) of every token and updates the run's
per-neuron counts, sums, maxima, top-k lists (with each entry's window of activations),
activation densities and per-bin samples in place. Both release the GIL, so the MLP probe
runs disjoint ranges on its thread pool; every output element is computed by one call in a
fixed order, so the results do not depend on how the ranges are cut.

This module also owns the definitions the device path (``device_stats``) and the pages share:
the density bins (``bin_bounds``), the window around a top token (``WINDOW``) and the token
hash that picks the per-bin samples (``token_hash``).

The inner loops are written so that LLVM vectorises them: no branches, and the
``max_abs`` reduction on the float bits as integers (for non-negative floats the orders
agree, and a NaN stays the largest, as with numpy).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_CHUNK = 64  # neurons whose top-k thresholds are tested at once before any insertion
_SUM_ROWS = 256  # tokens summed in float32 before adding into the float64 totals

WINDOW = 6  # a top-k entry keeps the neuron's activations at pos - WINDOW .. pos + WINDOW
SAMPLES = 2  # tokens kept per neuron and density bin: those of smallest token_hash
# Density bins, ascending in value: bin 0 holds a ≤ −2^6, bins 1..32 negative magnitudes in
# half-octaves (edges 2^e and 1.5·2^e, e = 5 down to −10), 33 holds −2^−10 < a < 0, 34 a = 0
# (±0), then their mirror images for a > 0 up to bin 68 (a ≥ 2^6), and bin 69 NaN.
LOW_EXP, HIGH_EXP = -10, 6  # the regular bins cover magnitudes 2^LOW_EXP .. 2^HIGH_EXP
_HALVES = 2 * (HIGH_EXP - LOW_EXP)  # 32 regular bins per sign
ZERO_BIN = _HALVES + 2  # 34
NAN_BIN = 2 * ZERO_BIN + 1  # 69
N_BINS = NAN_BIN + 1
# float32 bits >> 22 is (biased exponent << 1 | top mantissa bit): the half-octave code;
# code − FIRST_CODE is 1 for the first regular bin [2^−10, 1.5·2^−10)
FIRST_CODE = ((127 + LOW_EXP) << 1) - 1
EMPTY_HASH = np.iinfo(np.int64).max  # a sample slot not filled yet


def bin_bounds() -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper value bounds of each density bin (NaN for the NaN bin). Positive
    bins hold ``lower ≤ a < upper``, negative ones ``lower < a ≤ upper``; the zero bin holds
    0 only."""
    halves = 2.0 ** np.repeat(np.arange(LOW_EXP, HIGH_EXP), 2) * np.tile([1.0, 1.5], _HALVES // 2)
    edges = np.concatenate([[0.0], halves, [2.0**HIGH_EXP, np.inf]])  # magnitudes, 35 edges
    upper_pos, lower_pos = edges[1:], edges[:-1]  # bins 35..68
    lower = np.concatenate([-upper_pos[::-1], [0.0], lower_pos, [np.nan]]) + 0.0  # no −0.0
    upper = np.concatenate([-lower_pos[::-1], [0.0], upper_pos, [np.nan]]) + 0.0
    return lower, upper


POS_BITS = 24  # a token's key, seq_id << POS_BITS | pos, identifies it within its run


def token_key(seq_id, pos) -> np.ndarray:
    """The key of each token (``seq_id``, ``pos``): ``seq_id << POS_BITS | pos``."""
    return (np.asarray(seq_id, dtype=np.int64) << POS_BITS) | np.asarray(pos, dtype=np.int64)


def token_place(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``token_key``'s inverse: seq_id (int64) and pos (int32) of each key."""
    return keys >> POS_BITS, (keys & ((1 << POS_BITS) - 1)).astype(np.int32)


def token_hash(keys: np.ndarray) -> np.ndarray:
    """A 62-bit hash of each ``token_key``: the splitmix64 finaliser,
    shifted right by 2 so that it stays below ``EMPTY_HASH`` as a non-negative int64."""
    z = np.asarray(keys).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) >> np.uint64(2)).astype(np.int64)


@njit(inline="always")
def _bin(bits):
    """The density bin of a float32 given by its int32 ``bits`` (int32 arithmetic throughout,
    so that the loop over a row vectorises at full width)."""
    mag = bits & np.int32(0x7FFFFFFF)
    code = (mag >> np.int32(22)) - np.int32(FIRST_CODE)
    step = (min(max(code, np.int32(0)), np.int32(ZERO_BIN - 1)) + np.int32(1)) * np.int32(mag != 0)
    b = np.int32(ZERO_BIN) + step - np.int32(2) * step * np.int32(bits < 0)
    return np.int32(NAN_BIN) if mag > np.int32(0x7F800000) else b


@njit(inline="always")
def _popcount8(x):
    x = np.uint32(x)
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return np.int32((x + (x >> 4)) & 0x0F)


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def token_rows(values, fire_src, lo, hi, packed, n_active, l1, max_abs):
    """Rows ``lo:hi``; token t fires at neuron j where ``fire_src[t, j] > 0`` (METHODS §1).

    ``l1`` is summed in float32 in a vectorised order (``reassoc``)."""
    d = values.shape[1]
    full = d // 8
    value_bits, max_bits = values.view(np.int32), max_abs.view(np.int32)
    for t in range(lo, hi):
        row, row_bits, fires, code = values[t], value_bits[t], fire_src[t], packed[t]
        for byte in range(full):
            j = byte * 8
            code[byte] = (
                ((fires[j] > 0) << 7)
                | ((fires[j + 1] > 0) << 6)
                | ((fires[j + 2] > 0) << 5)
                | ((fires[j + 3] > 0) << 4)
                | ((fires[j + 4] > 0) << 3)
                | ((fires[j + 5] > 0) << 2)
                | ((fires[j + 6] > 0) << 1)
                | (fires[j + 7] > 0)
            )
        if full < code.shape[0]:  # the last, partial byte: zero bits past d
            last = 0
            for j in range(full * 8, full * 8 + 8):
                last = (last << 1) | (j < d and fires[j] > 0)
            code[full] = last
        count = np.int32(0)
        for byte in range(code.shape[0]):
            count += _popcount8(code[byte])
        total, biggest = np.float32(0), np.int32(0)
        for j in range(d):
            total += abs(row[j])
            biggest = max(biggest, row_bits[j] & 0x7FFFFFFF)
        n_active[t], l1[t], max_bits[t] = count, total, biggest


@njit(nogil=True, cache=True)
def neuron_columns(
    values, fire_src, keys, hashes, order, seq_len, lo, hi,
    fired, total, total_sq, vmax, top_val, top_key, top_window,
    density, sample_hash, sample_key, sample_val,
):  # fmt: skip
    """Columns ``lo:hi`` of a batch whose rows are ``seq_len``-token sequences one after the
    other; token t has key ``keys[t]`` and hash ``hashes[t]`` (``token_hash``); ``order``
    lists the tokens by hash (a stable argsort).

    Adds the batch to the running counts, sums and maxima; inserts each value that beats a
    neuron's k-th best into its descending top-k list (``top_val[j]``, ``top_key[j]``, and in
    ``top_window[j]`` the neuron's activations over the entry's ±WINDOW tokens, NaN outside
    its sequence); counts each value in its density bin (``density[j, bin]``) and keeps per
    bin the ``SAMPLES`` tokens of smallest hash, ascending (``sample_hash``, ``sample_key``,
    ``sample_val`` [j, bin, s]).

    Sums run in float32 over ``_SUM_ROWS`` tokens at a time, then add into the float64
    totals. Strictly better values only enter a top-k list and strictly smaller hashes a
    sample, so among equals the earlier token keeps its place.
    """
    m, k, n = hi - lo, top_val.shape[1], values.shape[0]
    fired_b, max_b = np.zeros(m, np.int64), np.full(m, -np.inf, np.float32)
    sum_b, sum_sq_b = np.zeros(m, np.float32), np.zeros(m, np.float32)
    kth = top_val[lo:hi, k - 1].copy()  # contiguous, for the vectorised test
    fresh = np.full((m, k), -1, np.int32)  # row of each list entry that came in this batch
    for t in range(n):
        row, fires = values[t, lo:hi], fire_src[t, lo:hi]
        hits = 0
        for j in range(m):
            x = row[j]
            fired_b[j] += fires[j] > 0
            sum_b[j] += x
            sum_sq_b[j] += x * x
            max_b[j] = max(max_b[j], x)
            hits += x > kth[j]
        if hits:
            _insert_row(row, t, kth, keys[t], top_val[lo:hi], top_key[lo:hi], fresh)
        if (t + 1) % _SUM_ROWS == 0 or t == n - 1:
            for j in range(m):
                total[lo + j] += sum_b[j]
                total_sq[lo + j] += sum_sq_b[j]
            sum_b[:] = 0
            sum_sq_b[:] = 0
    for j in range(m):
        fired[lo + j] += fired_b[j]
        vmax[lo + j] = max(vmax[lo + j], max_b[j])
    _windows(values, fresh, seq_len, lo, top_window[lo:hi])
    _density(values, keys, hashes, order, lo, hi, density, sample_hash, sample_key, sample_val)


@njit(inline="always")
def _density(values, keys, hashes, order, lo, hi, density, sample_hash, sample_key, sample_val):
    """Count the batch's values in their bins, tokens in hash order, then update the samples.

    In hash order the first ``SAMPLES`` tokens to reach a bin in a batch are its smallest
    hashes there, the only candidates for the bin's sample: the counting loop appends them
    to a list without a branch (at most SAMPLES per bin), and only they are tested after it.
    The batch's count of (neuron j, bin b) is at cell ``j · N_BINS + b``."""
    m, n, s = hi - lo, values.shape[0], sample_hash.shape[2]
    counts = np.zeros(m * N_BINS, np.int32)
    cells = np.empty(m, np.uint64)  # unsigned: indexing skips the negative-index fix-up
    candidates = np.empty(m * N_BINS * s + 1, np.uint64)  # hash-order row << 32 | cell
    found = 0
    bits = values.view(np.int32)
    for i in range(n):
        row_bits, row = bits[order[i], lo:hi], np.uint64(i) << np.uint64(32)
        for j in range(m):
            cells[j] = np.uint64(j * N_BINS + _bin(row_bits[j]))
        for j in range(m):
            cell = cells[j]
            c = counts[cell]
            counts[cell] = c + 1
            candidates[found] = row | cell
            found += c < s
    largest = sample_hash[lo:hi, :, s - 1].copy().reshape(-1)  # per cell, contiguous
    for q in range(found):
        cell = candidates[q] & np.uint64(0xFFFFFFFF)
        t = order[candidates[q] >> np.uint64(32)]
        h = hashes[t]
        if h < largest[cell]:  # it enters; among equal hashes the earlier token stays first
            j, b = np.int64(cell // N_BINS), np.int64(cell % N_BINS)
            slot_hash, slot_key, slot_val = (
                sample_hash[lo + j, b],
                sample_key[lo + j, b],
                sample_val[lo + j, b],
            )
            r = s - 1
            while r > 0 and h < slot_hash[r - 1]:
                slot_hash[r], slot_key[r], slot_val[r] = (
                    slot_hash[r - 1],
                    slot_key[r - 1],
                    slot_val[r - 1],
                )
                r -= 1
            slot_hash[r], slot_key[r], slot_val[r] = h, keys[t], values[t, lo + j]
            largest[cell] = slot_hash[s - 1]
    for j in range(m):
        for b in range(N_BINS):
            density[lo + j, b] += counts[j * N_BINS + b]


@njit(inline="always")
def _insert_row(row, t, kth, key, top_val, top_key, fresh):
    """Insert ``row[j]`` (row ``t`` of the batch) with ``key`` into list j wherever it beats
    ``kth[j]``, noting t in ``fresh``; chunks of ``_CHUNK`` neurons with no such value are
    skipped after one vectorised test."""
    m, k = row.shape[0], top_val.shape[1]
    for c in range(0, m, _CHUNK):
        end = min(c + _CHUNK, m)
        hits = 0
        for j in range(c, end):
            hits += row[j] > kth[j]
        if hits == 0:
            continue
        for j in range(c, end):
            x = row[j]
            if x > kth[j]:
                r = k - 1
                while r > 0 and x > top_val[j, r - 1]:
                    top_val[j, r], top_key[j, r] = top_val[j, r - 1], top_key[j, r - 1]
                    fresh[j, r] = fresh[j, r - 1]
                    r -= 1
                top_val[j, r], top_key[j, r], fresh[j, r] = x, key, t
                kth[j] = top_val[j, k - 1]


@njit(inline="always")
def _windows(values, fresh, seq_len, lo, top_window):
    """Move the windows of the lists that changed in this batch to their entries' new ranks
    and fill those of the entries that came in (``fresh[j, r]``: their row; −1 elsewhere).
    The entries of earlier batches keep their order, and the ones a batch pushes out are the
    last: they are the first ``k − #fresh`` of the old list."""
    k, width = top_window.shape[1], top_window.shape[2]
    w = (width - 1) // 2
    for j in range(fresh.shape[0]):
        if fresh[j].max() < 0:
            continue
        old = top_window[j].copy()
        kept = 0
        for r in range(k):
            t = fresh[j, r]
            if t < 0:
                top_window[j, r] = old[kept]
                kept += 1
                continue
            pos = t % seq_len
            for o in range(-w, w + 1):  # NaN outside the token's sequence
                inside = 0 <= pos + o < seq_len
                top_window[j, r, w + o] = values[t + o, lo + j] if inside else np.nan
