"""Neuron browser: stored top contexts against a brute-force top-k from a plain Hugging Face
forward with torch hooks; AppTest of both neuron pages on MiniLM and on an empty store."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest
from transformers import AutoTokenizer, BertModel

from sparsescope.analysis.dead_neurons import layer_summary, top_contexts
from sparsescope.app.charts_neurons import context_html
from sparsescope.app.state import STORE_ENV
from sparsescope.probes.batches import batches
from sparsescope.probes.data import documents
from sparsescope.probes.models import minilm_path
from sparsescope.store.reader import Reader
from tests.conftest import SMALL_TOKENS

VIEWS = Path(__file__).parents[1] / "app" / "views"
SEQ_LEN, BATCH, TOP_K, WINDOW = 64, 8, 20, 8  # as the minilm_store fixture probes
DASHBOARD = """import streamlit as st
st.navigation([
    st.Page("views/dead_neurons.py", title="Dead neurons"),
    st.Page("views/neuron_browser.py", title="Neuron browser"),
]).run()
"""
TOKEN_IDS = "SELECT token_id FROM tokens WHERE run_id = ? ORDER BY seq_id, pos"


def dashboard_app(monkeypatch, tmp_path: Path, store: Path) -> AppTest:
    """AppTest of a throw-away dashboard holding the two neuron pages."""
    folder = tmp_path / "dashboard"
    folder.mkdir(exist_ok=True)
    (folder / "dashboard.py").write_text(DASHBOARD)
    if not (folder / "views").exists():
        (folder / "views").symlink_to(VIEWS)
    monkeypatch.setenv(STORE_ENV, str(store))
    return AppTest.from_file(str(folder / "dashboard.py"), default_timeout=120)


@pytest.fixture(scope="module")
def minilm_truth(minilm_store):
    """Token ids [seq, pos] and MiniLM's MLP activations [layer, seq, pos, neuron] from HF."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    docs = documents("stdlib-docs")
    ids = torch.cat([b.input_ids for b in batches(tokenizer, docs, SEQ_LEN, BATCH, SMALL_TOKENS)])
    model = BertModel.from_pretrained(minilm_path()).eval()
    acts = []
    handles = [
        layer.intermediate.register_forward_hook(lambda m, i, o: acts.append(o.detach()))
        for layer in model.encoder.layer
    ]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    for h in handles:
        h.remove()
    return tokenizer, model, ids, torch.stack(acts).numpy()


def test_top_contexts_equal_brute_force_top_k(minilm_store, minilm_truth):
    tokenizer, _, ids, acts = minilm_truth
    reader = Reader(minilm_store)
    run_id = reader.sql("SELECT run_id FROM runs").iloc[0, 0]
    stored = reader.sql(TOKEN_IDS, [run_id])
    assert np.array_equal(stored["token_id"].to_numpy(), ids.reshape(-1).numpy())
    seq_len = ids.shape[1]
    rng = np.random.default_rng(0)
    for layer in (0, 3, 5):
        flat = acts[layer].reshape(-1, acts.shape[-1])
        firing = (flat > 0).sum(0)
        for neuron in {int(firing.argmax()), int(firing.argmin()), *rng.integers(0, 1536, 4)}:
            values = flat[:, neuron]
            order = np.argsort(-values, kind="stable")
            got = top_contexts(reader, run_id, layer, neuron, WINDOW)
            assert got["rank"].tolist() == list(range(TOP_K))
            np.testing.assert_allclose(got["value"], values[order[:TOP_K]], atol=1e-4)
            keys = set(zip(got["seq_id"], got["pos"], strict=True))
            if values[order[TOP_K - 1]] - values[order[TOP_K]] > 1e-4:  # no tie at the cut
                assert keys == {(int(i) // seq_len, int(i) % seq_len) for i in order[:TOP_K]}
            for row in got.itertuples():
                seq = ids[row.seq_id].tolist()
                names = [tokenizer.decode([t]) for t in seq]
                assert values[row.seq_id * seq_len + row.pos] == pytest.approx(row.value, abs=1e-4)
                assert row.token == names[row.pos]
                assert row.before == names[max(0, row.pos - WINDOW) : row.pos]
                assert row.after == names[row.pos + 1 : row.pos + 1 + WINDOW]


def test_context_html_escapes_and_highlights():
    import pandas as pd

    df = pd.DataFrame([{"rank": 0, "value": 1.5, "seq_id": 3, "pos": 1, "token": "<b>"}]).assign(
        before=[["a&"]], after=[['"x"']]
    )
    html = context_html(df)
    assert "<b>" not in html and "&lt;b&gt;" in html and "a&amp;" in html
    assert re.search(r"<mark[^>]*>&lt;b&gt;</mark>", html)


def test_pages_on_the_minilm_store(monkeypatch, tmp_path, minilm_store, minilm_truth):
    _, model, _, acts = minilm_truth
    reader = Reader(minilm_store)
    run_id = reader.sql("SELECT run_id FROM runs").iloc[0, 0]
    fires = (acts > 0).reshape(acts.shape[0], -1, acts.shape[-1]).sum(1)  # [layer, neuron]
    summary = layer_summary(reader, run_id)
    assert summary["dead"].tolist() == (fires == 0).sum(1).tolist()
    assert summary["dense"].tolist() == (fires / SMALL_TOKENS > 0.1).sum(1).tolist()

    at = dashboard_app(monkeypatch, tmp_path, minilm_store).run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Dead"] == str((fires == 0).sum())
    assert metrics["Dense"] == str((fires / SMALL_TOKENS > 0.1).sum())
    assert len(at.get("plotly_chart")) == 2  # categories and per-layer histograms
    assert at.get("page_link")

    layer, neuron = 2, int(fires[2].argmax())
    at = dashboard_app(monkeypatch, tmp_path, minilm_store)
    at.query_params.update({"run": run_id, "layer": str(layer), "neuron": str(neuron)})
    at.switch_page("views/neuron_browser.py").run()
    assert not at.exception, at.exception
    assert at.selectbox[1].value == layer and at.number_input[0].value == neuron
    assert "<mark" in at.get("html")[0].proto.body
    at.toggle[0].set_value(True).run()
    assert not at.exception, at.exception
    w_out = model.encoder.layer[layer].output.dense.weight[:, neuron]  # Linear [d_model, d_mlp]
    logits = model.embeddings.word_embeddings.weight @ w_out
    top = at.dataframe[0].value
    assert top["token_id"].tolist() == logits.topk(10).indices.tolist()


@pytest.mark.parametrize("page", ["views/dead_neurons.py", "views/neuron_browser.py"])
def test_pages_help_on_an_empty_store(monkeypatch, tmp_path, empty_store, page):
    at = dashboard_app(monkeypatch, tmp_path, empty_store).run()
    at.switch_page(page).run()
    assert not at.exception, at.exception
    assert "No complete probe runs" in at.info[0].value
