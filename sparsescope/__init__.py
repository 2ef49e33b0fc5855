"""SparseScope: a microscope for activation sparsity in transformers.

The Python API, for notebooks (the CLI calls the same functions)::

    import sparsescope as ss

    model = ss.load_model("minilm")          # a spec, or your TransformerBridge / HF model
    run_id = ss.probe(model, ["some text", "more text"], "stores/nb", max_tokens=10_000)
    df = ss.open_store("stores/nb").sql("SELECT * FROM layer_summary")
    with ss.sparsify(model, "threshold", 0.5, calibration=["some text"]):
        ...                                  # the model runs sparse; dense again after

The sub-packages live in the repository root's folders (app/, probes/, sparse_kernels/, store/,
analysis/) and are imported as ``sparsescope.<part>``; names here load on first use, so
``import sparsescope`` stays fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "load_model": "sparsescope.probes.models",
    "LoadedModel": "sparsescope.probes.models",
    "probe": "sparsescope.probes.job",
    "ProbeConfig": "sparsescope.probes.job",
    "open_store": "sparsescope.store.reader",
    "sparsify": "sparsescope.kernels.sparsify",
    "load_sae": "sparsescope.probes.sae",
    "train_sae": "sparsescope.analysis.sae_train",
    "TrainConfig": "sparsescope.analysis.sae_train",
    "make_task": "sparsescope.analysis.tasks",
    "task_from_records": "sparsescope.analysis.tasks:from_records",
    "circuits": "sparsescope.analysis.circuits",
    "BadInput": "sparsescope.store.errors",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'sparsescope' has no attribute {name!r}")
    module, _, attr = _API[name].partition(":")
    value = getattr(import_module(module), attr or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
