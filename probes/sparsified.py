"""``--sparsify METHOD:TARGET`` for probe jobs: run the probes on a sparsified model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sparsescope.kernels.thresholds import METHODS
from sparsescope.probes import data as data_sources
from sparsescope.probes.data import Data
from sparsescope.probes.models import LoadedModel

if TYPE_CHECKING:
    from sparsescope.kernels.sparsify import SparseHandle


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
    model: LoadedModel, spec: str | None, data: Data, seq_len: int, batch_size: int
) -> Iterator[SparseHandle | None]:
    """Sparsify ``model`` for the block (calibrated on the first batches of ``data``), then
    restore it; ``spec=None`` leaves the model dense."""
    if spec is None:
        yield None
        return
    from sparsescope.kernels.sparsify import calibration_batches, sparsify  # Triton: only here

    method, target = parse_sparsify(spec)
    calibration = calibration_batches(model.tokenizer, data, seq_len, batch_size)
    with sparsify(model, method, target, calibration) as handle:
        yield handle
