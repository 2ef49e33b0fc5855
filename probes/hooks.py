"""Attach callbacks to a TransformerBridge's hook points for the length of a block."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager


@contextmanager
def hooked(bridge, hooks: Sequence[tuple[str, Callable]]) -> Iterator[None]:
    """``with hooked(bridge, [(name, fn), ...]):`` — fn(tensor, hook) may return a new tensor."""
    points = [bridge.hook_dict[name] for name, _ in hooks]
    for point, (_, fn) in zip(points, hooks, strict=True):
        point.add_hook(fn)
    try:
        yield
    finally:
        for point in points:
            point.remove_hooks()


def hook_widths(bridge, names: Sequence[str]) -> dict[str, int]:
    """The last dimension of each named hook's activation, from a one-token forward pass of
    the bridge's backbone (hooks the bridge lacks are left out)."""
    import torch

    widths: dict[str, int] = {}

    def width(name: str) -> Callable:
        def record(t, hook):
            widths[name] = t.shape[-1]
            return t

        return record

    model = bridge.original_model
    device = next(model.parameters()).device
    hooks = [(n, width(n)) for n in names if n in bridge.hook_dict]
    with torch.inference_mode(), hooked(bridge, hooks):
        model.base_model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    return widths
