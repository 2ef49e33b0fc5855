"""SparseScope: a microscope for activation sparsity in transformers.

The sub-packages live in the repository root's folders (app/, probes/, kernels/,
store/, analysis/) and are imported as ``sparsescope.<part>``.
"""

__version__ = "0.1.0"
