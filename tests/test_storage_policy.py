"""The storage policy for wide models (--codes), the per-run summaries written at commit,
the v2 migration that backfills them, and synthetic models at real widths."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from sparsescope.analysis.sparsity import activation_ratio
from sparsescope.app.state import STORE_ENV
from sparsescope.probes.codes import CODE_BUDGET, CodePolicy, CodesError, parse_codes
from sparsescope.probes.job import ProbeConfig, run_probe
from sparsescope.store.catalog import CATALOG
from sparsescope.store.errors import StoreError
from sparsescope.store.reader import Reader
from tests.conftest import fingerprint, run_cli
from tests.test_app import DASHBOARD

TOKENS = 640


def _raw(root, run_id: str) -> pd.DataFrame:
    """The token rows of a run straight from its Parquet files (not through the views)."""
    files = sorted((root / "data" / "layer_token_stats" / f"run_id={run_id}").glob("*.parquet"))
    return duckdb.sql(f"SELECT * FROM read_parquet({[str(f) for f in files]})").df()


def test_layer_summary_equals_the_raw_rows(minilm_store):
    r = Reader(minilm_store)
    run_id = r.sql("SELECT run_id FROM runs").iloc[0, 0]
    raw = _raw(minilm_store, run_id)
    summary = r.sql("SELECT * FROM layer_summary WHERE run_id = ? ORDER BY layer", [run_id])
    by_layer = raw.groupby("layer")
    np.testing.assert_array_equal(summary["n_tokens"], by_layer.size())
    np.testing.assert_array_equal(summary["n_active"], by_layer["n_active"].sum())
    sq = by_layer["n_active"].apply(lambda v: (v.astype(np.float64) ** 2).sum())
    np.testing.assert_allclose(summary["n_active_sq"], sq, rtol=1e-12)
    l1 = by_layer["l1"].apply(lambda v: v.astype(np.float64).sum())
    np.testing.assert_allclose(summary["l1"], l1, rtol=1e-9)
    np.testing.assert_array_equal(summary["max_abs"], by_layer["max_abs"].max())
    # the Sparsity page's numbers (from the summary) are those of the raw rows
    page = activation_ratio(r, run_id)
    np.testing.assert_allclose(page["activation_ratio"], by_layer["n_active"].mean() / 1536)


def test_a_v1_store_is_refused_until_upgraded_which_backfills_summaries(store_copy):
    r = Reader(store_copy)
    run_id = r.sql("SELECT run_id FROM runs").iloc[0, 0]
    before = r.sql("SELECT * FROM layer_summary ORDER BY layer")
    r.close()
    import shutil

    shutil.rmtree(store_copy / "data" / "layer_summary")
    with duckdb.connect(str(store_copy / CATALOG)) as con:
        con.execute("DELETE FROM schema_version WHERE version = 2")
    with pytest.raises(StoreError, match="store upgrade"):
        Reader(store_copy)
    done = run_cli("store", "upgrade", "--store", str(store_copy))
    assert done.returncode == 0, done.stderr
    after = Reader(store_copy).sql("SELECT * FROM layer_summary ORDER BY layer")
    pd.testing.assert_frame_equal(after, before)
    assert (store_copy / "data" / "layer_summary" / f"run_id={run_id}").is_dir()


def test_code_policies_parse_and_auto_fits_the_budget():
    llama = parse_codes("auto", 32, 14336)  # Llama-3-8B: 57 kB of codes per token
    assert llama == CodePolicy(every=28) and 32 * 14336 / 8 / llama.every <= CODE_BUDGET
    assert parse_codes("auto", 6, 1536) == CodePolicy()  # MiniLM: 1152 B, all kept
    assert parse_codes("layers:3,1,3", 4, 64).spec == "layers:1,3"
    assert parse_codes("every:5", 4, 64).spec == "every:5"
    assert parse_codes("none", 4, 64).keeps_layer(0) is False
    for bad in ("every:0", "layers:4", "layers:", "some", "all:2", "every:x"):
        with pytest.raises(CodesError):
            parse_codes(bad, 4, 64)


@pytest.fixture(scope="module")
def policy_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy") / "s"
    ids = {}
    for codes in ("every:3", "layers:1,4", "none"):
        config = ProbeConfig(max_tokens=TOKENS, seq_len=32, batch_size=4, codes=codes)
        (ids[codes],) = run_probe("minilm", "stdlib-docs", root, config, codes, quiet=True)
    return root, ids


def test_probes_keep_the_codes_their_policy_names(policy_store):
    root, ids = policy_store
    r = Reader(root)
    tokens = r.sql("SELECT count(*) FROM tokens WHERE run_id = ?", [ids["none"]]).iloc[0, 0]
    assert tokens == TOKENS
    for codes, run_id in ids.items():
        kept = r.sql("SELECT seq_id, layer FROM hash_codes WHERE run_id = ?", [run_id])
        stats = r.sql("SELECT count(*) FROM layer_token_stats WHERE run_id = ?", [run_id])
        assert stats.iloc[0, 0] == 6 * TOKENS  # token rows are kept whatever the policy
        assert r.sql("SELECT config->>'codes' FROM runs WHERE run_id = ?", [run_id]).iloc[0, 0] == (
            codes
        )
        if codes == "none":
            assert kept.empty
        elif codes == "every:3":
            assert (kept["seq_id"] % 3 == 0).all() and set(kept["layer"]) == set(range(6))
            assert len(kept) == 6 * 32 * len(range(0, TOKENS // 32, 3))
        else:
            assert set(kept["layer"]) == {1, 4} and len(kept) == 2 * TOKENS


@pytest.mark.parametrize(("run", "expect"), [("every:3", "every:3"), ("none", "kept no hash")])
def test_hash_codes_page_says_what_was_kept(monkeypatch, policy_store, run, expect):
    root, ids = policy_store
    monkeypatch.setenv(STORE_ENV, str(root))
    at = AppTest.from_file(DASHBOARD, default_timeout=120).run()
    at.switch_page("views/hash_codes.py").run()
    at.selectbox(key="run").set_value(ids[run]).run()
    assert not at.exception, at.exception
    text = " ".join(e.value for e in [*at.caption, *at.info])
    assert expect in text


def test_bad_codes_spec_is_one_line_and_store_untouched(minilm_store):
    before = fingerprint(minilm_store)
    out = run_cli("probe", "--model", "minilm", "--store", str(minilm_store), "--codes", "every:0")
    assert out.returncode == 2 and out.stderr.startswith("error: --codes 'every:0'")
    assert len(out.stderr.strip().splitlines()) == 1 and fingerprint(minilm_store) == before


def test_synthetic_model_has_the_real_shape_and_probes_right(tmp_path, monkeypatch):
    """A 1-layer GPT-2-small-shaped synthetic model: the stored n_active equals a count on
    plain HF forward hooks of the same random weights."""
    from sparsescope.probes import synthetic

    monkeypatch.setenv("SPARSESCOPE_SYNTHETIC", str(tmp_path / "synth"))
    spec = "synthetic:gpt2-small:1"
    config = ProbeConfig(max_tokens=256, seq_len=64, batch_size=2)
    (run_id,) = run_probe(spec, "stdlib-docs", tmp_path / "s", config, quiet=True)
    r = Reader(tmp_path / "s")
    model = r.sql("SELECT * FROM models").iloc[0]
    assert (model["n_layers"], model["d_model"], model["d_mlp"]) == (1, 768, 3072)
    tokens = r.sql("SELECT seq_id, token_id FROM tokens ORDER BY seq_id, pos")
    hf = synthetic.build(spec, causal_lm=False)
    acts = []
    hf.h[0].mlp.act.register_forward_hook(lambda m, i, o: acts.append(o.reshape(-1, 3072)))
    with torch.inference_mode():
        for _, seq in tokens.groupby("seq_id", sort=True):
            hf(input_ids=torch.tensor(seq["token_id"].to_numpy())[None])
    expected = (torch.cat(acts) > 0).sum(1).numpy()
    got = r.sql("SELECT n_active FROM layer_token_stats ORDER BY seq_id, pos")["n_active"]
    np.testing.assert_array_equal(got.to_numpy(), expected)
    for bad in ("synthetic:nope", "synthetic:gpt2-small:0", "synthetic:gpt2-small:x"):
        out = run_cli("probe", "--model", bad, "--store", str(tmp_path / "t"))
        assert out.returncode == 2 and "synthetic:<shape>" in out.stderr
        assert not (tmp_path / "t").exists()


def test_bench_store_times_every_page_and_recipe(tmp_path, monkeypatch):
    import json

    from sparsescope.app.bench_store import PAGES, README, readme_queries

    monkeypatch.setenv("SPARSESCOPE_SYNTHETIC", str(tmp_path / "synth"))
    out = tmp_path / "bench.json"
    done = run_cli(
        "bench", "store", "--tokens", "3000", "--repeats", "2", "--json", str(out),
        "--store", str(tmp_path / "s"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["token_layer_rows"] == 6 * 3000  # pythia-14m's 6 layers
    assert [p["page"] for p in result["pages"]] == [
        p.removeprefix("views/").removesuffix(".py") for p in PAGES
    ]
    assert len(result["recipes"]) == len(readme_queries(README.read_text())) >= 8
    assert all(p["queries_p95_s"] >= p["queries_p50_s"] >= 0 for p in result["pages"])
