"""The MLP probe: hooks on every layer's hidden activation, streaming statistics.

Per batch it emits Arrow rows for ``layer_token_stats`` and ``hash_codes``; over
the run it accumulates mergeable ``neuron_stats`` and the per-neuron top
contexts (``neuron_top``, a bounded top-k). The statistics are computed in numpy on
the host: its comparisons and reductions are several times faster than torch's on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial

import numpy as np
import pyarrow as pa
import torch

from sparsescope.probes.activity import code64, firing, pack_codes

TOP_K = 20
BLOCK = 8  # tokens per block of the top-k candidate search
SLICE_ROWS = 64 * BLOCK  # tokens per slice of a batch's statistics (< 2^16: uint16 counts)
_POS_BITS = 24  # key = seq_id << 24 | pos identifies a token of the run


def hook_names(layer: int, gated: bool) -> tuple[str, str | None]:
    """TransformerLens hook names: (hidden activation, gate pre-activation or None)."""
    post = f"blocks.{layer}.mlp.hook_post"
    return post, (f"blocks.{layer}.mlp.hook_pre" if gated else None)


@cache
def _threads() -> int:
    """Threads for the statistics: as many as torch uses (numpy releases the GIL)."""
    return max(1, torch.get_num_threads())


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_threads(), thread_name_prefix="mlp-probe")


def _row_slices(n: int) -> list[slice]:
    """``range(n)`` in slices of ``SLICE_ROWS``: a fixed size, so that the float32 partial
    sums, and hence the stored statistics, do not depend on the thread count."""
    return [slice(lo, min(lo + SLICE_ROWS, n)) for lo in range(0, n, SLICE_ROWS)]


def _row_stats(values: np.ndarray, gate: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-token rows and per-neuron partial sums of a slice of tokens."""
    fires = firing(values, gate).view(np.uint8)
    packed = pack_codes(fires)
    absval = np.abs(values)
    n_blocks = len(values) // BLOCK
    return {
        "n_active": np.bitwise_count(packed).sum(1, dtype=np.int32),
        "l1": absval.sum(1),
        "max_abs": absval.max(1),
        "packed": packed,
        "fired": fires.sum(0, dtype=np.uint16),
        "sum": values.sum(0),
        "sum_sq": np.einsum("ij,ij->j", values, values),
        "block_max": values[: n_blocks * BLOCK].reshape(n_blocks, BLOCK, values.shape[1]).max(1),
    }


def _host(tensor: torch.Tensor, d: int) -> np.ndarray:
    return tensor.detach().reshape(-1, d).float().cpu().numpy()


class MlpProbe:
    """Streaming firing statistics of every MLP layer."""

    def __init__(self, n_layers: int, d_mlp: int, gated: bool, top_k: int = TOP_K):
        self.n_layers, self.d_mlp, self.gated, self.top_k = n_layers, d_mlp, gated, top_k
        self.n_tokens = 0
        shape = (n_layers, d_mlp)
        self.n_active = np.zeros(shape, dtype=np.int64)
        self.sum = np.zeros(shape, dtype=np.float64)
        self.sum_sq = np.zeros(shape, dtype=np.float64)
        self.max = np.full(shape, -np.inf, dtype=np.float32)
        # per layer and neuron, the k best values (descending) and their token keys
        self.top_val = np.full((n_layers, top_k, d_mlp), -np.inf, dtype=np.float32)
        self.top_key = np.full((n_layers, top_k, d_mlp), -1, dtype=np.int64)
        self._gate: dict[int, np.ndarray] = {}
        self._keys = np.zeros(0, dtype=np.int64)
        self._seq = np.zeros(0, dtype=np.int64)
        self._pos = np.zeros(0, dtype=np.int32)
        self.rows: dict[str, list[pa.RecordBatch]] = {"layer_token_stats": [], "hash_codes": []}

    def hooks(self) -> list[tuple[str, Callable]]:
        """(hook name, callback) pairs for ``HookPoint.add_hook``."""
        out = []
        for layer in range(self.n_layers):
            post, gate = hook_names(layer, self.gated)
            if gate:
                out.append((gate, self._gate_hook(layer)))
            out.append((post, self._post_hook(layer)))
        return out

    def _gate_hook(self, layer: int) -> Callable:
        def hook(tensor, hook):
            self._gate[layer] = _host(tensor, self.d_mlp)

        return hook

    def _post_hook(self, layer: int) -> Callable:
        def hook(tensor, hook):
            self._observe(layer, _host(tensor, self.d_mlp), self._gate.pop(layer, None))

        return hook

    def start_batch(self, seq_ids: list[int], seq_len: int) -> None:
        self._seq = np.repeat(np.asarray(seq_ids, dtype=np.int64), seq_len)
        self._pos = np.tile(np.arange(seq_len, dtype=np.int32), len(seq_ids))
        self._keys = (self._seq << _POS_BITS) | self._pos
        self.n_tokens += len(self._seq)

    def _observe(self, layer: int, values: np.ndarray, gate: np.ndarray | None) -> None:
        """One layer of one batch: token rows and statistics, row slices in parallel."""
        slices = _row_slices(len(values))
        parts = list(
            _pool().map(lambda r: _row_stats(values[r], None if gate is None else gate[r]), slices)
        )
        stats = {name: [p[name] for p in parts] for name in parts[0]}
        self.n_active[layer] += sum(stats["fired"], np.zeros(self.d_mlp, np.int64))
        self.sum[layer] += sum(stats["sum"], np.zeros(self.d_mlp))  # slices added in float64
        self.sum_sq[layer] += sum(stats["sum_sq"], np.zeros(self.d_mlp))
        n_active = np.concatenate(stats["n_active"])
        packed = np.concatenate(stats["packed"])
        self._update_top(layer, values, np.concatenate(stats["block_max"]))

        layer_col = np.full(len(values), layer, dtype=np.int16)
        self.rows["layer_token_stats"].append(
            pa.record_batch(
                {
                    "seq_id": self._seq,
                    "pos": self._pos,
                    "layer": layer_col,
                    "n_active": n_active,
                    "l1": np.concatenate(stats["l1"]),
                    "max_abs": np.concatenate(stats["max_abs"]),
                }
            )
        )
        self.rows["hash_codes"].append(
            pa.record_batch(
                {
                    "seq_id": self._seq,
                    "pos": self._pos,
                    "layer": layer_col,
                    "code": pa.FixedSizeBinaryArray.from_buffers(
                        pa.binary(packed.shape[1]),
                        len(packed),
                        [None, pa.py_buffer(packed.tobytes())],
                    ).cast(pa.binary()),
                    "code64": code64(packed),
                    "n_active": n_active,
                }
            )
        )

    def _update_top(self, layer: int, values: np.ndarray, block_max: np.ndarray) -> None:
        """Merge a batch into the per-neuron top-k (value, token key) lists and the maxima;
        ranges of neurons in parallel."""
        tail = values[len(block_max) * BLOCK :]
        col_max = block_max.max(0) if len(tail) == 0 else np.vstack([block_max, tail]).max(0)
        self.max[layer] = np.maximum(self.max[layer], col_max)
        edges = np.linspace(0, self.d_mlp, _threads() + 1).astype(int)
        merge = partial(self._update_top_range, layer, values, block_max)
        list(_pool().map(merge, edges[:-1], edges[1:]))

    def _update_top_range(self, layer: int, values, block_max, lo: int, hi: int) -> None:
        """The top-k update of neurons ``lo:hi``.

        A token can enter a neuron's list only if it beats the list's k-th best (``old``),
        so only blocks (of ``BLOCK`` tokens) whose maximum beats it hold candidates. Where k
        or more blocks do ("busy" neurons, early in a run), the batch's k-th largest block
        maximum is a higher bound (k blocks hold k values that large): there the candidates
        are the tokens at least that large, in the blocks that reach it; of the blocks that
        only tie it, the first k suffice (ties go to the earlier token, as in a stable sort).
        """
        n_full, k = len(block_max) * BLOCK, self.top_k
        block_max, tail = block_max[:, lo:hi], values[n_full:, lo:hi]
        old = self.top_val[layer, -1, lo:hi]
        above = block_max > old
        is_busy = np.count_nonzero(above, axis=0) >= k
        blocks, cols = np.nonzero(above & ~is_busy)
        busy = np.flatnonzero(is_busy)
        bound, tie_ok = old.copy(), np.zeros(len(old), dtype=bool)
        if busy.size:
            sub = block_max[:, busy]
            bound[busy] = np.partition(np.ascontiguousarray(sub.T), -k, axis=1)[:, -k]
            tie_ok[busy] = True
            tie = sub == bound[busy]
            if (np.count_nonzero(tie, axis=0) > k).any():  # rare: say, a ReLU neuron's zeros
                tie &= np.cumsum(tie, axis=0, dtype=np.int32) <= k
            busy_blocks, busy_cols = np.nonzero((sub > bound[busy]) | tie)
            blocks = np.concatenate([blocks, busy_blocks])
            cols = np.concatenate([cols, busy[busy_cols]])
        rows = (blocks[:, None] * BLOCK + np.arange(BLOCK)).ravel()
        cols = np.repeat(cols, BLOCK)
        tail_rows, tail_cols = np.nonzero(tail >= bound)
        rows = np.concatenate([rows, tail_rows + n_full])
        cols = np.concatenate([cols, tail_cols])
        vals = values.ravel()[rows * values.shape[1] + cols + lo]
        keep = (vals > bound[cols]) | ((vals == bound[cols]) & tie_ok[cols])
        if keep.any():
            self._merge_top(layer, rows[keep], cols[keep] + lo, vals[keep])

    def _merge_top(self, layer: int, rows, cols, vals) -> None:
        """Rank candidate tokens with the old lists of their neurons; keep each one's k best.

        Two stable sorts, by value then by neuron; equal values keep their order here, which
        is token order: the old lists (earlier tokens, ranked) first, then the candidates.
        Empty slots of the old lists (value -inf) stay out and stay empty.
        """
        k, top_val, top_key = self.top_k, self.top_val[layer], self.top_key[layer]
        touched = np.unique(cols)
        old_val = top_val[:, touched].ravel()
        filled = old_val > -np.inf
        col = np.concatenate([np.tile(touched, k)[filled], cols])
        val = np.concatenate([old_val[filled], vals])
        key = np.concatenate([top_key[:, touched].ravel()[filled], self._keys[rows]])
        order = np.argsort(-val, kind="stable")
        by_col = col[order].astype(np.min_scalar_type(self.d_mlp))  # small ints: radix sort
        order = order[np.argsort(by_col, kind="stable")]
        col = col[order]
        first = np.flatnonzero(np.r_[True, col[1:] != col[:-1]])
        rank = np.arange(len(col)) - np.repeat(first, np.diff(np.r_[first, len(col)]))
        kept = rank < k
        top_val[rank[kept], col[kept]] = val[order[kept]]
        top_key[rank[kept], col[kept]] = key[order[kept]]

    def take_rows(self) -> dict[str, list[pa.RecordBatch]]:
        """The per-token rows gathered since the last call."""
        rows, self.rows = self.rows, {name: [] for name in self.rows}
        return rows

    def final_tables(self) -> dict[str, pa.Table]:
        return {"neuron_stats": self.neuron_stats(), "neuron_top": self.neuron_top()}

    def neuron_stats(self) -> pa.Table:
        layers = np.repeat(np.arange(self.n_layers, dtype=np.int16), self.d_mlp)
        neurons = np.tile(np.arange(self.d_mlp, dtype=np.int32), self.n_layers)
        return pa.table(
            {
                "layer": layers,
                "neuron": neurons,
                "n_tokens": np.full(len(layers), self.n_tokens, dtype=np.int64),
                "n_active": self.n_active.ravel(),
                "sum": self.sum.ravel(),
                "sum_sq": self.sum_sq.ravel(),
                "max": self.max.ravel(),
            }
        )

    def neuron_top(self) -> pa.Table:
        keys, vals = self.top_key, self.top_val  # [L, K, D]
        layer, rank, neuron = np.meshgrid(
            np.arange(self.n_layers), np.arange(self.top_k), np.arange(self.d_mlp), indexing="ij"
        )
        keep = (keys >= 0).ravel()
        k = keys.ravel()[keep]
        return pa.table(
            {
                "layer": layer.ravel()[keep].astype(np.int16),
                "neuron": neuron.ravel()[keep].astype(np.int32),
                "rank": rank.ravel()[keep].astype(np.int16),
                "seq_id": k >> _POS_BITS,
                "pos": (k & ((1 << _POS_BITS) - 1)).astype(np.int32),
                "value": vals.ravel()[keep],
            }
        )
