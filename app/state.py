"""Dashboard state: the store path and one cached read-only reader per store."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from sparsescope.store.catalog import is_store
from sparsescope.store.reader import Reader

STORE_ENV = "SPARSESCOPE_STORE"


@st.cache_resource(show_spinner=False)
def _reader(root: str) -> Reader:
    return Reader(root)


def store_path() -> Path:
    return Path(os.environ.get(STORE_ENV, "stores/demo"))


def reader() -> Reader:
    """The store's reader, refreshed when the catalog changed; stops the page if none."""
    root = store_path()
    if not is_store(root):
        st.warning(
            f"No SparseScope store at `{root}`. Create one with "
            f"`sparsescope probe --model minilm --data stdlib-docs --store {root}` "
            "or run `make demo`."
        )
        st.stop()
    r = _reader(str(root.resolve()))
    r.refresh(force=False)
    return r


def pick_run(r: Reader, runs, key: str = "run") -> str:
    """A select box of probe runs (labelled with model and size); returns a run id."""
    labels = {
        row.run_id: f"{row.name or row.run_id} · {row.model_id} · {row.n_tokens:,} tokens"
        for row in runs.itertuples()
    }
    return st.selectbox("Run", list(labels), format_func=labels.get, key=key)
