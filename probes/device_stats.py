"""The MLP probe's statistics in torch, on the device the model runs on.

The same definitions as the numba kernels of ``mlp_stats`` (METHODS.md §1, §4): a token
fires at neuron j where ``fire_src[t, j] > 0``; codes are packed MSB-first; each neuron's
top-k list is descending, and among equal values the earlier token keeps its place; each
entry keeps its window of activations; density bins and per-bin samples (smallest token
hash, the earlier token among equals) as ``mlp_stats`` defines them. Only results leave the
device: packed codes, three numbers per token and layer, and the run's per-neuron
accumulators at the end.
"""

from __future__ import annotations

import torch

from sparsescope.probes.mlp_stats import (
    EMPTY_HASH,
    FIRST_CODE,
    N_BINS,
    NAN_BIN,
    SAMPLES,
    WINDOW,
    ZERO_BIN,
)

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
    top_val: torch.Tensor,
    top_key: torch.Tensor,
    values: torch.Tensor,
    keys: torch.Tensor,
    top_window: torch.Tensor | None = None,
    seq_len: int = 1,
) -> None:
    """Merge a batch into each neuron's descending top-k list, in place.

    ``top_val``/``top_key``: [d, k] (empty slots: −inf, key −1); ``values``: [N, d] of the
    batch (sequences of ``seq_len`` tokens one after the other), whose token t has key
    ``keys[t]``. Only neurons with a value above their k-th best are touched. Candidates are
    ordered by (value, earlier first): the list's entries come before the batch's tokens,
    which come in token order, so ties keep the earlier. ``top_window`` [d, k, 2W + 1], if
    given, follows the lists: a batch token enters with the neuron's activations over its
    ±W tokens (NaN outside its sequence).
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
    if top_window is not None:
        top_window[cols] = _windows(top_window[cols], pick, values, cols, seq_len)


def _windows(old: torch.Tensor, pick: torch.Tensor, values: torch.Tensor, cols, seq_len: int):
    """The windows of the picked candidates: list entries (``pick < k``) keep theirs, batch
    tokens (``pick − k``) get their columns' activations at t − W .. t + W."""
    k, w = old.shape[1], (old.shape[2] - 1) // 2
    offsets = torch.arange(-w, w + 1, device=values.device)
    token = (pick - k).clamp(min=0)
    rows = token[..., None] + offsets  # [c, k, 2W + 1]
    inside = ((token % seq_len)[..., None] + offsets >= 0) & (
        (token % seq_len)[..., None] + offsets < seq_len
    )
    fresh = values[rows.clamp(0, len(values) - 1), cols[:, None, None]]
    fresh = torch.where(inside, fresh, float("nan")).to(old.dtype)
    kept = old.gather(1, pick.clamp(max=k - 1)[..., None].expand_as(old))
    return torch.where((pick < k)[..., None], kept, fresh)


def density_bins(values: torch.Tensor) -> torch.Tensor:
    """The density bin (``mlp_stats.bin_bounds``) of each float32 value, as int64."""
    bits = values.contiguous().view(torch.int32).long()
    mag = bits & 0x7FFFFFFF
    step = (((mag >> 22) - FIRST_CODE).clamp(0, ZERO_BIN - 1) + 1) * (mag != 0)
    bins = ZERO_BIN + step - 2 * step * (bits < 0)
    return torch.where(mag > 0x7F800000, NAN_BIN, bins)


def bin_groups(values: torch.Tensor) -> torch.Tensor:
    """``j · N_BINS + bin`` of each value of ``values`` [N, d], flattened row by row."""
    column = torch.arange(values.shape[1], device=values.device)
    return (density_bins(values) + N_BINS * column).reshape(-1)


def merge_samples(
    sample_hash: torch.Tensor,
    sample_key: torch.Tensor,
    sample_val: torch.Tensor,
    values: torch.Tensor,
    group: torch.Tensor,
    hashes: torch.Tensor,
    keys: torch.Tensor,
) -> None:
    """Merge a batch into each (neuron, bin)'s sample of the S tokens of smallest hash, in
    place: ``sample_*`` [d, N_BINS, S] ascending by hash (empty: ``EMPTY_HASH``, key −1, NaN);
    ``values`` [N, d]; ``group`` [N · d]: ``j · N_BINS + bin`` of each value (``bin_groups``);
    ``hashes``/``keys`` [N]. Among equal hashes the sample's entries come first, then the
    batch's tokens in token order."""
    n, d = values.shape
    s = sample_hash.shape[2]
    order = torch.sort(hashes, stable=True).indices  # tokens by hash, earlier first
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=values.device)
    column = torch.arange(d, device=values.device)
    ranks = rank[:, None].expand(n, d).reshape(-1)
    picks = []
    for _ in range(s):  # the s smallest ranks of each group, one at a time
        best = torch.full((d * N_BINS,), n, dtype=ranks.dtype, device=values.device)
        best = best.scatter_reduce(0, group, ranks, "amin")
        picks.append(best)
        ranks = torch.where(ranks == best[group], n, ranks)
    picked = torch.stack(picks, 1).view(d, N_BINS, s)
    found = picked < n
    token = order[picked.clamp(max=n - 1)]
    cand_hash = torch.cat([sample_hash, torch.where(found, hashes[token], EMPTY_HASH)], 2)
    cand_key = torch.cat([sample_key, torch.where(found, keys[token], -1)], 2)
    fresh = torch.where(found, values[token, column[:, None, None]], float("nan"))
    cand_val = torch.cat([sample_val, fresh], 2)
    keep = torch.sort(cand_hash, dim=2, stable=True).indices[..., :s]
    sample_hash.copy_(cand_hash.gather(2, keep))
    sample_key.copy_(cand_key.gather(2, keep))
    sample_val.copy_(cand_val.gather(2, keep))


def accumulators(n_layers: int, d_mlp: int, top_k: int, device: torch.device) -> dict:
    """A layer stack's per-neuron accumulators as tensors on ``device``, by name (the top-k
    windows in float16, the precision they are stored in)."""
    shape, top = (n_layers, d_mlp), (n_layers, d_mlp, top_k)
    samples = (n_layers, d_mlp, N_BINS, SAMPLES)
    return {
        "n_active": torch.zeros(shape, dtype=torch.int64, device=device),
        "sum": torch.zeros(shape, dtype=torch.float64, device=device),
        "sum_sq": torch.zeros(shape, dtype=torch.float64, device=device),
        "max": torch.full(shape, float("-inf"), device=device),
        "top_val": torch.full(top, float("-inf"), device=device),
        "top_key": torch.full(top, -1, dtype=torch.int64, device=device),
        "top_window": torch.full(
            (*top, 2 * WINDOW + 1), float("nan"), dtype=torch.float16, device=device
        ),
        "density": torch.zeros((*shape, N_BINS), dtype=torch.int64, device=device),
        "sample_hash": torch.full(samples, EMPTY_HASH, dtype=torch.int64, device=device),
        "sample_key": torch.full(samples, -1, dtype=torch.int64, device=device),
        "sample_val": torch.full(samples, float("nan"), device=device),
    }


def accumulate(
    acc: dict,
    layer: int,
    values: torch.Tensor,
    fires: torch.Tensor,
    keys: torch.Tensor,
    hashes: torch.Tensor,
    seq_len: int,
) -> None:
    """Add one batch of a layer to ``acc`` in place: ``values`` float32 [N, d] (sequences of
    ``seq_len`` tokens), ``fires`` bool [N, d], ``keys`` and ``hashes`` int64 [N]. Sums
    accumulate in float64."""
    acc["n_active"][layer] += fires.sum(0)
    wide = values.double()
    acc["sum"][layer] += wide.sum(0)
    acc["sum_sq"][layer] += (wide * wide).sum(0)
    acc["max"][layer] = torch.maximum(acc["max"][layer], values.amax(0))
    top = acc["top_val"][layer], acc["top_key"][layer]
    merge_top_k(*top, values, keys, acc["top_window"][layer], seq_len)
    group, d = bin_groups(values), values.shape[1]
    acc["density"][layer] += torch.bincount(group, minlength=d * N_BINS).view(d, N_BINS)
    samples = (acc[name][layer] for name in ("sample_hash", "sample_key", "sample_val"))
    merge_samples(*samples, values, group, hashes, keys)
