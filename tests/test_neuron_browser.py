"""Neuron browser: stored top contexts against a brute-force top-k from a plain Hugging Face
forward with torch hooks; AppTest of both neuron pages on MiniLM, on a run without the
neuron page's tables, on a tiny GPT-2 and on an empty store; bad query parameters."""

from __future__ import annotations

import base64
import itertools
import re
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import plotly.io
import pytest
import torch
from streamlit.testing.v1 import AppTest
from transformers import AutoTokenizer, BertModel

from sparsescope.analysis.dead_neurons import layer_summary, top_contexts
from sparsescope.analysis.neuron_page import NOT_RECORDED
from sparsescope.app.charts_neurons import context_heatmap, context_html
from sparsescope.app.state import STORE_ENV
from sparsescope.probes.batches import batches
from sparsescope.probes.data import documents
from sparsescope.probes.models import minilm_path
from sparsescope.store.reader import Reader
from tests.conftest import SMALL_TOKENS

VIEWS = Path(__file__).parents[1] / "app" / "views"
SEQ_LEN, BATCH, TOP_K, WINDOW = 64, 8, 20, 8  # as the minilm_store fixture probes
WINDOW_PAGE = 6  # the heatmap's centre column: tokens either side of the top token
DASHBOARD = """import streamlit as st
st.navigation([
    st.Page("views/dead_neurons.py", title="Dead neurons"),
    st.Page("views/neuron_browser.py", title="Neuron browser"),
]).run()
"""
TOKEN_IDS = "SELECT token_id FROM tokens WHERE run_id = ? ORDER BY seq_id, pos"


def plotly_array(value) -> np.ndarray:
    """A plotly figure's array, whether plain or typed (``{"dtype", "bdata", "shape"}``)."""
    if not isinstance(value, dict):
        return np.asarray(value)
    flat = np.frombuffer(base64.b64decode(value["bdata"]), np.dtype(value["dtype"]))
    return flat.reshape([int(n) for n in str(value.get("shape", len(flat))).split(",")])


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
    html = context_html("r&<1>", df)
    assert "<b>" not in html and "&lt;b&gt;" in html and "a&amp;" in html
    assert re.search(r"<mark[^>]*>&lt;b&gt;</mark>", html)
    # the place links to the Hamming search from this token, the run id URL-quoted
    assert '<a href="hash_codes?run=r%26%3C1%3E&amp;seq=3&amp;pos=1"' in html


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
    assert not at.warning
    assert "<mark" in at.get("html")[0].proto.body
    figures = [plotly.io.from_json(c.proto.spec) for c in at.get("plotly_chart")]
    assert [f.data[0].type for f in figures] == ["heatmap", "bar"]  # top contexts; density
    heatmap = figures[0].data[0]
    truth = acts[layer, :, :, neuron]  # [seq, pos]
    top = top_contexts(Reader(minilm_store), run_id, layer, neuron)
    first = top.iloc[0]
    np.testing.assert_allclose(  # row 1 is the best context, centred on its top token
        plotly_array(heatmap.z)[0, WINDOW_PAGE], truth[first.seq_id, first.pos], rtol=2e-3
    )
    assert "quantiles" in at.get("html")[1].proto.body  # examples by quantile interval
    lift = at.dataframe[0].value
    assert list(lift.columns) == ["token_id", "token", "n", "n_fire", "p_fire", "lift", "search"]
    raw = Reader(minilm_store).sql("SELECT DISTINCT token_id, token FROM tokens")
    raw = raw.set_index("token_id")["token"]
    expected = [  # each token links to the search for its raw (stored) text
        f"search?{urlencode({'run': run_id, 'token': raw[i], 'exact': 1})}"
        for i in lift["token_id"]
    ]
    assert lift["search"].tolist() == expected
    assert not any(NOT_RECORDED in c.value for c in at.caption)
    at.toggle[0].set_value(True).run()
    assert not at.exception, at.exception
    w_out = model.encoder.layer[layer].output.dense.weight[:, neuron]  # Linear [d_model, d_mlp]
    logits = model.embeddings.word_embeddings.weight @ w_out
    top = at.dataframe[1].value
    assert top["token_id"].tolist() == logits.topk(10).indices.tolist()
    assert any("word-embedding matrix" in c.value for c in at.caption)


def _neuron_page(monkeypatch, tmp_path, store, **query) -> AppTest:
    at = dashboard_app(monkeypatch, tmp_path, store)
    at.query_params.update(query)
    return at.switch_page("views/neuron_browser.py").run()


def test_bad_query_parameters_warn(monkeypatch, tmp_path, minilm_store):
    run_id = Reader(minilm_store).sql("SELECT run_id FROM runs").iloc[0, 0]
    cases = [
        ({"run": "no-such-run"}, "run ` no-such-run `, which is not a complete probe run"),
        ({"run": run_id, "neuron": "99999"}, "has no neuron 99999 (0–1535): showing neuron 0"),
        ({"run": run_id, "neuron": "-3"}, "neuron ` -3 `, which is not a neuron index"),
        ({"run": run_id, "neuron": "²"}, "neuron ` ² `, which is not a neuron index"),
        ({"run": run_id, "layer": "x`*"}, "layer `` x`* ``, which is not a layer index"),
    ]
    for query, warning in cases:
        at = _neuron_page(monkeypatch, tmp_path, minilm_store, **query)
        assert not at.exception, at.exception
        assert [w.value for w in at.warning if warning in w.value], (query, at.warning)


def test_a_run_without_the_page_data_says_so(monkeypatch, tmp_path, store_copy):
    """A run probed before the page's tables existed (and one that kept no codes)."""
    import shutil

    for table in ("neuron_top_window", "neuron_density", "neuron_samples", "hash_codes"):
        shutil.rmtree(store_copy / "data" / table)
    run_id = Reader(store_copy).sql("SELECT run_id FROM runs").iloc[0, 0]
    at = _neuron_page(monkeypatch, tmp_path, store_copy, run=run_id, layer="1", neuron="7")
    assert not at.exception, at.exception
    assert sum(NOT_RECORDED in c.value for c in at.caption) == 2  # windows, density
    assert "<mark" in at.get("html")[0].proto.body  # the contexts as text still
    assert any("kept no hash codes for layer 1" in i.value for i in at.info)
    assert not at.get("plotly_chart")


@pytest.fixture(scope="module")
def gpt2_store(tmp_path_factory) -> Path:
    """A tiny random GPT-2 with a byte-level tokenizer, probed into a store."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sparsescope.probes.job import ProbeConfig, run_probe
    from sparsescope.probes.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("gpt2")
    docs = list(itertools.islice(documents("stdlib-docs"), 300))
    tokenizer = train_tokenizer(docs, 512, 64)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2,
                        n_head=2, n_inner=64)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    config = ProbeConfig(max_tokens=512, seq_len=64, batch_size=4)
    run_probe(str(root / "model"), "stdlib-docs", root / "store", config, quiet=True)
    return root / "store"


def test_output_direction_of_a_causal_lm(monkeypatch, tmp_path, gpt2_store):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reader = Reader(gpt2_store)
    run_id, path = reader.sql(
        "SELECT r.run_id, m.path FROM runs r JOIN models m USING (model_id)"
    ).iloc[0]
    at = _neuron_page(monkeypatch, tmp_path, gpt2_store, run=run_id, layer="1", neuron="5")
    assert not at.exception, at.exception
    at.toggle[0].set_value(True).run()
    assert not at.exception, at.exception
    captions = " ".join(c.value for c in at.caption)
    assert "unembedding (lm_head)" in captions and "BERT" not in captions
    assert "MLM" not in captions
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(path),
        AutoTokenizer.from_pretrained(path),
    )
    w_out = model.transformer.h[1].mlp.c_proj.weight[5]  # Conv1D weight: [d_mlp, d_model]
    logits = model.lm_head.weight @ w_out
    shown = at.dataframe[-2].value
    assert shown["token_id"].tolist() == logits.topk(10).indices.tolist()
    for token_id, label in zip(shown["token_id"], shown["token"], strict=True):
        assert "Ġ" not in label and "Ċ" not in label  # byte-level symbols decoded
        text = tokenizer.decode([token_id])
        if "\ufffd" in text:
            assert re.fullmatch(r"(<0x[0-9A-F]{2}>|[^\ufffd])+", label), label
        elif text.isspace():
            assert label == text.translate(str.maketrans(" \n\t\r", "␣↵⇥␍"))
        else:  # newline and tab drawn, other control characters as their byte
            visible = text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
            control = r"[\x00-\x1f\x7f-\x9f]"
            assert label == re.sub(control, lambda m: f"<0x{ord(m[0]):02X}>", visible)


def test_context_heatmap_escapes_tokens():
    import pandas as pd

    windows = pd.DataFrame(
        {
            "rank": [0],
            "value": [1.5],
            "window": [np.arange(4.0)],
            "labels": [["<b>", "a&", '"', None]],
        }
    )
    fig = context_heatmap(windows)
    # plotly reads tags and the entities &amp; &lt; &gt; only: a quote stays as it is
    assert list(fig.data[0].text[0]) == ["&lt;b&gt;", "a&amp;", '"', ""]


@pytest.mark.parametrize("page", ["views/dead_neurons.py", "views/neuron_browser.py"])
def test_pages_help_on_an_empty_store(monkeypatch, tmp_path, empty_store, page):
    at = dashboard_app(monkeypatch, tmp_path, empty_store).run()
    at.switch_page(page).run()
    assert not at.exception, at.exception
    assert "No complete probe runs" in at.info[0].value
