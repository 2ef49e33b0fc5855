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
