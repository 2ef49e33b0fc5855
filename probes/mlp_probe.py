"""The MLP probe: hooks on every layer's hidden activation, streaming statistics.

Per batch it emits Arrow rows for ``layer_token_stats`` and ``hash_codes``; over
the run it accumulates mergeable ``neuron_stats`` and the per-neuron top
contexts (``neuron_top``, a bounded top-k kept as tensors).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch

from sparsescope.probes.activity import code64, firing, pack_codes

TOP_K = 20
_POS_BITS = 24  # key = seq_id << 24 | pos identifies a token of the run


def hook_names(layer: int, gated: bool) -> tuple[str, str | None]:
    """TransformerLens hook names: (hidden activation, gate pre-activation or None)."""
    post = f"blocks.{layer}.mlp.hook_post"
    return post, (f"blocks.{layer}.mlp.hook_pre" if gated else None)


def batch_top_k(values: torch.Tensor, k: int, block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over tokens (dim 0) of values [N, d]: (values [k', d], token indices [k', d]).

    Cheaper than ``values.topk(k, dim=0)``: a neuron's k best tokens lie in its k blocks
    (of ``block`` consecutive tokens) with the highest block maxima, so only those
    k·block rows per neuron are ranked.
    """
    n, d = values.shape
    n_blocks = n // block
    if n_blocks <= k:
        return values.topk(min(k, n), dim=0)
    block_max = values[: n_blocks * block].view(n_blocks, block, d).amax(1)
    top_blocks = block_max.topk(k, dim=0).indices  # [k, d]
    offsets = torch.arange(block, device=values.device).view(1, block, 1)
    rows = (top_blocks.unsqueeze(1) * block + offsets).reshape(k * block, d)
    tail = n - n_blocks * block
    if tail:
        rest = torch.arange(n_blocks * block, n, device=values.device).view(tail, 1).expand(tail, d)
        rows = torch.cat([rows, rest])
    cand = values.gather(0, rows)
    val, pos = cand.topk(k, dim=0)
    return val, rows.gather(0, pos)


class MlpProbe:
    """Streaming firing statistics of every MLP layer."""

    def __init__(
        self,
        n_layers: int,
        d_mlp: int,
        gated: bool,
        top_k: int = TOP_K,
        device: str | torch.device = "cpu",
    ):
        self.n_layers, self.d_mlp, self.gated, self.top_k = n_layers, d_mlp, gated, top_k
        self.n_tokens = 0
        shape = (n_layers, d_mlp)
        self.n_active = torch.zeros(shape, dtype=torch.int64, device=device)
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(shape, dtype=torch.float64, device=device)
        self.max = torch.full(shape, -torch.inf, device=device)
        self.top_val = torch.full((n_layers, top_k, d_mlp), -torch.inf, device=device)
        self.top_key = torch.full((n_layers, top_k, d_mlp), -1, dtype=torch.int64, device=device)
        self._gate: dict[int, torch.Tensor] = {}
        self._keys: torch.Tensor | None = None
        self._batch_keys_np: tuple[np.ndarray, np.ndarray] | None = None
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
            self._gate[layer] = tensor.detach()

        return hook

    def _post_hook(self, layer: int) -> Callable:
        def hook(tensor, hook):
            self._observe(layer, tensor.detach(), self._gate.pop(layer, None))

        return hook

    def start_batch(self, seq_ids: list[int], seq_len: int) -> None:
        seq = torch.tensor(seq_ids, dtype=torch.int64).repeat_interleave(seq_len)
        pos = torch.arange(seq_len, dtype=torch.int64).repeat(len(seq_ids))
        self._keys = ((seq << _POS_BITS) | pos).to(self.n_active.device)
        self._batch_keys_np = (seq.numpy(), pos.numpy().astype(np.int32))
        self.n_tokens += len(seq)

    def _observe(self, layer: int, post: torch.Tensor, gate: torch.Tensor | None) -> None:
        values = post.reshape(-1, self.d_mlp).float()
        gate_np = None if gate is None else gate.reshape(-1, self.d_mlp).float().cpu().numpy()
        # in numpy: comparisons and bool sums are several times faster than torch's on CPU
        fires = firing(values.cpu().numpy(), gate_np).view(np.uint8)
        n_tok = values.shape[0]
        n_active_np = fires.sum(1, dtype=np.int32)
        absval = values.abs()
        self.n_active[layer] += torch.from_numpy(fires.sum(0, dtype=np.int64)).to(values.device)
        self.sum[layer] += values.sum(0).double()
        self.sum_sq[layer] += (values * values).sum(0).double()
        self.max[layer] = torch.maximum(self.max[layer], values.amax(0))
        self._update_top(layer, values)

        seq, pos = self._batch_keys_np
        layer_col = np.full(n_tok, layer, dtype=np.int16)
        packed = pack_codes(fires)
        self.rows["layer_token_stats"].append(
            pa.record_batch(
                {
                    "seq_id": seq,
                    "pos": pos,
                    "layer": layer_col,
                    "n_active": n_active_np,
                    "l1": absval.sum(1).cpu().numpy(),
                    "max_abs": absval.amax(1).cpu().numpy(),
                }
            )
        )
        self.rows["hash_codes"].append(
            pa.record_batch(
                {
                    "seq_id": seq,
                    "pos": pos,
                    "layer": layer_col,
                    "code": pa.FixedSizeBinaryArray.from_buffers(
                        pa.binary(packed.shape[1]),
                        len(packed),
                        [None, pa.py_buffer(packed.tobytes())],
                    ).cast(pa.binary()),
                    "code64": code64(packed),
                    "n_active": n_active_np,
                }
            )
        )

    def _update_top(self, layer: int, values: torch.Tensor) -> None:
        """Merge a batch into the per-neuron top-k (value, token key) lists.

        Only neurons whose batch maximum beats their current k-th best can change, so
        only those columns are ranked (most of them, early on; few, later).
        """
        top_val, top_key = self.top_val[layer], self.top_key[layer]
        cols = (values.amax(0) > top_val[-1]).nonzero().squeeze(1)
        if cols.numel() == 0:
            return
        sub = values.index_select(1, cols)
        val, idx = batch_top_k(sub, self.top_k)
        cand_val = torch.cat([top_val.index_select(1, cols), val])
        cand_key = torch.cat([top_key.index_select(1, cols), self._keys[idx]])
        best_val, best = cand_val.topk(self.top_k, dim=0)
        top_val[:, cols] = best_val
        top_key[:, cols] = cand_key.gather(0, best)

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
                "n_active": self.n_active.cpu().numpy().ravel(),
                "sum": self.sum.cpu().numpy().ravel(),
                "sum_sq": self.sum_sq.cpu().numpy().ravel(),
                "max": self.max.cpu().numpy().ravel(),
            }
        )

    def neuron_top(self) -> pa.Table:
        keys = self.top_key.cpu().numpy()  # [L, K, D]
        vals = self.top_val.cpu().numpy()
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
