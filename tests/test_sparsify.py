"""Sparsified models (kernels.sparsify): losslessness, achieved sparsity, restore, probes, CLI,
and the Kernels dashboard page. Tiny random GPT-2 / Llama checkpoints, CPU (torch reference)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from sparsescope.analysis.sparsify_eval import EvalConfig, evaluate, token_batches
from sparsescope.app.kernels_cli import kernels_app
from sparsescope.app.state import STORE_ENV
from sparsescope.kernels import reference
from sparsescope.kernels.sparsify import (
    INPUT_SIDE,
    METHODS,
    SparseLinear,
    capture,
    sparsify,
    union_sparsity,
    weight_count,
)
from sparsescope.probes.data import DataError, stdlib_docs
from sparsescope.probes.hooks import hooked
from sparsescope.probes.models import load_model
from sparsescope.probes.sparsified import parse_sparsify
from sparsescope.store.reader import Reader
from tests.conftest import run_cli

ROOT = Path(__file__).parents[1]
TARGET_METHODS = [m for m in METHODS if m != "relu-exact"]
CFG = EvalConfig(tokens=1024, calib_tokens=2048, seq_len=64, batch_size=8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny random causal LMs saved as Hugging Face folders with a BPE tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from sparsescope.probes.tokenizer import train_tokenizer

    tok = train_tokenizer(itertools.islice(stdlib_docs("train"), 300), 300, 128)
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    gpt2 = dict(vocab_size=300, n_positions=128, n_embd=32, n_layer=2, n_head=2, n_inner=128)
    models = {
        "gpt2-relu": GPT2LMHeadModel(GPT2Config(**gpt2, activation_function="relu")),
        "gpt2-gelu": GPT2LMHeadModel(GPT2Config(**gpt2, activation_function="gelu")),
        "llama": LlamaForCausalLM(LlamaConfig(
            vocab_size=300, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)),
    }  # fmt: skip
    for name, model in models.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {name: root / name for name in models}


@pytest.fixture(scope="module")
def loaded(folders):
    """name -> (LoadedModel, calibration, held-out batches)."""
    out = {}
    for name, folder in folders.items():
        model = load_model(str(folder))
        calib = token_batches(model, "stdlib-docs", CFG.calib_tokens, CFG)
        held = token_batches(model, "stdlib-docs:heldout", CFG.tokens, CFG)
        out[name] = (model, capture(model, calib), held)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model.bridge.original_model(input_ids=ids).logits


def _zero_fraction(model, held, site=None) -> float:
    """Share of exact zeros averaged over layers: at ``hook_post`` (a TransformerLens hook),
    or, with ``site="in"``, at the input the gate/up projection multiplies (a torch hook)."""
    counts = [[0, 0] for _ in range(model.n_layers)]

    def count(layer, t):
        counts[layer][0] += int((t == 0).sum())
        counts[layer][1] += t.numel()

    tl_hooks = [(f"blocks.{i}.mlp.hook_post", lambda t, hook, i=i: count(i, t))
                for i in range(model.n_layers)] if site is None else []  # fmt: skip
    torch_hooks = [b.mlp.get_submodule(site).original_component.register_forward_pre_hook(
        lambda m, args, i=i: count(i, args[0])) for i, b in enumerate(model.bridge.blocks)
        ] if site else []  # fmt: skip
    try:
        with torch.no_grad(), hooked(model.bridge, tl_hooks):
            for ids in held:
                model.backbone()(input_ids=ids)
    finally:
        for h in torch_hooks:
            h.remove()
    return sum(z / n for z, n in counts) / len(counts)


def test_relu_exact_is_lossless(loaded):
    model, cal, held = loaded["gpt2-relu"]
    short, batch = held[0][:1, :48], held[0]  # 48 rows: sparse kernel path; 512: prefill path
    dense_short, dense_batch = _logits(model, short), _logits(model, batch)
    handle = sparsify(model, "relu-exact", 0.0, cal)
    try:
        torch.testing.assert_close(_logits(model, short), dense_short, rtol=0, atol=1e-5)
        assert torch.equal(_logits(model, batch), dense_batch)
        assert handle.calibrated > 0.3  # the random ReLU model skips about half its neurons
    finally:
        handle.restore()


@pytest.mark.parametrize("name", ["gpt2-gelu", "llama"])
@pytest.mark.parametrize("method", TARGET_METHODS)
def test_every_method_hits_its_target_on_heldout(loaded, name, method):
    model, cal, held = loaded[name]
    assert _zero_fraction(model, held) < 0.01
    for target in (0.5, 0.8):
        handle = sparsify(model, method, target, cal)
        try:
            achieved = _zero_fraction(model, held)
            if method in INPUT_SIDE:  # the gate/up input is masked too
                achieved = (achieved + _zero_fraction(model, held, "in")) / 2
        finally:
            handle.restore()
        assert abs(achieved - target) < 0.06, (method, target, achieved)


def test_union_sparsity_of_independent_masks_is_the_power_law():
    """Channels kept independently with p = .3: the union of B tokens drops .7^B of them."""
    g = torch.Generator().manual_seed(0)
    union = union_sparsity(torch.rand(8192, 256, generator=g) < 0.3)
    assert sorted(union) == [1, 2, 4, 8, 16, 32, 64]
    for b, s in union.items():
        assert s == pytest.approx(0.7**b, abs=0.01), b


def test_dense_fallback_follows_the_batch_size(monkeypatch):
    """Per-token sparsity .7 is above the crossover .5, the union of 2 or more tokens below it:
    one token runs sparse, 3 or 4 run dense; both give x @ W^T + b."""
    calls = []
    monkeypatch.setattr(reference, "dense_matmul", _spy(calls, "dense", reference.dense_matmul))
    monkeypatch.setattr(
        reference, "sparse_matmul_ref", _spy(calls, "sparse", reference.sparse_matmul_ref)
    )
    dense = torch.nn.Linear(12, 5)
    layer = SparseLinear(dense, {1: 0.7, 2: 0.49, 4: 0.24}, crossover=0.5)
    for rows, path in ((1, "sparse"), (3, "dense"), (4, "dense")):
        x = torch.randn(rows, 12)
        torch.testing.assert_close(layer(x), x @ dense.weight.T + dense.bias)
        assert calls.pop() == path and not calls, rows


def _spy(calls: list, name: str, fn):
    def wrapped(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("name", ["gpt2-relu", "llama"])
def test_restore_gives_back_bit_identical_dense_outputs(loaded, name):
    model, cal, held = loaded[name]
    ids = held[0]
    dense = _logits(model, ids)
    modules = [m.original_component for b in model.bridge.blocks for m in b.mlp.children()
               if hasattr(m, "original_component")]  # fmt: skip
    for method in METHODS:
        handle = sparsify(model, method, 0.7, cal)
        if method != "relu-exact":
            assert not torch.equal(_logits(model, ids), dense)
        handle.restore()
        assert torch.equal(_logits(model, ids), dense)
    again = [m.original_component for b in model.bridge.blocks for m in b.mlp.children()
             if hasattr(m, "original_component")]  # fmt: skip
    assert all(a is b for a, b in zip(modules, again, strict=True))


def test_double_sparsify_and_bad_method_are_refused(loaded):
    model, cal, _ = loaded["llama"]
    with pytest.raises(ValueError, match="unknown sparsify method"):
        sparsify(model, "nope", 0.5, cal)
    handle = sparsify(model, "cett", 0.5, cal)
    try:
        with pytest.raises(ValueError, match="already sparsified"):
            sparsify(model, "cett", 0.5, cal)
    finally:
        handle.restore()


def test_parse_sparsify():
    assert parse_sparsify("threshold:0.5") == ("threshold", 0.5)
    assert parse_sparsify("relu-exact") == ("relu-exact", 0.0)
    for bad in ("threshold", "teal:0.5", "wina:1.5", "cett:x"):
        with pytest.raises(DataError, match="--sparsify"):
            parse_sparsify(bad)


@pytest.mark.parametrize("name", ["gpt2-gelu", "llama"])
def test_probes_see_what_the_sparse_model_computes(loaded, tmp_path, name):
    """``ProbeConfig(sparsify=...)``: the stored firing counts are the neurons the sparse
    down projections multiply (a global torch hook on every SparseLinear input and, for the
    gated MLP, on the gate projection's output: gate > 0 and a ≠ 0), and the job leaves the
    dense model behind."""
    from sparsescope.kernels.sparsify import SparseLinear
    from sparsescope.probes.job import ProbeConfig, probe_model

    model, _, _ = loaded[name]
    config = ProbeConfig(max_tokens=512, seq_len=64, batch_size=4, sparsify="threshold:0.7")
    outs = [b.mlp.out for b in model.bridge.blocks]
    gates = [getattr(b.mlp, "gate", None) for b in model.bridge.blocks]
    seen: list[list[torch.Tensor]] = [[] for _ in outs]
    gate_out: dict[int, torch.Tensor] = {}

    def count(module, args):
        for layer, out in enumerate(outs):
            if module is out.original_component and isinstance(module, SparseLinear):
                a = args[0].reshape(-1, args[0].shape[-1])
                fires = a > 0 if gates[layer] is None else (gate_out.pop(layer) > 0) & (a != 0)
                seen[layer].append(fires.sum(-1))

    def gate_hook(module, args, out):
        for layer, gate in enumerate(gates):
            if gate is not None and module is gate.original_component:
                gate_out[layer] = out.reshape(-1, out.shape[-1])

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(count),
             torch.nn.modules.module.register_module_forward_hook(gate_hook)]  # fmt: skip
    try:
        run_id = probe_model(model, "stdlib-docs", tmp_path, config, quiet=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert not any(isinstance(out.original_component, SparseLinear) for out in outs)
    stats = Reader(tmp_path).sql(
        "SELECT layer, n_active FROM layer_token_stats WHERE run_id = ?"
        " ORDER BY layer, seq_id, pos",
        [run_id],
    )
    expected = torch.cat([torch.cat(s) for s in seen]).numpy()
    assert len(expected) == 512 * model.n_layers
    assert (stats["n_active"].to_numpy() == expected).all()
    # firing share is at most ~30% (threshold at 0.7 keeps |a| above the 70% quantile)
    assert stats["n_active"].mean() / model.d_mlp < 0.35


def test_model_ceiling_counts_the_skipped_weight_rows(loaded):
    """relu-exact on ReLU GPT-2: 1/ρ = total / (total − Σ_l zeros_l · |W_out|), with the
    weights counted from the config and the zeros of a at each layer's hook_post."""
    model, cal, held = loaded["gpt2-relu"]
    cfg = model.bridge.original_model.config
    d, f, L = cfg.n_embd, cfg.n_inner, cfg.n_layer
    total = L * (4 * d * d + 2 * d * f) + cfg.vocab_size * d  # attention, MLP, tied LM head
    assert weight_count(model) == total
    zeros = [[0, 0] for _ in range(L)]

    def count(t, hook, layer):
        zeros[layer][0] += int((t == 0).sum())
        zeros[layer][1] += t.numel()

    hooks = [(f"blocks.{i}.mlp.hook_post", lambda t, hook, i=i: count(t, hook, i))
             for i in range(L)]  # fmt: skip
    handle = sparsify(model, "relu-exact", 0.0, cal)
    try:
        assert weight_count(model) == total  # the swapped projections are still counted
        handle.track = True
        with hooked(model.bridge, hooks):
            for ids in held:
                _logits(model, ids)
    finally:
        handle.restore()
    skipped = sum(z / n * f * d for z, n in zeros)
    assert handle.ceiling(total) == pytest.approx(total / (total - skipped), rel=1e-9)
    assert handle.ceiling(total) > 1.1


def test_evaluate_rows(loaded):
    assert all(loaded[name][0].is_causal_lm for name in ("gpt2-relu", "llama"))
    model, cal, held = loaded["llama"]
    rows = evaluate(model, ["relu-exact", "threshold", "cett"], [0.5, 0.8], held[:1], cal)
    assert [(r["method"], r["target"]) for r in rows] == [
        ("relu-exact", 0.0), ("threshold", 0.5), ("threshold", 0.8), ("cett", 0.5), ("cett", 0.8)
    ]  # fmt: skip
    ids = held[0]
    logits = _logits(model, ids)[:, :-1].flatten(0, 1)
    ppl = float(torch.nn.functional.cross_entropy(logits, ids[:, 1:].flatten()).exp())
    for r in rows:
        assert r["metric"] == "ppl" and r["dense_value"] == pytest.approx(ppl, rel=1e-5)
        assert r["relative_increase"] == pytest.approx(r["sparse_value"] / ppl - 1, abs=1e-5)
        assert r["achieved_sparsity"] == pytest.approx(r["target"], abs=0.06)
    assert abs(rows[0]["relative_increase"]) < 1e-5 < abs(rows[2]["relative_increase"])


def test_sparsify_eval_cli_on_minilm(tmp_path):
    result = CliRunner().invoke(kernels_app, [
        "sparsify-eval", "--model", "minilm", "--methods", "relu-exact,threshold",
        "--targets", "0.5", "--store", str(tmp_path), "--tokens", "256",
        "--calib-tokens", "512"])  # fmt: skip
    assert result.exit_code == 0, result.output
    df = Reader(tmp_path).sql("SELECT * FROM sparsify_eval ORDER BY method")
    kind = Reader(tmp_path).sql("SELECT kind FROM runs")["kind"].tolist()
    assert kind == ["sparsify-eval"] and set(df["metric"]) == {"emb_rel_change"}
    relu, thr = df.iloc[0], df.iloc[1]
    assert relu["method"] == "relu-exact" and relu["sparse_value"] < 1e-5  # GELU: no exact zeros
    assert thr["sparse_value"] > 1e-3 and abs(thr["achieved_sparsity"] - 0.5) < 0.06
    bad = run_cli("sparsify-eval", "--model", "minilm", "--methods", "teal", "--store",
                  str(tmp_path))  # fmt: skip
    assert bad.returncode == 2 and "unknown" in bad.stderr


def _bench_store(tmp_path: Path) -> tuple[Path, list[dict]]:
    rows = json.loads((ROOT / "benchmarks/results/kernel_bench_h100.json").read_text())[:40]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    store = tmp_path / "store"
    result = CliRunner().invoke(kernels_app, ["bench-kernels", "--store", str(store),
                                              "--from-json", str(path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    return store, rows


def test_bench_kernels_from_json_round_trips(tmp_path):
    store, rows = _bench_store(tmp_path)
    df = Reader(store).sql("SELECT * FROM kernel_bench")
    assert Reader(store).sql("SELECT kind FROM runs")["kind"].tolist() == ["bench"]
    got = df.drop(columns=["run_id"]).sort_values(["kernel", "method", "batch", "sparsity"])
    want = sorted(rows, key=lambda r: (r["kernel"], r["method"], r["batch"], r["sparsity"]))
    for g, w in zip(got.to_dict("records"), want, strict=True):
        assert g == pytest.approx({k: w[k] for k in g})
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    result = run_cli("bench", "kernels", "--store", str(store), "--from-json", str(bad))
    assert result.returncode == 2 and "not valid JSON" in result.stderr


def test_kernels_page(monkeypatch, tmp_path, loaded):
    from sparsescope.store.catalog import init_store
    from sparsescope.store.writer import RunWriter

    monkeypatch.setenv(STORE_ENV, str(init_store(tmp_path / "empty")))
    at = AppTest.from_file(str(ROOT / "app/views/kernels.py"), default_timeout=60).run()
    assert not at.exception and at.info
    store, _ = _bench_store(tmp_path)
    model, cal, held = loaded["llama"]
    rows = evaluate(model, ["threshold"], [0.5], held[:1], cal)
    with RunWriter(store, "sparsify-eval", model.model_id, "heldout", {}) as w:
        w.write("sparsify_eval", {k: [r[k] for r in rows] for k in rows[0]})
        w.commit()
    monkeypatch.setenv(STORE_ENV, str(store))
    at = AppTest.from_file(str(ROOT / "app/views/kernels.py"), default_timeout=60).run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == 4 and not at.info  # speed, bandwidth, quality ×2
