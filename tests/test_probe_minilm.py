"""Probes on MiniLM against an independent plain-Hugging-Face forward with torch hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsescope.store.reader import Reader
from tests.conftest import hf_minilm_activations


@pytest.fixture(scope="module")
def independent(minilm_store):
    """Re-run the stored tokens through plain BertModel; hook each layer's GELU output."""
    reader = Reader(minilm_store)
    tokens = reader.sql("SELECT seq_id, pos, token_id FROM tokens ORDER BY seq_id, pos")
    return reader, tokens, hf_minilm_activations(tokens)


def test_n_active_equals_independent_count_of_gelu_output_above_zero(independent):
    reader, tokens, acts = independent
    stats = reader.sql("SELECT layer, n_active FROM layer_token_stats ORDER BY layer, seq_id, pos")
    assert len(acts) == 6 and len(stats) == 6 * len(tokens)
    for layer, a in acts.items():
        expected = (a > 0).sum(1)
        got = stats[stats["layer"] == layer]["n_active"].to_numpy()
        mismatch = np.abs(got - expected)
        # float kernels differ in the last bits between bridge and plain HF: a neuron
        # whose GELU output is ~1e-7 from zero may flip; allow a handful in the layer
        assert mismatch.sum() <= 1e-5 * a.size, (layer, mismatch.sum())
        assert mismatch.max() <= 1


def test_l1_and_max_abs_equal_independent(independent):
    reader, _, acts = independent
    stats = reader.sql(
        "SELECT layer, l1, max_abs FROM layer_token_stats ORDER BY layer, seq_id, pos"
    )
    for layer, a in acts.items():
        part = stats[stats["layer"] == layer]
        np.testing.assert_allclose(part["l1"], np.abs(a).sum(1), rtol=1e-4)
        np.testing.assert_allclose(part["max_abs"], np.abs(a).max(1), rtol=1e-4, atol=1e-5)


def test_neuron_stats_equal_independent_sums(independent):
    reader, _, acts = independent
    df = reader.sql("SELECT * FROM neuron_stats ORDER BY layer, neuron")
    for layer, a in acts.items():
        part = df[df["layer"] == layer]
        assert (part["n_tokens"] == a.shape[0]).all()
        np.testing.assert_allclose(part["n_active"], (a > 0).sum(0), atol=2)
        np.testing.assert_allclose(part["sum"], a.astype(np.float64).sum(0), rtol=1e-4, atol=1e-2)
        np.testing.assert_allclose(part["sum_sq"], (a.astype(np.float64) ** 2).sum(0), rtol=1e-4)
        np.testing.assert_allclose(part["max"], a.max(0), rtol=1e-4, atol=1e-5)


def test_neuron_top_equals_brute_force_top_k(independent):
    reader, tokens, acts = independent
    top = reader.sql(
        "SELECT layer, neuron, rank, seq_id, pos, value FROM neuron_top"
        " WHERE layer IN (0, 5) ORDER BY layer, neuron, rank"
    )
    keys = tokens["seq_id"].to_numpy() * 10_000 + tokens["pos"].to_numpy()
    for layer in (0, 5):
        a = acts[layer]
        order = np.argsort(-a, axis=0, kind="stable")[:20]  # [20, d]
        part = top[top["layer"] == layer]
        values = part["value"].to_numpy().reshape(-1, 20)  # [d, 20]
        np.testing.assert_allclose(values, np.take_along_axis(a, order, 0).T, rtol=1e-4, atol=1e-5)
        got_keys = (part["seq_id"] * 10_000 + part["pos"]).to_numpy().reshape(-1, 20)
        # ranks can swap only between near-equal values; the sets must match
        agree = np.mean([set(g) == set(e) for g, e in zip(got_keys, keys[order].T, strict=True)])
        assert agree > 0.99


def test_hash_codes_are_packed_firing_bits_msb_first(independent):
    reader, _, acts = independent
    codes = reader.sql("SELECT layer, code, n_active FROM hash_codes ORDER BY layer, seq_id, pos")
    a = acts[2]
    part = codes[codes["layer"] == 2]
    bits = np.unpackbits(
        np.frombuffer(b"".join(part["code"]), np.uint8).reshape(len(part), -1),
        axis=1,
        bitorder="big",
    )[:, : a.shape[1]]
    assert (bits == (a > 0)).mean() > 0.99999
    assert (bits.sum(1) == part["n_active"].to_numpy()).all()
    # DuckDB reads the same bits: bit_count over the BLOB cast to BIT equals n_active
    n = reader.sql("SELECT count(*) AS n FROM hash_codes WHERE bit_count(code::BIT) != n_active")[
        "n"
    ][0]
    assert n == 0


def test_equal_codes_have_equal_code64(minilm_store):
    df = Reader(minilm_store).sql(
        "SELECT count(DISTINCT code) AS a, count(DISTINCT code64) AS b"
        " FROM hash_codes GROUP BY layer"
    )
    assert (df["a"] == df["b"]).all()


def test_run_and_model_recorded(minilm_store):
    reader = Reader(minilm_store)
    run = reader.sql("SELECT * FROM runs").iloc[0]
    assert run["status"] == "complete" and run["model_id"] == "minilm"
    assert run["n_tokens"] == reader.sql("SELECT count(*) AS n FROM tokens")["n"][0]
    model = reader.sql("SELECT * FROM models").iloc[0]
    assert (model["n_layers"], model["d_mlp"], model["d_model"]) == (6, 1536, 384)
    assert model["act_fn"] == "gelu"


def test_lean_forward_matches_the_bridge_and_is_undone():
    from sparsescope.probes.models import load_model

    model = load_model("minilm")
    ids = torch.randint(1000, 20000, (2, 32), generator=torch.Generator().manual_seed(0))
    seen = []
    model.bridge.hook_dict["blocks.0.ln1.hook_scale"].add_hook(lambda t, hook: seen.append(1))
    with torch.inference_mode():
        full = model.backbone()(input_ids=ids).last_hidden_state
        with model.fast_attention(), model.native_norms():
            lean = model.backbone()(input_ids=ids).last_hidden_state
    model.bridge.reset_hooks()
    torch.testing.assert_close(lean, full, rtol=1e-5, atol=1e-5)
    assert len(seen) == 2  # a norm with a hook attached keeps the bridge's path
    assert not any("forward" in m.__dict__ for m in model.bridge.modules())
    assert model.bridge.original_model.config._attn_implementation == "eager"
