"""Sparsity laws: law fits and degenerate ones, PPL-p% thresholds, CETT, chunk-level
sparsity, the hints of the laws and dead-neuron pages on a store without checkpoint series."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from sparsescope.analysis import cett, laws
from sparsescope.analysis.chunks import cls_curve
from sparsescope.analysis.sparsity import activation_ratio
from sparsescope.analysis.zoo_laws import heldout_batches
from sparsescope.app.cli import app
from sparsescope.app.state import STORE_ENV
from sparsescope.kernels.thresholds import cett_error
from sparsescope.probes.models import load_model
from sparsescope.store.reader import Reader
from tests.conftest import hf_minilm_activations

DASHBOARD = str(Path(__file__).parents[1] / "app" / "dashboard.py")

TOKENS = np.array([0, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6, 2e6, 5e6, 1e7, 2e7])


@pytest.mark.parametrize(
    "form, truth",
    [
        ("decreasing", {"c": 0.8, "alpha": 0.4, "b": -1.0, "a0": 0.05}),
        ("increasing", {"c": 0.02, "alpha": 0.5, "a0": 0.3}),
    ],
)
def test_fits_recover_known_parameters(form, truth):
    fn = laws.FORMS[form][0]
    d = np.maximum(TOKENS, 1) / laws.SCALE
    noise = np.random.default_rng(0).normal(0, 2e-4, len(d))
    fit = laws.fit_law(TOKENS, fn(d, *truth.values()) + noise, form)
    assert fit is not None and fit.r2 > 0.999
    for name, value in truth.items():
        assert fit.params[name] == pytest.approx(value, rel=0.1, abs=0.01), name
    other = "increasing" if form == "decreasing" else "decreasing"
    wrong = laws.fit_law(TOKENS, fn(d, *truth.values()) + noise, other)
    assert wrong is None or wrong.r2 < fit.r2


GOOD = {"form": "decreasing", "c": 0.8, "alpha": 0.4, "b": -1.0, "a0": 0.05, "r2": 0.99,
        "n_points": 6}  # fmt: skip
INCREASING = {"form": "increasing", "b": None}


@pytest.mark.parametrize(
    "change, degenerate",
    [
        ({}, False),
        ({"n_points": 5}, True),  # 4 parameters need two points more
        ({**INCREASING, "n_points": 5}, False),  # 3 parameters
        ({**INCREASING, "n_points": 4}, True),
        ({"r2": float("nan")}, True),  # no fit
        ({"r2": None}, True),
        ({"r2": -6e-11}, True),  # a flat line: no better than the mean
        ({"r2": 0.09}, True),
        ({"r2": 0.11}, False),
        ({"a0": 1.0}, True),  # bounds [0, 1]
        ({"a0": 1 - 1e-9}, True),
        ({"a0": 0.0}, True),
        ({"a0": 0.999}, False),
        ({"c": 2e-8}, True),  # bounds [0, 1000]
        ({"c": 1e3}, True),
        ({"c": 0.01}, False),
        ({**INCREASING, "alpha": 0.010000000002}, True),  # bounds [0.01, 3]
        ({"alpha": 3.0}, True),
        ({"alpha": 0.0101}, False),
        ({"b": 5.0}, True),  # bounds [-20, 5]
        ({"b": -20.0}, True),
        ({"b": 4.99}, False),
    ],
)
def test_degenerate_fits(change, degenerate):
    row = {**GOOD, **change}
    assert bool(laws.is_degenerate(row)) == degenerate
    assert bool(laws.is_degenerate(pd.Series(row))) == degenerate  # a law_fits row


def test_evaluate_is_the_law():
    tokens = np.array([1e3, 1e6, 3e7])
    d = tokens / 1e6
    np.testing.assert_allclose(
        laws.evaluate(GOOD, tokens), np.exp(-0.8 * d**0.4 - 1.0) + 0.05, rtol=1e-12
    )
    increasing = {**GOOD, **INCREASING, "c": 0.02, "alpha": 0.5, "a0": 0.3}
    np.testing.assert_allclose(laws.evaluate(increasing, tokens), -0.02 * d**-0.5 + 0.3)


def _page(monkeypatch, store: Path, page: str) -> AppTest:
    monkeypatch.setenv(STORE_ENV, str(store))
    at = AppTest.from_file(DASHBOARD, default_timeout=120).run()
    at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


@pytest.mark.parametrize("page", ["views/sparsity_laws.py", "views/dead_neurons.py"])
def test_pages_without_series_hint_at_laws_or_the_demo(minilm_store, tmp_path, monkeypatch, page):
    store = tmp_path / "my store's"  # a space and a quote: the command must quote it
    shutil.copytree(minilm_store, store)  # one MiniLM probe run: no checkpoint series
    commands = [c.value for c in _page(monkeypatch, store, page).code]
    assert len(commands) == 1
    argv = shlex.split(commands[0])
    assert argv[:2] == ["sparsescope", "laws"] and argv[argv.index("--store") + 1] == str(store)
    assert CliRunner().invoke(app, [*argv[1:], "--help"]).exit_code == 0  # options exist

    (store / "demo").mkdir()  # the demo's worker is at its laws step
    now = time.time()
    step = {"pages": ["Sparsity laws", "Dead neurons"], "state": "running", "started": now}
    progress = {"pid": os.getpid(), "started": now, "steps": {"laws": step}}
    (store / "demo" / "progress.json").write_text(json.dumps(progress))
    at = _page(monkeypatch, store, page)
    assert not at.code
    assert any("computing this page's data now (step 'laws'" in i.value for i in at.info)


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    from sparsescope.probes.zoo import train_zoo

    rows = train_zoo("micro", out=tmp_path_factory.mktemp("zoo"), only="relu-l2-d32")
    return rows[-1]["path"]


def _plain_loss(path, batches, thresholds=None, norms=None) -> float:
    """Mean next-token loss with plain HF GPT-2 and torch hooks on each MLP's activation."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    handles = []
    if thresholds is not None:
        for i, block in enumerate(model.transformer.h):
            w_out_norm = block.mlp.c_proj.weight.norm(dim=1)  # Conv1D weight is [d_mlp, d_model]
            assert torch.allclose(w_out_norm, norms[i])

            def hook(mod, inp, out, t=thresholds[i], n=w_out_norm):
                return out * ((out.abs() * n) > t)

            handles.append(block.mlp.act.register_forward_hook(hook))
    total = count = 0
    with torch.inference_mode():
        for ids in batches:
            out = model(input_ids=ids, labels=ids)
            total += float(out.loss) * ids[:, 1:].numel()
            count += ids[:, 1:].numel()
    for h in handles:
        h.remove()
    return total / count


def test_ppl_p_search_lands_where_it_claims(micro_model):
    model = load_model(micro_model)
    batches = heldout_batches(model, 2048)
    result = cett.ppl_p_thresholds(model, batches, p=0.5)  # reachable for a micro model
    assert result.reached
    dense = _plain_loss(micro_model, batches)
    sparse = _plain_loss(micro_model, batches, result.thresholds, cett.w_out_norms(model))
    ratio = math.exp(sparse - dense)
    assert ratio == pytest.approx(1.005, rel=cett.PPL_TOL)
    assert result.ppl / result.ppl_dense == pytest.approx(ratio, rel=1e-4)
    assert all(0 < r < 1 for r in result.activation_ratio)


def test_cett_is_monotone_and_spans_zero_to_one(micro_model):
    model = load_model(micro_model)
    acts = cett.capture_post(model, heldout_batches(model, 512))
    w_out = model.bridge.blocks[0].mlp.W_out.detach().float()
    norms = cett.w_out_norms(model)[0]
    values = [cett_error(acts[0], w_out, norms, t) for t in (-1.0, 0.01, 0.1, 1.0, 1e9)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(1.0)
    assert values == sorted(values)
    # independent: one token by hand
    a, keep = acts[0][:1], (acts[0][:1].abs() * norms) <= 0.1
    expected = float(((a * keep) @ w_out).norm() / (a @ w_out).norm())
    assert cett_error(a, w_out, norms, 0.1) == pytest.approx(expected, rel=1e-5)


def test_cls_equals_chunk_unions_of_an_independent_forward(minilm_store):
    """CLS(c) from the stored codes against firing bits of a plain HF forward: whole chunks of
    c consecutive tokens of one sequence, 1 − |union| / d_mlp, averaged over all chunks."""
    reader = Reader(minilm_store)
    run_id = reader.sql("SELECT run_id FROM runs")["run_id"][0]
    tokens = reader.sql("SELECT seq_id, pos, token_id FROM tokens ORDER BY seq_id, pos")
    acts = hf_minilm_activations(tokens)
    starts = np.r_[0, np.cumsum(tokens.groupby("seq_id", sort=True).size().to_numpy())]
    curve = cls_curve(reader, run_id).set_index(["layer", "chunk"])["cls"]
    tls = activation_ratio(reader, run_id).set_index("layer")["sparsity"]
    for layer, a in acts.items():
        for c in (1, 2, 8, 32):
            chunks = [
                1.0 - (a[lo + k : lo + k + c] > 0).any(0).mean()
                for lo, hi in zip(starts[:-1], starts[1:], strict=True)
                for k in range(0, (hi - lo) // c * c, c)
            ]
            assert curve[(layer, c)] == pytest.approx(np.mean(chunks), abs=1e-5), (layer, c)
        assert curve[(layer, 1)] == pytest.approx(tls[layer], abs=1e-12)
