"""One-pass statistics of a layer's MLP activations, compiled with numba.

``token_rows`` reads a range of tokens (rows): per token the firing code, packed MSB-first
as ``activity.pack_codes`` packs it, its popcount ``n_active``, ``l1`` and ``max_abs``.
``neuron_columns`` reads a range of neurons (columns) of every token and updates the run's
per-neuron counts, sums, maxima and top-k lists in place. Both release the GIL, so the MLP
probe runs disjoint ranges on its thread pool; every output element is computed by one
call in a fixed order, so the results do not depend on how the ranges are cut.

The inner loops are written so that LLVM vectorises them: no branches, and the
``max_abs`` reduction on the float bits as integers (for non-negative floats the orders
agree, and a NaN stays the largest, as with numpy).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_CHUNK = 64  # neurons whose top-k thresholds are tested at once before any insertion
_SUM_ROWS = 256  # tokens summed in float32 before adding into the float64 totals


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
def neuron_columns(values, fire_src, keys, lo, hi, fired, total, total_sq, vmax, top_val, top_key):
    """Columns ``lo:hi``: add the batch to the running counts, sums and maxima, and insert
    each value that beats a neuron's k-th best into its descending top-k list
    (``top_val[j]``, ``top_key[j]``: one contiguous list per neuron).

    Sums run in float32 over ``_SUM_ROWS`` tokens at a time, then add into the float64
    totals. Strictly better values only enter a list, so among equal values the earlier
    token keeps its place; ``keys[t]`` is what the lists record for token t.
    """
    m, k, n = hi - lo, top_val.shape[1], values.shape[0]
    fired_b, max_b = np.zeros(m, np.int64), np.full(m, -np.inf, np.float32)
    sum_b, sum_sq_b = np.zeros(m, np.float32), np.zeros(m, np.float32)
    kth = top_val[lo:hi, k - 1].copy()  # contiguous, for the vectorised test
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
            _insert_row(row, kth, keys[t], top_val[lo:hi], top_key[lo:hi])
        if (t + 1) % _SUM_ROWS == 0 or t == n - 1:
            for j in range(m):
                total[lo + j] += sum_b[j]
                total_sq[lo + j] += sum_sq_b[j]
            sum_b[:] = 0
            sum_sq_b[:] = 0
    for j in range(m):
        fired[lo + j] += fired_b[j]
        vmax[lo + j] = max(vmax[lo + j], max_b[j])


@njit(inline="always")
def _insert_row(row, kth, key, top_val, top_key):
    """Insert ``row[j]`` with ``key`` into list j wherever it beats ``kth[j]``; chunks of
    ``_CHUNK`` neurons with no such value are skipped after one vectorised test."""
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
                    r -= 1
                top_val[j, r], top_key[j, r] = x, key
                kth[j] = top_val[j, k - 1]
