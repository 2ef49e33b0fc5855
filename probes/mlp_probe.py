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
    absval = np.abs(values)
    n_blocks = len(values) // BLOCK
    return {
        "n_active": fires.sum(1, dtype=np.int32),
        "l1": absval.sum(1),
        "max_abs": absval.max(1),
        "packed": pack_codes(fires),
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
        """Merge a batch into the per-neuron top-k (value, token key) lists and the maxima.

        A neuron's k best tokens of the batch lie in the k blocks (of ``BLOCK`` consecutive
        tokens) with the highest block maxima (``block_max``), plus the tokens after the
        last full block; and only neurons whose batch maximum beats their current k-th best
        can change. So only k·BLOCK candidate rows of those columns are ranked, in column
        slices in parallel.
        """
        tail = values[len(block_max) * BLOCK :]
        col_max = np.concatenate([block_max, tail]).max(0)
        self.max[layer] = np.maximum(self.max[layer], col_max)
        cols = np.flatnonzero(col_max > self.top_val[layer, -1])
        merge = partial(self._merge_top, layer, values, block_max)
        list(_pool().map(merge, [c for c in np.array_split(cols, _threads()) if c.size]))

    def _merge_top(self, layer: int, values: np.ndarray, block_max: np.ndarray, cols) -> None:
        n, d = values.shape
        k, n_blocks = self.top_k, len(block_max)
        top_val, top_key = self.top_val[layer], self.top_key[layer]
        tail = np.arange(n_blocks * BLOCK, n)
        # rank along the last axis, one row per neuron: numpy partitions that axis fastest
        if n_blocks > k:
            blocks = np.argpartition(-block_max[:, cols].T, k - 1, axis=1)[:, :k]
            rows = (blocks[:, :, None] * BLOCK + np.arange(BLOCK)).reshape(cols.size, -1)
            rows = np.concatenate([rows, np.broadcast_to(tail, (cols.size, tail.size))], axis=1)
        else:
            rows = np.broadcast_to(np.arange(n), (cols.size, n))
        cand_val = np.concatenate([top_val[:, cols].T, values.ravel()[rows * d + cols[:, None]]], 1)
        cand_key = np.concatenate([top_key[:, cols].T, self._keys[rows]], 1)
        best = np.argpartition(-cand_val, k - 1, axis=1)[:, :k]
        best_val = np.take_along_axis(cand_val, best, 1)
        order = np.take_along_axis(best, np.argsort(-best_val, axis=1, kind="stable"), 1)
        top_val[:, cols] = np.take_along_axis(cand_val, order, 1).T
        top_key[:, cols] = np.take_along_axis(cand_key, order, 1).T

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
