"""The MLP probe's statistics in torch, on the device the model runs on.

The same definitions as the numba kernels of ``mlp_stats`` (METHODS.md §1, §4): a token
fires at neuron j where ``fire_src[t, j] > 0``; codes are packed MSB-first; each neuron's
top-k list is descending, and among equal values the earlier token keeps its place. Only
results leave the device: packed codes, three numbers per token and layer, and the run's
per-neuron accumulators at the end.
"""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # bit j of a byte is neuron 8·b + (7 − j)
_INDEX_BITS = 32


def pack_bits(fires: torch.Tensor) -> torch.Tensor:
    """Bool [N, d] -> uint8 [N, ceil(d/8)], MSB-first (``numpy.packbits(..., bitorder='big')``)."""
    n, d = fires.shape
    padded = torch.nn.functional.pad(fires.to(torch.uint8), (0, (-d) % 8))
    bits = padded.view(n, -1, 8) << _SHIFTS.to(fires.device)
    return bits.sum(-1, dtype=torch.uint8)


def token_rows(values: torch.Tensor, fires: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per token: ``n_active`` (int32), ``l1`` and ``max_abs`` (float32) of one layer."""
    magnitude = values.abs()
    return {
        "n_active": fires.sum(1, dtype=torch.int32),
        "l1": magnitude.sum(1),
        "max_abs": magnitude.amax(1),
    }


def _order(values: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is the float order of ``values`` (−0.0 = 0.0; NaN lowest)."""
    v = torch.nan_to_num(values, nan=float("-inf")) + 0.0  # −0.0 + 0.0 is +0.0
    bits = v.view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)


def merge_top_k(
    top_val: torch.Tensor, top_key: torch.Tensor, values: torch.Tensor, keys: torch.Tensor
) -> None:
    """Merge a batch into each neuron's descending top-k list, in place.

    ``top_val``/``top_key``: [d, k] (empty slots: −inf, key −1); ``values``: [N, d] of the
    batch, whose token t has key ``keys[t]``. Only neurons with a value above their k-th
    best are touched. Candidates are ordered by (value, earlier first): the list's entries
    come before the batch's tokens, which come in token order, so ties keep the earlier.
    """
    k = top_val.shape[1]
    cols = (values > top_val[:, -1]).any(0).nonzero().squeeze(1)
    if cols.numel() == 0:
        return
    cand_val = torch.cat([top_val[cols], values[:, cols].T], dim=1)  # [c, k + N]
    cand_key = torch.cat([top_key[cols], keys.expand(len(cols), -1)], dim=1)
    index = torch.arange(cand_val.shape[1], device=values.device)
    rank = (_order(cand_val) << _INDEX_BITS) | ((1 << _INDEX_BITS) - 1 - index)
    best = rank.topk(k, dim=1).values
    pick = (1 << _INDEX_BITS) - 1 - (best & ((1 << _INDEX_BITS) - 1))
    top_val[cols] = cand_val.gather(1, pick)
    top_key[cols] = cand_key.gather(1, pick)


def accumulators(n_layers: int, d_mlp: int, top_k: int, device: torch.device) -> dict:
    """A layer stack's per-neuron accumulators as tensors on ``device``, by name."""
    shape, top = (n_layers, d_mlp), (n_layers, d_mlp, top_k)
    return {
        "n_active": torch.zeros(shape, dtype=torch.int64, device=device),
        "sum": torch.zeros(shape, dtype=torch.float64, device=device),
        "sum_sq": torch.zeros(shape, dtype=torch.float64, device=device),
        "max": torch.full(shape, float("-inf"), device=device),
        "top_val": torch.full(top, float("-inf"), device=device),
        "top_key": torch.full(top, -1, dtype=torch.int64, device=device),
    }


def accumulate(
    acc: dict, layer: int, values: torch.Tensor, fires: torch.Tensor, keys: torch.Tensor
) -> None:
    """Add one batch of a layer to ``acc`` in place: ``values`` float32 [N, d], ``fires``
    bool [N, d], ``keys`` int64 [N]. Sums accumulate in float64."""
    acc["n_active"][layer] += fires.sum(0)
    wide = values.double()
    acc["sum"][layer] += wide.sum(0)
    acc["sum_sq"][layer] += (wide * wide).sum(0)
    acc["max"][layer] = torch.maximum(acc["max"][layer], values.amax(0))
    merge_top_k(acc["top_val"][layer], acc["top_key"][layer], values, keys)
