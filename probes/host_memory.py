"""Host memory of a probe job: freed activations reused by the next batch (glibc malloc).

A CPU forward allocates the same large blocks batch after batch. By default glibc serves
blocks over its mmap threshold (32 MiB at most) with fresh mappings and unmaps them when
freed, so every batch faults its activations in again: on a Llama-3-8B-shaped layer
(16 x 128 tokens x 14336 floats = 117 MB per tensor) that was 535k page faults and ~2 s
of kernel time per batch. During a job every block comes from the heap instead, which
keeps freed memory for reuse, and what the job keeps across batches lies elsewhere
(Arrow's pool: ``store.writer``), so the heap stops growing after the first batch; at the
end the free heap goes back to the system. Nothing happens off glibc.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc mallopt parameters
_MMAP_MAX_DEFAULT = 65536  # glibc's default M_MMAP_MAX
_TRIM_THRESHOLD = 1 << 30  # free heap top kept outside a job
_HEAP_GROWTH = 256 << 20  # heap growth (fragments) after which the free heap is trimmed


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


@cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):
        return None


@cache
def _keep_free_heap() -> None:
    """Once per process: blocks under 32 MiB come from the heap, and up to 1 GiB of free
    heap top is kept rather than handed back after each free (glibc's adaptive thresholds
    end at the first such setting, so this one stays)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


@contextmanager
def reused_memory() -> Iterator[None]:
    """Within the block, every block of any size comes from the heap (no mmap), so freed
    memory serves the next batch; on exit mmap is allowed again and the free heap trimmed."""
    libc = _libc()
    if libc is None:
        yield
        return
    _keep_free_heap()
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, -1)  # never: a batch at LLM widths frees over 1 GiB
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _MMAP_MAX_DEFAULT)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
        _trim_heap()


def _heap_size() -> int:
    """Bytes of the heap (glibc ``mallinfo2().arena``; 0 off glibc)."""
    libc = _libc()
    return libc.mallinfo2().arena if libc is not None else 0


def _trim_heap() -> None:
    """Give the free heap back to the system (glibc ``malloc_trim``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def trim_on_growth(heap_at_trim: int | None) -> int:
    """Trim the free heap once it grew by 256 MiB since the last trim (``heap_at_trim``;
    None after the first batch, whose heap is the reference); return the heap size to
    compare with next time.

    Freed memory is reused by the next batch's activations; this bounds what fragments
    could pile up (the MLP probe's MiniLM heap grew by ~6 kB per token without trims)."""
    if heap_at_trim is None:
        return _heap_size()
    if _heap_size() <= heap_at_trim + _HEAP_GROWTH:
        return heap_at_trim
    _trim_heap()
    return _heap_size()
