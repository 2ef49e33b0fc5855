"""Shared fixtures: a small MiniLM probe store and helpers to compare store states."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU; set before any module imports triton
    os.environ["TRITON_INTERPRET"] = "1"

from sparsescope.store.catalog import CATALOG  # noqa: E402

SMALL_TOKENS = 1536


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``sparsescope`` in a subprocess (real exit codes and stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "sparsescope.app.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def fingerprint(root: Path) -> dict[str, str]:
    """Content hash of every file under a store (empty dict if absent)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def hf_minilm_activations(tokens) -> dict[int, np.ndarray]:
    """GELU outputs [N, 1536] per layer from a plain HF BertModel with torch forward hooks,
    re-running stored tokens (columns seq_id, pos, token_id; sorted) one sequence at a time."""
    import torch
    from transformers import AutoModel

    from sparsescope.probes.models import minilm_path

    model = AutoModel.from_pretrained(minilm_path(), attn_implementation="eager").eval()
    acts: dict[int, list] = {}
    handles = [
        layer.intermediate.register_forward_hook(
            lambda mod, inp, out, i=i: acts.setdefault(i, []).append(out.reshape(-1, out.shape[-1]))
        )
        for i, layer in enumerate(model.encoder.layer)
    ]
    with torch.inference_mode():
        for _, seq in tokens.groupby("seq_id", sort=True):
            model(input_ids=torch.tensor(seq["token_id"].to_numpy())[None])
    for h in handles:
        h.remove()
    return {i: torch.cat(a).numpy() for i, a in acts.items()}


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The zoo's ``micro`` preset trained once (root for SPARSESCOPE_ZOO, manifest rows)."""
    from sparsescope.probes.zoo import train_zoo

    root = tmp_path_factory.mktemp("zoo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSESCOPE_ZOO", str(root))
        return root, train_zoo("micro")


@pytest.fixture(scope="session")
def minilm_store(tmp_path_factory) -> Path:
    """A store with one MiniLM probe run over the start of stdlib-docs."""
    from sparsescope.probes.job import ProbeConfig, run_probe

    root = tmp_path_factory.mktemp("stores") / "minilm"
    run_probe(
        "minilm",
        "stdlib-docs",
        root,
        ProbeConfig(max_tokens=SMALL_TOKENS, seq_len=64, batch_size=8),
        "small",
        quiet=True,
    )
    return root


@pytest.fixture
def store_copy(minilm_store, tmp_path) -> Path:
    """A private copy of the MiniLM store that a test may change."""
    dest = tmp_path / "store"
    shutil.copytree(minilm_store, dest)
    return dest


@pytest.fixture
def empty_store(tmp_path) -> Path:
    from sparsescope.store.catalog import init_store

    return init_store(tmp_path / "empty")


def catalog_path(root: Path) -> Path:
    return root / CATALOG


def pytest_sessionfinish(session, exitstatus):
    """Close cached dashboard readers so DuckDB connections do not outlive the interpreter."""
    import gc

    import streamlit as st

    st.cache_resource.clear()
    gc.collect()
