"""Owner of METHODS.md §1 (firing) and §4 (hash-code packing).

They live in probes/ because the probes compute them while the model runs and
``analysis`` depends on ``probes``, not the other way round.
"""

from __future__ import annotations

import numpy as np
import torch

Array = torch.Tensor | np.ndarray
_FNV_PRIME = np.uint64(0x100000001B3)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)


def firing_source(post: Array, gate_pre: Array | None = None, computed_only: bool = False) -> Array:
    """The array whose positive entries fire: the gate pre-activation of a gated MLP (or its
    sign, ``gate_pre > 0``, as the MLP probe keeps it), else the hidden activation itself.

    ``computed_only`` (a sparsified model, METHODS.md §1/§7): a neuron fires only where the
    sparse MLP computes it. ``post`` is then the activation after the sparse mask, so a plain
    MLP's rule is unchanged, and a gated neuron needs its gate to fire and its activation
    not to have been zeroed."""
    if gate_pre is None:
        return post
    return gate_pre * (post != 0) if computed_only else gate_pre


def firing(post: Array, gate_pre: Array | None = None) -> Array:
    """``a_i > 0``; gated MLPs: ``σ(gate_i) > 0``, i.e. ``gate_i > 0`` for SiLU/GELU gates.

    Works on torch tensors and numpy arrays alike (bool result of the same kind).
    """
    return firing_source(post, gate_pre) > 0


def pack_codes(fires: np.ndarray) -> np.ndarray:
    """Bit vectors [N, d] (bool) to packed bytes [N, ceil(d/8)], MSB-first (DuckDB BIT order)."""
    return np.packbits(fires, axis=1, bitorder="big")


def code64(packed: np.ndarray) -> np.ndarray:
    """A 64-bit FNV-1a-style hash of each packed code (for grouping; equal codes, equal hash)."""
    n, width = packed.shape
    pad = (-width) % 8
    words = np.ascontiguousarray(np.pad(packed, ((0, 0), (0, pad)))).view(np.uint64)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(words.shape[1]):
            h = (h ^ words[:, j]) * _FNV_PRIME
    return h
