"""Hash-code analyses, Hamming search and the Hash codes page, against independent
computations: a plain Hugging Face BertModel forward with torch hooks, numpy, scikit-learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import entropy
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.multiclass import OneVsOneClassifier
from sklearn.neighbors import KNeighborsClassifier
from streamlit.testing.v1 import AppTest

from sparsescope.analysis import hash_codes as hc
from sparsescope.app.state import STORE_ENV
from sparsescope.store.errors import StoreError
from sparsescope.store.hamming import nearest_codes, nearest_to_code
from sparsescope.store.reader import Reader
from tests.conftest import hf_minilm_activations

PAGE = str(Path(__file__).parents[1] / "app" / "views" / "hash_codes.py")


@pytest.fixture(scope="module")
def independent(minilm_store):
    """Stored tokens re-run through plain BertModel; firing bits (GELU output > 0) per layer."""
    reader = Reader(minilm_store)
    run_id = reader.sql("SELECT run_id FROM runs")["run_id"][0]
    tokens = reader.sql("SELECT seq_id, pos, token_id FROM tokens ORDER BY seq_id, pos")
    bits = {i: a > 0 for i, a in hf_minilm_activations(tokens).items()}
    bits[hc.ALL_LAYERS] = np.concatenate([bits[i] for i in range(6)], axis=1)
    return reader, run_id, tokens, bits


def test_redundancy_and_entropy_equal_numpy_on_an_independent_forward(independent):
    reader, run_id, _, bits = independent
    _, per_layer = hc.run_codes(reader, run_id)
    got = hc.summary(per_layer, 1536).set_index("layer")
    for layer, b in bits.items():
        n = len(b)
        n_unique = len({row.tobytes() for row in b})
        # plain HF and the bridge may flip a bit that sits ~1e-7 from zero: allow one code
        assert abs(got.loc[layer, "n_unique"] - n_unique) <= 1, layer
        assert got.loc[layer, "redundancy"] == pytest.approx((n - n_unique) / n, abs=1.5 / n)
        varying = b[:, b.min(0) != b.max(0)]
        nonconst = (n - len({row.tobytes() for row in varying})) / n
        assert got.loc[layer, "redundancy_nonconst"] == pytest.approx(nonconst, abs=1.5 / n)
        if layer != hc.ALL_LAYERS:
            p = b.mean(0)
            h = np.array([entropy([q, 1 - q], base=2) for q in p])
            assert got.loc[layer, "mean_bit_entropy"] == pytest.approx(h.mean(), abs=1e-3)


def _labels(tokens: pd.DataFrame) -> dict[str, np.ndarray]:
    cur = tokens["token_id"].to_numpy()
    nxt = np.r_[cur[1:], -1]
    nxt[np.r_[tokens["seq_id"].to_numpy()[1:] != tokens["seq_id"].to_numpy()[:-1], True]] = -1
    out = {}
    for name, y in (("current token", cur), ("next token", nxt)):
        top = pd.Series(y[y >= 0]).value_counts().index[:10]
        out[name] = np.where(np.isin(y, top), y, -1)
    return out


def test_knn_accuracy_equals_sklearn_hamming_knn_on_an_independent_forward(independent):
    reader, run_id, tokens, bits = independent
    keys, per_layer = hc.run_codes(reader, run_id)
    layers = (0, 3, hc.ALL_LAYERS)
    got = hc.categorize_run(keys, per_layer, 1536, layers=layers).set_index(["label", "layer"])
    assert len(tokens) <= hc.MAX_SAMPLES  # no subsampling at this size
    for label, y in _labels(tokens).items():
        idx = np.flatnonzero(y >= 0)
        tr, te = train_test_split(idx, test_size=0.3, random_state=0, stratify=y[idx])
        for layer in layers:
            b = bits[layer]
            knn = KNeighborsClassifier(n_neighbors=9, metric="hamming", algorithm="brute").fit(
                b[tr], y[tr]
            )
            expected = (knn.predict(b[te]) == y[te]).mean()
            assert got.loc[(label, layer), "knn_acc"] == pytest.approx(expected, abs=0.02)
            ovo = OneVsOneClassifier(LogisticRegression(solver="liblinear")).fit(b[tr], y[tr])
            expected = (ovo.predict(b[te]) == y[te]).mean()
            assert got.loc[(label, layer), "logreg_acc"] == pytest.approx(expected, abs=0.02)
            assert got.loc[(label, layer), "n_samples"] == len(idx)
    assert got.loc[("current token", 0), "knn_acc"] > 0.9  # layer 0 codes know the token


def test_frequent_codes_equal_numpy_counts_on_an_independent_forward(independent):
    reader, run_id, _, bits = independent
    for layer in (0, 5):
        got = hc.frequent_codes(reader, run_id, layer, limit=10)
        _, counts = np.unique(bits[layer], axis=0, return_counts=True)
        assert got["n"].tolist() == sorted(counts, reverse=True)[:10], layer
        assert (got["n_distinct_tokens"] <= got["n"]).all()


def test_kmeans_accuracy_matches_clusters_to_permuted_classes():
    """Three far-apart code prototypes, class labels a permutation of the clusters, 10% of the
    test labels replaced: the Hungarian matching must recover the permutation (accuracy .9)."""
    rng = np.random.default_rng(0)
    protos = rng.random((3, 256)) < 0.5
    cluster = rng.integers(0, 3, 600)
    bits = protos[cluster] ^ (rng.random((600, 256)) < 0.03)
    y = np.array([7, 2, 5])[cluster]
    y_test = y[400:].copy()
    y_test[:20] = np.where(y_test[:20] == 7, 2, 7)  # 20 of 200 test labels wrong
    acc = hc.kmeans_accuracy(bits[:400], y[:400], bits[400:], y_test)
    assert acc == pytest.approx(0.9)


def _brute_force(reader, run_id, layer, seq_id, pos, k=10) -> pd.DataFrame:
    layers = range(6) if layer is None else [layer]
    total = None
    for i in layers:
        df = reader.sql(
            "SELECT seq_id, pos, code FROM hash_codes WHERE run_id = ? AND layer = ?"
            " ORDER BY seq_id, pos",
            [run_id, i],
        )
        codes = np.stack([np.frombuffer(c, np.uint8) for c in df["code"]])
        q = codes[((df["seq_id"] == seq_id) & (df["pos"] == pos)).to_numpy()][0]
        d = np.unpackbits(codes ^ q, axis=1).sum(1)  # XOR + popcount
        total = d if total is None else total + d
    df = df[["seq_id", "pos"]].assign(distance=total)
    df = df[~((df["seq_id"] == seq_id) & (df["pos"] == pos))]
    return df.sort_values(["distance", "seq_id", "pos"]).head(k).reset_index(drop=True)


@pytest.mark.parametrize("layer", [0, 4, None])
@pytest.mark.parametrize("where", [(0, 5), (7, 40), (20, 63)])
def test_hamming_search_equals_numpy_brute_force(independent, layer, where):
    reader, run_id, _, _ = independent
    got = nearest_codes(reader, run_id, layer, *where)
    expected = _brute_force(reader, run_id, layer, *where)
    assert len(got) == 10
    pd.testing.assert_frame_equal(
        got[["seq_id", "pos", "distance"]].astype("int64"), expected.astype("int64")
    )
    assert got["token"].notna().all()


def test_nearest_to_code_finds_the_code_itself_and_bad_queries_fail(independent):
    reader, run_id, _, _ = independent
    code = reader.sql(
        "SELECT code FROM hash_codes WHERE run_id = ? AND layer = 2 AND seq_id = 1 AND pos = 3",
        [run_id],
    )["code"][0]
    hits = nearest_to_code(reader, run_id, 2, bytes(code), k=3)
    assert hits["distance"].iloc[0] == 0 and (1, 3) in set(
        zip(hits["seq_id"], hits["pos"], strict=True)
    )
    with pytest.raises(StoreError, match="no hash code"):
        nearest_codes(reader, run_id, 2, 10_000, 0)
    with pytest.raises(StoreError, match="no hash codes"):
        nearest_codes(reader, run_id, None, 10_000, 0)


def _page(monkeypatch, store) -> AppTest:
    monkeypatch.setenv(STORE_ENV, str(store))
    return AppTest.from_file(PAGE, default_timeout=120).run()


def test_page_on_a_probed_store(monkeypatch, minilm_store):
    at = _page(monkeypatch, minilm_store)
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == 1
    assert any("No hash-encoder experiment" in i.value for i in at.info)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Tokens"] == "1,536"
    frequent = at.dataframe[1].value
    assert len(frequent) == 10 and frequent["tokens"].notna().all()
    nearest = at.dataframe[2].value
    assert len(nearest) == 10 and nearest["context"].str.contains(r"\[").all()
    at.selectbox(key="nn_layer").set_value(3).run()
    at.number_input(key="nn_seq").set_value(4).run()
    assert not at.exception, at.exception
    at.toggle(key="categorize").set_value(True).run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == 2


def test_page_on_an_empty_store(monkeypatch, empty_store):
    at = _page(monkeypatch, empty_store)
    assert not at.exception, at.exception
    text = " ".join(i.value for i in at.info)
    assert "No complete probe runs" in text and "No hash-encoder experiment" in text


def _page_at(monkeypatch, store, **query) -> AppTest:
    monkeypatch.setenv(STORE_ENV, str(store))
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.query_params.update(query)
    return at.run()


def test_a_link_starts_the_search_from_its_token(monkeypatch, independent, minilm_store):
    reader, run_id, _, _ = independent
    at = _page_at(monkeypatch, minilm_store, run=run_id, seq="7", pos="40")
    assert not at.exception, at.exception
    assert not at.warning, [w.value for w in at.warning]
    assert (at.number_input(key="nn_seq").value, at.number_input(key="nn_pos").value) == (7, 40)
    nearest = at.dataframe[2].value
    expected = _brute_force(reader, run_id, None, 7, 40)
    pd.testing.assert_frame_equal(
        nearest[["seq_id", "pos", "distance"]].astype("int64"), expected.astype("int64")
    )
    seq, pos = int(expected["seq_id"].iloc[0]), int(expected["pos"].iloc[0])
    assert nearest["from here"].iloc[0] == f"hash_codes?run={run_id}&seq={seq}&pos={pos}"
    # the URL follows the widgets; the link is applied once, so the widgets then rule
    at.number_input(key="nn_pos").set_value(5).run()
    assert at.query_params["pos"] == "5" and at.number_input(key="nn_pos").value == 5
    layer_3 = at.selectbox(key="nn_layer").set_value(3).run().dataframe[2].value
    pd.testing.assert_frame_equal(
        layer_3[["seq_id", "pos", "distance"]].astype("int64"),
        _brute_force(reader, run_id, 3, 7, 5).astype("int64"),
    )


@pytest.mark.parametrize(
    ("query", "warning", "shown"),
    [
        ({"seq": "x`*", "pos": "3"}, "seq `` x`* ``, which is not an index", (0, 3)),
        ({"seq": "999"}, "sequence 999: this page reads the codes of sequences 0–23", (0, 1)),
        ({"seq": "2", "pos": "500"}, "Sequence 2 has no position 500 (0–63): showing 63", (2, 63)),
    ],
)
def test_bad_start_parameters_warn(monkeypatch, independent, minilm_store, query, warning, shown):
    _, run_id, _, _ = independent
    at = _page_at(monkeypatch, minilm_store, run=run_id, **query)
    assert not at.exception, at.exception
    assert [w.value for w in at.warning if warning in w.value], [w.value for w in at.warning]
    assert (at.number_input(key="nn_seq").value, at.number_input(key="nn_pos").value) == shown
