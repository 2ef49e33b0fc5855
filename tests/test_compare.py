"""Compare page: two runs side by side and one neuron across checkpoints, on the planted
zoo of tests/test_dead_neurons.py, against its brute-force firing counts from plain
Hugging Face forward hooks."""

from __future__ import annotations

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from sparsescope.analysis.compare import compare_layers, neuron_over_checkpoints
from sparsescope.app.state import STORE_ENV
from sparsescope.store.reader import Reader
from tests.test_dead_neurons import D_MLP, N_TOKENS, STEPS, zoo_store  # noqa: F401
from tests.test_neuron_browser import VIEWS

DASHBOARD = """import streamlit as st
st.navigation([st.Page("views/compare.py", title="Compare"),
               st.Page("views/neuron_browser.py", title="Neuron browser")]).run()
"""


def test_two_runs_side_by_side_equal_brute_force(zoo_store):  # noqa: F811
    first, last = zoo_store.run_ids[0], zoo_store.run_ids[-1]
    both = compare_layers(Reader(zoo_store.store), first, last).set_index(["run", "layer"])
    for label, step in (("A", STEPS[0]), ("B", STEPS[-1])):
        acts = zoo_store.acts[step]  # [layer, tokens, d_mlp]
        counts = zoo_store.counts[step]  # [layer, neuron]
        for layer in range(acts.shape[0]):
            row = both.loc[(label, layer)]
            assert row["activation_ratio"] == pytest.approx((acts[layer] > 0).mean(), rel=1e-9)
            assert row["dead"] == int((counts[layer] == 0).sum())
            assert row["dense"] == int((counts[layer] / N_TOKENS > 0.1).sum())
            assert row["d_mlp"] == D_MLP


@pytest.mark.parametrize("layer, neuron, last", [(0, 3, 100), (1, 6, 100), (1, 40, None)])
def test_one_neuron_across_checkpoints(zoo_store, layer, neuron, last):  # noqa: F811
    path = neuron_over_checkpoints(Reader(zoo_store.store), zoo_store.run_ids[0], layer, neuron)
    assert path["step"].tolist() == STEPS
    truth = [int(zoo_store.counts[step][layer, neuron]) for step in STEPS]
    assert path["n_active"].tolist() == truth
    np.testing.assert_allclose(path["freq"], np.array(truth) / N_TOKENS)
    assert path.loc[path["last_fired"], "step"].tolist() == ([last] if last else [])


def test_compare_page(zoo_store, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv(STORE_ENV, str(zoo_store.store))
    (tmp_path / "views").symlink_to(VIEWS)
    (tmp_path / "dashboard.py").write_text(DASHBOARD)
    at = AppTest.from_file(str(tmp_path / "dashboard.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == 3
    table = at.dataframe[0].value
    assert len(table) == 2 and {"dead A", "dead B", "activation_ratio A"} <= set(table.columns)
    at.number_input(key="cmp_layer").set_value(0)
    at.number_input(key="cmp_neuron").set_value(3).run()
    assert not at.exception, at.exception
    texts = [t.value for t in at.text]
    assert any("it last fired at step 100" in t for t in texts), texts
