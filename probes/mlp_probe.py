"""The MLP probe: hooks on every layer's hidden activation, streaming statistics.

Per batch it emits Arrow rows for ``layer_token_stats`` and ``hash_codes`` (those the
``CodePolicy`` keeps); over the run it accumulates mergeable ``neuron_stats`` and the
per-neuron top contexts (``neuron_top``, a bounded top-k, with the neuron's activations around
each entry in ``neuron_top_window``), the activation density of every neuron over all tokens
(``neuron_density``, fixed bins) and a few sample tokens per neuron and bin
(``neuron_samples``). Where the statistics run:

- model on a CPU: the activations are read once per direction by the numba kernels of
  ``mlp_stats``, after the forward pass, on a thread pool (faster there than torch);
- model on another device (CUDA): ``device_stats`` computes them in torch on that device as
  each layer's activation appears, and only the results cross to the host.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import pyarrow as pa
import torch

from sparsescope.probes import device_stats, host_memory
from sparsescope.probes.activity import code64, firing_source
from sparsescope.probes.codes import CodePolicy
from sparsescope.probes.mlp_stats import (
    EMPTY_HASH,
    N_BINS,
    SAMPLES,
    WINDOW,
    neuron_columns,
    token_hash,
    token_key,
    token_place,
    token_rows,
)

TOP_K = 20


def hook_names(layer: int, gated: bool) -> tuple[str, str | None]:
    """TransformerLens hook names: (hidden activation, gate pre-activation or None)."""
    post = f"blocks.{layer}.mlp.hook_post"
    return post, (f"blocks.{layer}.mlp.hook_pre" if gated else None)


@cache
def _threads() -> int:
    """Threads for the statistics: as many as torch uses (the kernels release the GIL)."""
    return max(1, torch.get_num_threads())


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_threads(), thread_name_prefix="mlp-probe")


def _ranges(n: int) -> list[tuple[int, int]]:
    """``range(n)`` cut into one (lo, hi) range per statistics thread."""
    edges = np.linspace(0, n, _threads() + 1).astype(int).tolist()
    return list(zip(edges[:-1], edges[1:], strict=True))


def _host(tensor: torch.Tensor, d: int) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().reshape(-1, d).float().cpu().numpy())


STATE = (
    "n_active", "sum", "sum_sq", "max", "top_val", "top_key", "top_window",
    "density", "sample_hash", "sample_key", "sample_val",
)  # fmt: skip


class MlpProbe:
    """Streaming firing statistics of every MLP layer.

    ``stats_device``: None computes on the host (numba); a torch device computes there.
    ``sparse``: the model runs sparsified, so firing counts the neurons its MLP computes."""

    def __init__(
        self,
        n_layers: int,
        d_mlp: int,
        gated: bool,
        top_k: int = TOP_K,
        codes: CodePolicy = CodePolicy(),
        stats_device: torch.device | str | None = None,
        sparse: bool = False,
    ):
        self.n_layers, self.d_mlp, self.gated, self.top_k = n_layers, d_mlp, gated, top_k
        self.sparse = sparse  # the model runs sparsified: count what its MLP computes
        self.codes = codes
        self.stats_device = torch.device(stats_device) if stats_device is not None else None
        self.n_tokens = 0
        self.host_bytes = 0  # bytes the device path moved to the host (0 on the host path)
        self.stats_seconds = 0.0  # wall time of _compute_pending: host statistics, rows, transfers
        if self.stats_device is None:
            self._heap_at_trim: int | None = None  # set after the first batch
            shape = (n_layers, d_mlp)
            self.n_active = np.zeros(shape, dtype=np.int64)
            self.sum = np.zeros(shape, dtype=np.float64)
            self.sum_sq = np.zeros(shape, dtype=np.float64)
            self.max = np.full(shape, -np.inf, dtype=np.float32)
            # per layer and neuron, the k best values (descending) and their token keys
            self.top_val = np.full((n_layers, d_mlp, top_k), -np.inf, dtype=np.float32)
            self.top_key = np.full((n_layers, d_mlp, top_k), -1, dtype=np.int64)
            # and each entry's window (float32 here; rounded to float16 when written)
            window = (n_layers, d_mlp, top_k, 2 * WINDOW + 1)
            self.top_window = np.full(window, np.nan, dtype=np.float32)
            self.density = np.zeros((n_layers, d_mlp, N_BINS), dtype=np.int64)
            samples = (n_layers, d_mlp, N_BINS, SAMPLES)
            self.sample_hash = np.full(samples, EMPTY_HASH, dtype=np.int64)
            self.sample_key = np.full(samples, -1, dtype=np.int64)
            self.sample_val = np.full(samples, np.nan, dtype=np.float32)
        else:
            acc = device_stats.accumulators(n_layers, d_mlp, top_k, self.stats_device)
            for name in STATE:
                setattr(self, name, acc[name])
        self._gate: dict[int, object] = {}
        self._pending: list[tuple[int, np.ndarray, np.ndarray | None]] = []
        self._device_rows: list[tuple[int, dict[str, torch.Tensor]]] = []
        self._keys = self._hashes = self._order = np.zeros(0, dtype=np.int64)
        self._device_keys = self._device_hashes = torch.zeros(0, dtype=torch.int64)
        self._seq_len = 1
        self._code_rows: np.ndarray | None = None  # token rows whose codes are kept; None: all
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

    def _flat(self, tensor: torch.Tensor):
        """A hooked activation as float32 [tokens, d_mlp]: a host array or a device tensor."""
        if self.stats_device is None:
            return _host(tensor, self.d_mlp)
        return tensor.detach().reshape(-1, self.d_mlp).float()

    def _gate_hook(self, layer: int) -> Callable:
        def hook(tensor, hook):  # where the gate fires, not the gate: holding every
            # layer's float gate until the batch ends cost a Llama-3-8B-shaped CPU forward 7%
            fires = tensor.reshape(-1, self.d_mlp) > 0
            self._gate[layer] = fires.numpy() if self.stats_device is None else fires

        return hook

    def _post_hook(self, layer: int) -> Callable:
        def hook(tensor, hook):  # keeps a view: models do not modify activations in place
            values, gate = self._flat(tensor), self._gate.pop(layer, None)
            if self.stats_device is None:
                self._pending.append((layer, values, gate))
            else:
                self._device_layer(layer, values, gate)

        return hook

    def _device_layer(self, layer: int, values: torch.Tensor, gate: torch.Tensor | None) -> None:
        """Statistics of one layer on the device, as soon as its activation is there."""
        fires = firing_source(values, gate, self.sparse) > 0
        rows = device_stats.token_rows(values, fires)
        if self.codes.keeps_layer(layer):
            kept = fires if self._code_rows is None else fires[self._device_code_rows]
            rows["packed"] = device_stats.pack_bits(kept)
        self._device_rows.append((layer, rows))
        acc = {name: getattr(self, name) for name in STATE}
        device_stats.accumulate(
            acc, layer, values, fires, self._device_keys, self._device_hashes, self._seq_len
        )

    def start_batch(self, seq_ids: list[int], seq_len: int) -> None:
        self._compute_pending()  # of the previous batch, whose token keys are still set
        self._seq = np.repeat(np.asarray(seq_ids, dtype=np.int64), seq_len)
        self._pos = np.tile(np.arange(seq_len, dtype=np.int32), len(seq_ids))
        self._keys = token_key(self._seq, self._pos)
        self._hashes, self._seq_len = token_hash(self._keys), seq_len
        self._order = np.argsort(self._hashes, kind="stable")
        mask = self.codes.token_mask(self._seq)
        self._code_rows = None if mask is None else np.flatnonzero(mask)
        if self.stats_device is not None:
            self._device_keys = torch.from_numpy(self._keys).to(self.stats_device)
            self._device_hashes = torch.from_numpy(self._hashes).to(self.stats_device)
            if self._code_rows is not None:
                self._device_code_rows = torch.from_numpy(self._code_rows).to(self.stats_device)
        self.n_tokens += len(self._seq)

    def _compute_pending(self) -> None:
        """Statistics of the layers whose activations the hooks kept since the last call.

        Host path: they run after the forward pass, the token and neuron ranges of all layers
        at once on the thread pool, so that torch's threads (which spin a while after each op)
        no longer compete with them for the cores. Device path: the results computed in the
        hooks come to the host, one transfer per array."""
        start = time.perf_counter()
        device_rows, self._device_rows = self._device_rows, []
        for layer, rows in device_rows:
            self.host_bytes += sum(t.nbytes for t in rows.values())
            self._add_rows(layer, **{name: t.cpu().numpy() for name, t in rows.items()})
        pending, self._pending = self._pending, []
        columns = [getattr(self, name) for name in STATE]
        tasks, outputs = [], []
        for layer, values, gate in pending:
            n, d = values.shape
            fire_src = firing_source(values, gate, self.sparse)
            out = {
                "packed": np.empty((n, (d + 7) // 8), dtype=np.uint8),
                "n_active": np.empty(n, dtype=np.int32),
                "l1": np.empty(n, dtype=np.float32),
                "max_abs": np.empty(n, dtype=np.float32),
            }
            tasks += [
                _pool().submit(token_rows, values, fire_src, lo, hi, *out.values())
                for lo, hi in _ranges(n)
            ]
            layer_columns = [a[layer] for a in columns]
            batch = (values, fire_src, self._keys, self._hashes, self._order, self._seq_len)
            tasks += [
                _pool().submit(neuron_columns, *batch, lo, hi, *layer_columns)
                for lo, hi in _ranges(d)
            ]
            outputs.append((layer, out))
        for task in tasks:
            task.result()
        if pending:
            self._heap_at_trim = host_memory.trim_on_growth(self._heap_at_trim)
        for layer, out in outputs:
            if not self.codes.keeps_layer(layer):
                del out["packed"]
            elif self._code_rows is not None:
                out["packed"] = out["packed"][self._code_rows]
            self._add_rows(layer, **out)
        self.stats_seconds += time.perf_counter() - start

    def _add_rows(self, layer: int, n_active, l1, max_abs, packed=None) -> None:
        layer_col = np.full(len(n_active), layer, dtype=np.int16)
        self.rows["layer_token_stats"].append(
            pa.record_batch(
                {
                    "seq_id": self._seq,
                    "pos": self._pos,
                    "layer": layer_col,
                    "n_active": n_active,
                    "l1": l1,
                    "max_abs": max_abs,
                }
            )
        )
        if packed is None or len(packed) == 0:
            return
        rows = slice(None) if self._code_rows is None else self._code_rows
        self.rows["hash_codes"].append(
            pa.record_batch(
                {
                    "seq_id": self._seq[rows],
                    "pos": self._pos[rows],
                    "layer": layer_col[: len(packed)],
                    "code": pa.FixedSizeBinaryArray.from_buffers(
                        pa.binary(packed.shape[1]),
                        len(packed),
                        [None, pa.py_buffer(np.ascontiguousarray(packed).tobytes())],
                    ).cast(pa.binary()),
                    "code64": code64(packed),
                    "n_active": n_active[rows],
                }
            )
        )

    def take_rows(self) -> dict[str, list[pa.RecordBatch]]:
        """The per-token rows of the batches since the last call."""
        self._compute_pending()
        rows, self.rows = self.rows, {name: [] for name in self.rows}
        return rows

    def final_tables(self) -> dict[str, pa.Table]:
        self._compute_pending()
        if self.stats_device is not None:  # the accumulators come to the host once
            for name in STATE:
                self.host_bytes += getattr(self, name).nbytes
                setattr(self, name, getattr(self, name).cpu().numpy())
            self.stats_device = None
        return {
            "neuron_stats": self.neuron_stats(),
            "neuron_top": self.neuron_top(),
            "neuron_top_window": self.neuron_top_window(),
            "neuron_density": self.neuron_density(),
            "neuron_samples": self.neuron_samples(),
        }

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
        keys, vals = self.top_key, self.top_val  # [L, D, K]
        layer, neuron, rank = np.meshgrid(
            np.arange(self.n_layers), np.arange(self.d_mlp), np.arange(self.top_k), indexing="ij"
        )
        keep = (keys >= 0).ravel()
        seq_id, pos = token_place(keys.ravel()[keep])
        return pa.table(
            {
                "layer": layer.ravel()[keep].astype(np.int16),
                "neuron": neuron.ravel()[keep].astype(np.int32),
                "rank": rank.ravel()[keep].astype(np.int16),
                "seq_id": seq_id,
                "pos": pos,
                "value": vals.ravel()[keep],
            }
        )

    def neuron_top_window(self) -> pa.Table:
        """Per ``neuron_top`` row: the neuron's activations at pos − WINDOW .. pos + WINDOW of
        the entry's sequence (float16 precision; NaN outside the sequence)."""
        keys = self.top_key
        n_layers, d_mlp, top_k, width = self.top_window.shape
        layer, neuron, rank = np.meshgrid(
            np.arange(n_layers), np.arange(d_mlp), np.arange(top_k), indexing="ij"
        )
        keep = (keys >= 0).ravel()
        with np.errstate(over="ignore"):  # beyond float16: inf, as torch rounds on the device
            windows = self.top_window.reshape(-1, width)[keep].astype(np.float16)
        windows = windows.astype(np.float32)
        offsets = np.arange(0, windows.size + 1, width, dtype=np.int32)
        return pa.table(
            {
                "layer": layer.ravel()[keep].astype(np.int16),
                "neuron": neuron.ravel()[keep].astype(np.int32),
                "rank": rank.ravel()[keep].astype(np.int16),
                "window": pa.ListArray.from_arrays(offsets, windows.ravel()),
            }
        )

    def neuron_density(self) -> pa.Table:
        """The nonzero counts of each neuron's density bins (``mlp_stats.bin_bounds``)."""
        layer, neuron, bin_ = np.nonzero(self.density)
        return pa.table(
            {
                "layer": layer.astype(np.int16),
                "neuron": neuron.astype(np.int32),
                "bin": bin_.astype(np.int16),
                "count": self.density[layer, neuron, bin_],
            }
        )

    def neuron_samples(self) -> pa.Table:
        """Per neuron and bin, the kept tokens of smallest ``token_hash`` and their value."""
        kept = self.sample_key >= 0
        layer, neuron, bin_, _ = np.nonzero(kept)
        seq_id, pos = token_place(self.sample_key[kept])
        return pa.table(
            {
                "layer": layer.astype(np.int16),
                "neuron": neuron.astype(np.int32),
                "bin": bin_.astype(np.int16),
                "seq_id": seq_id,
                "pos": pos,
                "value": self.sample_val[kept].astype(np.float32),
            }
        )
