"""One SAE feature's page: its queries against plain pandas/numpy computations on the raw
Parquet rows of a probe run, readable tokens, and an AppTest of the page (query parameters,
bad ones, the empty store with and without the demo's note)."""

from __future__ import annotations

import html
import json
import os
import shlex
import time
from urllib.parse import urlencode

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest
from transformers import AutoTokenizer

from sparsescope.analysis import feature_page as fp
from sparsescope.app import demo
from sparsescope.app.charts_features import context_heatmap
from sparsescope.app.output import readable_token
from sparsescope.app.state import STORE_ENV
from sparsescope.probes.tokenizer import train_tokenizer
from sparsescope.store.catalog import init_store
from sparsescope.store.reader import Reader
from tests.test_sae_app import PAGE, sae_store  # noqa: F401 (the store fixture)


@pytest.fixture(scope="module")
def raw(sae_store):  # noqa: F811
    """The probe run's rows read straight from its Parquet files (no reader, no SQL)."""
    (run_id,) = Reader(sae_store).sql("SELECT DISTINCT run_id FROM sae_feature_acts")["run_id"]

    def table(name):
        return pd.read_parquet(sae_store / "data" / name / f"run_id={run_id}")

    return {
        "store": sae_store,
        "run_id": run_id,
        "acts": table("sae_feature_acts"),
        "tokens": table("tokens"),
        "stats": table("sae_feature_stats"),
    }


def _features(raw) -> list[int]:
    """The most active feature, and one active on 4 to 9 tokens (a sparse one)."""
    counts = raw["acts"]["feature"].value_counts().sort_index()
    sparse = counts[(counts >= 4) & (counts <= 9)].index
    return [int(counts.idxmax()), int(sparse[0])]


def _values(raw, feature: int) -> pd.DataFrame:
    acts = raw["acts"]
    return acts.loc[acts["feature"] == feature, ["seq_id", "pos", "value"]]


def _args(raw, feature):
    sae_id = raw["acts"]["sae_id"].iloc[0]
    return Reader(raw["store"]), raw["run_id"], sae_id, feature


@pytest.mark.parametrize(
    "text, raw_bytes, shown",
    [
        (" the", None, "␣the"),
        ("a b", None, "a␣b"),
        ("\n\n", None, "↵↵"),
        ("\tx", None, "⇥x"),
        ("", None, "∅"),
        ("\r", None, "<0x0D>"),
        ("\x00", None, "<0x00>"),
        ("\u200b", None, "<U+200B>"),
        ("é<b>&", None, "é<b>&"),  # plain text: escaping is the HTML builder's job
        ("\ufffd", None, "<0x??>"),
        ("\ufffd", b"\xe2\x80", "<0xE2><0x80>"),
        (" \ufffd", b" \xc3", "␣<0xC3>"),
    ],
)
def test_readable_token(text, raw_bytes, shown):
    assert readable_token(text, raw_bytes) == shown


def test_token_bytes_recover_the_bytes_of_a_split_character():
    """A byte-level BPE tokenizer trained on ASCII splits é and € into byte tokens that
    decode alone to U+FFFD; their bytes, joined, are Python's UTF-8 encoding of the text."""
    tok = train_tokenizer(["plain ascii text only"] * 20, vocab_size=270, model_max_length=64)
    text = "é€x"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert b"".join(fp.token_bytes(tok, i) for i in ids) == text.encode("utf-8")
    undecodable = [i for i in ids if "\ufffd" in tok.decode([i])]
    shown = "".join(readable_token(tok.decode([i]), fp.token_bytes(tok, i)) for i in undecodable)
    assert shown == "".join(f"<0x{b:02X}>" for b in "é€".encode())


def test_token_bytes_of_a_byte_fallback_piece():
    class Pieces:  # a SentencePiece vocabulary with byte fallback
        def convert_ids_to_tokens(self, i):
            return {3: "<0xE2>", 4: "▁the"}[i]

    assert fp.token_bytes(Pieces(), 3) == b"\xe2"
    assert fp.token_bytes(Pieces(), 4) is None


def test_context_heatmap_escapes_tokens_and_shades_by_value():
    windows = pd.DataFrame(
        {
            "hit": [0, 0],
            "offset": [0, 1],
            "token": ["<script>", ' "x'],
            "value": [2.0, 0.5],
        }
    )
    out = context_heatmap(windows, ["<b>label</b>"], vmax=2.0)
    assert "<script>" not in out and "<b>" not in out
    assert html.escape("<script>") in out and html.escape("<b>label</b>") in out
    assert f'title="{html.escape("␣" + chr(34) + "x · 0.500", quote=True)}"' in out
    assert "rgba(255,127,14,1.00)" in out and "rgba(255,127,14,0.25)" in out


@pytest.mark.parametrize("which", [0, 1])
def test_density_counts_every_probed_token(raw, which):
    feature = _features(raw)[which]
    v = _values(raw, feature)["value"].to_numpy(np.float64)
    n_tokens = int((raw["tokens"]["pos"] >= 1).sum())
    stats = fp.feature_summary(*_args(raw, feature))
    assert stats["n_tokens"] == n_tokens and stats["n_active"] == len(v)
    got = fp.density(v, n_tokens)
    width = v.max() / fp.DENSITY_BINS
    expected = np.bincount(
        np.minimum((v / width).astype(int), fp.DENSITY_BINS - 1), minlength=fp.DENSITY_BINS
    )
    assert got["count"].iloc[0] == n_tokens - len(v)
    assert got["count"].iloc[1:].tolist() == expected.tolist()
    np.testing.assert_allclose(got["lo"].iloc[1:], np.arange(fp.DENSITY_BINS) * width)
    assert got["count"].sum() == n_tokens


@pytest.mark.parametrize("which", [0, 1])
def test_quantile_examples_follow_pandas_qcut(raw, which):
    values = _values(raw, _features(raw)[which])
    df = values.assign(value=values["value"].astype(np.float64))
    df["interval"] = pd.qcut(df["value"], fp.INTERVALS, labels=False, duplicates="drop")
    expected = []
    for interval in sorted(df["interval"].unique(), reverse=True):
        part = df[df["interval"] == interval].sort_values(["value", "seq_id", "pos"])
        m = len(part)
        shown = min(fp.PER_INTERVAL, m)
        for j in range(shown):
            row = part.iloc[(2 * j + 1) * m // (2 * shown)]
            expected.append((interval, m, int(row.seq_id), int(row.pos)))
    got = fp.quantile_examples(values)
    assert list(zip(got["interval"], got["n"], got["seq_id"], got["pos"], strict=True)) == expected
    edges = np.quantile(df["value"], np.linspace(0, 1, fp.INTERVALS + 1))
    np.testing.assert_allclose(got["hi"], edges[got["interval"] + 1])
    assert ((got["value"] >= got["lo"]) & (got["value"] <= got["hi"])).all()


@pytest.mark.parametrize("which", [0, 1])
def test_token_lift_matches_pandas(raw, which):
    feature = _features(raw)[which]
    tokens = raw["tokens"][raw["tokens"]["pos"] >= 1]
    active = _values(raw, feature)[["seq_id", "pos"]].assign(on=1)
    df = tokens.merge(active, on=["seq_id", "pos"], how="left").fillna({"on": 0})
    per = df.groupby("token_id").agg(count=("on", "size"), n_active=("on", "sum"))
    per["lift"] = (per["n_active"] / per["count"]) / df["on"].mean()
    # a minimum count that some active tokens have exactly, so that >= and > differ
    counts = per.loc[per["n_active"] > 0, "count"].sort_values(ascending=False)
    least = int(counts.iloc[min(2, len(counts) - 1)])
    per = per[(per["count"] >= least) & (per["n_active"] > 0)].reset_index()
    per = per.sort_values(["lift", "n_active", "token_id"], ascending=[False, False, True])
    got = fp.token_lift(*_args(raw, feature), min_count=least, n=1000)
    assert got["token_id"].tolist() == per["token_id"].tolist()
    assert got["count"].tolist() == per["count"].tolist()
    assert got["n_active"].tolist() == per["n_active"].astype(int).tolist()
    np.testing.assert_allclose(got["lift"], per["lift"], rtol=1e-12)
    names = tokens.drop_duplicates("token_id").set_index("token_id")["token"]
    assert got["token"].tolist() == names[got["token_id"]].tolist()


def test_context_windows_hold_each_token_of_the_window(raw):
    feature = _features(raw)[0]
    values = _values(raw, feature).sort_values("value", ascending=False)
    hits = values.head(6).reset_index(drop=True)
    got = fp.context_windows(*_args(raw, feature), hits)
    on = {(s, p): v for s, p, v in values[["seq_id", "pos", "value"]].itertuples(index=False)}
    tokens = raw["tokens"].set_index(["seq_id", "pos"]).sort_index()
    seq_len = int(raw["tokens"]["pos"].max()) + 1
    expected = []
    for hit, (seq_id, pos) in enumerate(hits[["seq_id", "pos"]].itertuples(index=False)):
        for p in range(max(0, pos - fp.WINDOW), min(seq_len, pos + fp.WINDOW + 1)):
            token = tokens.loc[(seq_id, p), "token"]
            expected.append((hit, p - pos, token, np.float32(on.get((seq_id, p), 0.0))))
    rows = zip(
        got["hit"], got["offset"], got["token"], got["value"].astype(np.float32), strict=True
    )
    assert list(rows) == expected
    assert any(v == 0 for *_, v in expected) and any(v > 0 and o != 0 for _, o, _, v in expected)


# --- the page -------------------------------------------------------------------------------


def _app(monkeypatch, store, **query) -> AppTest:
    monkeypatch.setenv(STORE_ENV, str(store))
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.query_params = query
    return at.run()


def test_page_follows_the_link_and_shows_every_section(monkeypatch, raw):
    feature = _features(raw)[0]
    _, run_id, sae_id, _ = _args(raw, feature)
    at = _app(monkeypatch, raw["store"], run=run_id, sae=sae_id, feature=str(feature))
    assert not at.exception and not at.warning
    assert at.selectbox(key="sae_choice").value == (run_id, sae_id)
    assert at.number_input(key="sae_feature").value == feature
    values = _values(raw, feature).sort_values(["value", "seq_id", "pos"], ascending=[0, 1, 1])
    n_tokens = int((raw["tokens"]["pos"] >= 1).sum())
    assert at.metric[0].value == f"{len(values):,} of {n_tokens:,}"
    top, quantiles = at.get("html")[0].proto.body, at.get("html")[1].proto.body
    best = values.iloc[0]
    assert f"#1 · {best['value']:.3f} · seq {int(best['seq_id'])} pos {int(best['pos'])}" in top
    assert top.count("outline:") == min(20, len(values))  # one activating token per context
    token = raw["tokens"].set_index(["seq_id", "pos"]).loc[(best["seq_id"], best["pos"]), "token"]
    assert html.escape(f"{readable_token(token)} · {best['value']:.3f}", quote=True) in top
    shown = fp.quantile_examples(_values(raw, feature))
    first = shown.iloc[0]
    assert f"{first['value']:.3f} · seq {int(first['seq_id'])} pos {int(first['pos'])}" in quantiles
    assert len(at.get("html")) == 1 + shown["interval"].nunique()
    figure = json.loads(at.get("plotly_chart")[-1].proto.spec)
    assert figure["layout"]["yaxis"]["type"] == "log"
    lift = at.dataframe[2].value
    expected = fp.token_lift(*_args(raw, feature))
    assert lift["token"].tolist() == [readable_token(t) for t in expected["token"]]
    assert lift["search"].iloc[0] == "search?" + urlencode(
        {"run": run_id, "token": expected["token"].iloc[0], "exact": 1}
    )
    at.button(key="sae_logits").click().run()
    logits = at.dataframe[3].value
    tokenizer = AutoTokenizer.from_pretrained(raw["store"].parent / "gpt2")
    names = [readable_token(tokenizer.decode([int(i)])) for i in logits["token_id"]]
    assert len(logits) == 10 and logits["token"].tolist() == names
    at.number_input(key="sae_feature").set_value(feature + 1).run()  # the URL follows
    assert at.query_params == {"run": run_id, "sae": sae_id, "feature": str(feature + 1)}
    assert not at.warning


@pytest.mark.parametrize(
    "query, needle",
    [
        ({"feature": "abc"}, "feature ` abc `"),
        ({"feature": "99999"}, "feature ` 99999 `"),
        ({"run": "no-such-run", "feature": "1"}, "run ` no-such-run `"),
        ({"sae": "no-such-sae"}, "SAE ` no-such-sae `"),
    ],
)
def test_a_bad_link_gets_a_warning_naming_it(monkeypatch, raw, query, needle):
    at = _app(monkeypatch, raw["store"], **query)
    assert not at.exception
    assert len(at.warning) == 1 and needle in at.warning[0].value, [w.value for w in at.warning]
    assert at.metric  # the page still shows a feature, the one the widgets hold


def test_empty_store_hint_names_the_real_store(monkeypatch, tmp_path):
    store = init_store(tmp_path / "my store")
    at = _app(monkeypatch, store)
    assert not at.exception
    assert "No SAEs in this store" in at.info[0].value
    quoted, sae = shlex.quote(str(store)), shlex.quote(str(store / "saes" / "minilm-l3"))
    assert [c.value for c in at.code] == [
        "sparsescope sae train --model minilm --hook blocks.3.hook_resid_post"
        f" --store {quoted} --out {sae}",
        f"sparsescope probe --model minilm --store {quoted} --sae {sae}",
    ]


def test_empty_store_shows_the_demos_note(monkeypatch, tmp_path):
    store = init_store(tmp_path / "demo store")
    (store / "demo").mkdir()
    step = {"pages": ["SAE features"], "state": "running", "started": time.time()}
    progress = {"pid": os.getpid(), "started": time.time(), "steps": {"sae": step}}
    (store / "demo" / "progress.json").write_text(json.dumps(progress))
    at = _app(monkeypatch, store)
    assert not at.exception and not at.code
    assert [i.value for i in at.info] == [demo.note(store, "SAE features")]
    assert "computing this page's data now" in at.info[0].value
