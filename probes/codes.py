"""Which hash codes a probe keeps (``--codes``): the storage policy for wide models.

A code takes ``ceil(d_mlp / 8)`` bytes per token and layer: 1.8 kB at Llama-3-8B's width,
57 kB per token over its 32 layers. Specs:

- ``all``: every token at every layer; ``none``: no codes;
- ``every:K``: every layer, for the sequences whose ``seq_id`` is a multiple of K (a
  sample that keeps whole sequences, so Hamming search and redundancy work inside it);
- ``layers:L1,L2,...``: every token, at those layers only;
- ``auto`` (the default): ``all`` when one token's codes over all layers fit in
  ``CODE_BUDGET`` bytes, else ``every:K`` with the smallest K that fits on average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sparsescope.store.errors import BadInput

CODE_BUDGET = 2048  # bytes of codes per token that ``auto`` keeps on average


class CodesError(BadInput):
    """A ``--codes`` spec that cannot be used; the message is one line."""


@dataclass(frozen=True)
class CodePolicy:
    every: int = 1  # keep sequences with seq_id % every == 0; 0 keeps none
    layers: tuple[int, ...] | None = None  # None: every layer

    @property
    def spec(self) -> str:
        """The policy as a resolved ``--codes`` spec (stored in the run's config)."""
        if self.every == 0:
            return "none"
        if self.layers is not None:
            return "layers:" + ",".join(map(str, self.layers))
        return "all" if self.every == 1 else f"every:{self.every}"

    def keeps_layer(self, layer: int) -> bool:
        return self.every > 0 and (self.layers is None or layer in self.layers)

    def token_mask(self, seq: np.ndarray) -> np.ndarray | None:
        """Bool mask of the tokens (by their seq_id) whose codes are kept; None: all."""
        if self.every <= 1:
            return None if self.every == 1 else np.zeros(len(seq), dtype=bool)
        return seq % self.every == 0


def parse_codes(spec: str, n_layers: int, d_mlp: int) -> CodePolicy:
    """Resolve a ``--codes`` spec for a model of ``n_layers`` × ``d_mlp``."""
    kind, _, arg = spec.partition(":")
    if kind == "auto" and not arg:
        per_token = n_layers * math.ceil(d_mlp / 8)
        return CodePolicy(every=max(1, math.ceil(per_token / CODE_BUDGET)))
    if kind in ("all", "none") and not arg:
        return CodePolicy(every=int(kind == "all"))
    try:
        numbers = [int(x) for x in arg.split(",")] if arg else []
    except ValueError:
        numbers = []
    if kind == "every" and len(numbers) == 1 and numbers[0] >= 1:
        return CodePolicy(every=numbers[0])
    if kind == "layers" and numbers and all(0 <= x < n_layers for x in numbers):
        return CodePolicy(layers=tuple(sorted(set(numbers))))
    raise CodesError(
        f"--codes {spec!r}: use auto, all, none, every:K (K ≥ 1) or layers:L1,L2"
        f" (layers 0..{n_layers - 1})"
    )
