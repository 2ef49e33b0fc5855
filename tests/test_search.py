"""Search: neurons by the token their top contexts peak on (against a brute-force top-k
of plain Hugging Face activations), features by token (against pandas over the raw rows),
neurons by frequency (against numpy counts), and the page's links."""

from __future__ import annotations

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from sparsescope.analysis import search
from sparsescope.app.state import STORE_ENV
from sparsescope.store.reader import Reader
from tests.conftest import SMALL_TOKENS
from tests.test_neuron_browser import TOP_K, VIEWS, minilm_truth  # noqa: F401
from tests.test_sae_app import sae_store  # noqa: F401


def _truth_hits(minilm_truth, layer: int, match) -> dict[int, int]:  # noqa: F811
    """Per neuron with no tie at the top-k cut: how many of its top-k tokens match."""
    tokenizer, _, ids, acts = minilm_truth
    names = np.array([tokenizer.decode([t]) for t in ids.reshape(-1).tolist()])
    flat = acts[layer].reshape(-1, acts.shape[-1])
    order = np.argsort(-flat, axis=0, kind="stable")[: TOP_K + 1]
    hits = {}
    for neuron in range(flat.shape[1]):
        values = flat[order[:, neuron], neuron]
        if values[TOP_K - 1] - values[TOP_K] > 1e-4 and values[TOP_K - 1] > 0:
            hits[neuron] = sum(map(match, names[order[:TOP_K, neuron]]))
    return hits


@pytest.mark.parametrize("text, exact", [("the", True), ("ing", False)])
def test_neurons_by_token_equal_brute_force(minilm_store, minilm_truth, text, exact):  # noqa: F811
    r = Reader(minilm_store)
    run_id = r.sql("SELECT run_id FROM runs").iloc[0, 0]
    found = search.neurons_by_token(r, run_id, text, exact, limit=100_000)
    match = (lambda t: t == text) if exact else (lambda t: text in t.lower())
    for layer in (0, 5):
        truth = _truth_hits(minilm_truth, layer, match)
        got = found[found["layer"] == layer].set_index("neuron")["hits"]
        assert sum(truth.values()) > 0
        for neuron, hits in truth.items():
            assert got.get(neuron, 0) == hits, (layer, neuron)
    assert (found["hits"].diff().dropna() <= 0).all()  # most hits first


def test_text_is_never_a_pattern(minilm_store):
    r = Reader(minilm_store)
    run_id = r.sql("SELECT run_id FROM runs").iloc[0, 0]
    tops = r.sql(
        "SELECT DISTINCT t.token FROM neuron_top n JOIN tokens t USING (run_id, seq_id, pos)"
    )["token"].str.lower()
    for text in ("%", "_", "*", "'; DROP TABLE runs; --", ".*", "e"):
        found = search.neurons_by_token(r, run_id, text, limit=100_000)
        assert found.empty == (not tops.map(lambda t, x=text: x in t).any()), text
        for tokens in found["tokens"]:
            assert all(text in tok.lower() for tok in tokens.split(" | ")), (text, tokens)
    assert not search.neurons_by_token(r, run_id, "e").empty
    assert r.sql("SELECT count(*) FROM runs").iloc[0, 0] == 1


def test_features_by_token_equal_pandas_over_raw_rows(sae_store):  # noqa: F811
    r = Reader(sae_store)
    run_id, sae_id = r.sql(
        "SELECT run_id, sae_id FROM sae_feature_stats JOIN runs USING (run_id)"
        " WHERE kind = 'probe' LIMIT 1"
    ).iloc[0]
    acts = r.sql("SELECT seq_id, pos, feature, value FROM sae_feature_acts WHERE run_id = ?",
                 [run_id])  # fmt: skip
    tokens = r.sql("SELECT seq_id, pos, token FROM tokens WHERE run_id = ?", [run_id])
    on = tokens[tokens["token"] == "cat"]
    joined = acts.merge(on, on=["seq_id", "pos"])
    truth = joined.groupby("feature").agg(hits=("value", "size"), top=("value", "max"))
    got = search.features_by_token(r, run_id, sae_id, "cat", exact=True, limit=10_000)
    got = got.set_index("feature").loc[truth.index]
    assert len(truth) > 0 and set(got.index) == set(truth.index)
    assert (got["hits"] == truth["hits"]).all()
    np.testing.assert_allclose(got["top_value"], truth["top"], rtol=1e-6)
    np.testing.assert_allclose(got["share"], truth["hits"] / len(on))


def test_neurons_by_frequency_and_the_page(minilm_store, minilm_truth, monkeypatch):  # noqa: F811
    _, _, _, acts = minilm_truth
    fires = (acts > 0).reshape(acts.shape[0], -1, acts.shape[-1]).sum(1)  # [layer, neuron]
    r = Reader(minilm_store)
    run_id = r.sql("SELECT run_id FROM runs").iloc[0, 0]
    rows = search.neurons_by_frequency(r, run_id, 0.0, 0.01, ("dead", "nearly dead", "normal"))
    freq = fires / SMALL_TOKENS
    assert len(rows) == int((freq <= 0.01).sum())
    assert rows["freq"].is_monotonic_increasing
    dead = search.neurons_by_frequency(r, run_id, categories=("dead",), layers=[2])
    assert set(dead["neuron"]) == set(np.flatnonzero(fires[2] == 0))

    monkeypatch.setenv(STORE_ENV, str(minilm_store))
    at = AppTest.from_file(str(VIEWS / "search.py"), default_timeout=120).run()
    assert not at.exception, at.exception
    at.text_input(key="search_text").set_value("the")
    at.checkbox(key="search_exact").check().run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert len(table) > 0 and table["open"].str.startswith(f"neuron_browser?run={run_id}").all()
    first = table.iloc[0]
    assert first["open"].endswith(f"layer={first['layer']}&neuron={first['neuron']}")


def test_a_token_link_opens_its_search(minilm_store, minilm_truth, monkeypatch):  # noqa: F811
    """``?run=&token=&exact=1`` (a lift table's link) fills the search; hits against the
    brute-force top-k; a run the store lacks gets a warning."""
    r = Reader(minilm_store)
    run_id = r.sql("SELECT run_id FROM runs").iloc[0, 0]
    monkeypatch.setenv(STORE_ENV, str(minilm_store))
    at = AppTest.from_file(str(VIEWS / "search.py"), default_timeout=120)
    at.query_params.update({"run": run_id, "token": "the", "exact": "1"})
    at.run()
    assert not at.exception, at.exception
    assert at.text_input(key="search_text").value == "the" and at.checkbox(key="search_exact").value
    table = at.dataframe[0].value
    truth = _truth_hits(minilm_truth, 0, lambda t: t == "the")
    shown = table[table["layer"] == 0].set_index("neuron")["hits"]
    checked = [n for n in shown.index if n in truth]
    assert checked and all(shown[n] == truth[n] for n in checked)
    at.checkbox(key="search_exact").uncheck().run()
    assert at.query_params["token"] == "the" and at.query_params["exact"] == "0"

    at = AppTest.from_file(str(VIEWS / "search.py"), default_timeout=120)
    at.query_params.update({"run": "no-such-run", "token": "the"})
    at.run()
    assert not at.exception, at.exception
    assert any("no-such-run" in w.value for w in at.warning)
