"""``--sparsify METHOD:TARGET`` for probe jobs: run the probes on a sparsified model."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

from sparsescope.kernels.sparsify import METHODS, SparseHandle, sparsify
from sparsescope.probes import data as data_sources
from sparsescope.probes.batches import batches
from sparsescope.probes.models import LoadedModel

CALIBRATION_BATCHES = 4


def parse_sparsify(spec: str) -> tuple[str, float]:
    """``"METHOD:TARGET"`` (e.g. ``threshold:0.5``; ``relu-exact`` alone) -> (method, target)."""
    method, _, target = spec.partition(":")
    try:
        value = float(target) if target else 0.0
    except ValueError:
        value = -1.0
    if method not in METHODS or not 0.0 <= value < 1.0 or (not target and method != "relu-exact"):
        raise data_sources.DataError(
            f"--sparsify {spec!r}: use METHOD:TARGET with METHOD one of {', '.join(METHODS)}"
            " and TARGET in [0, 1), e.g. threshold:0.5"
        )
    return method, value


@contextmanager
def sparsified(
    model: LoadedModel,
    spec: str | None,
    data: str,
    seq_len: int,
    batch_size: int,
    n_batches: int = CALIBRATION_BATCHES,
) -> Iterator[SparseHandle | None]:
    """Sparsify ``model`` for the block (calibrated on the first ``n_batches`` batches of
    ``data``), then restore it; ``spec=None`` leaves the model dense."""
    if spec is None:
        yield None
        return
    method, target = parse_sparsify(spec)
    docs = data_sources.documents(data)
    calib = [b.input_ids for b in itertools.islice(batches(model.tokenizer, docs, seq_len,
                                                           batch_size), n_batches)]  # fmt: skip
    handle = sparsify(model, method, target, calib)
    try:
        yield handle
    finally:
        handle.restore()
