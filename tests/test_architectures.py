"""The architecture matrix: tiny random-initialised models of 22 Hugging Face architectures,
probed as local folders, against the plain Hugging Face model (its own attention
implementation) with forward hooks on each MLP's firing source: the activation output, the
gate projection of gated MLPs (σ(g) > 0 ⇔ g > 0), the gate half of Phi-3's fused gate_up,
or OPT's fc1 before its ReLU."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from sparsescope.analysis.hash_codes import run_codes
from sparsescope.probes.job import ProbeConfig, run_probe
from sparsescope.probes.models import minilm_path
from sparsescope.store.reader import Reader

VOCAB = 30528  # MiniLM's tokenizer (30522 ids) fits
D_MLP = 128
BASE = {"hidden_size": 64, "intermediate_size": D_MLP, "num_attention_heads": 4,
        "num_hidden_layers": 2}  # fmt: skip
GQA = {**BASE, "num_key_value_heads": 2, "head_dim": 16}
GATE = "model.layers.{}.mlp.gate_proj"
# model_type -> (config fields, firing-source module of layer i, expected act_fn)
ARCHS = {
    "gpt2": ({"n_embd": 64, "n_head": 4, "n_layer": 2, "n_inner": D_MLP},
             "transformer.h.{}.mlp.act", "gelu_new"),
    "gpt_neox": (BASE, "gpt_neox.layers.{}.mlp.act", "gelu"),
    "llama": (GQA, GATE, "gated-silu"),
    "mistral": (GQA, GATE, "gated-silu"),
    "qwen2": (GQA, GATE, "gated-silu"),
    "qwen3": (GQA, GATE, "gated-silu"),
    "gemma": (GQA, GATE, "gated-gelu_pytorch_tanh"),
    "gemma2": (GQA, GATE, "gated-gelu_pytorch_tanh"),
    "gemma3_text": (GQA, GATE, "gated-gelu_pytorch_tanh"),
    "olmo": (GQA, GATE, "gated-silu"),
    "olmo2": (GQA, GATE, "gated-silu"),
    "granite": (GQA, GATE, "gated-silu"),
    "stablelm": ({**BASE, "num_key_value_heads": 2}, GATE, "gated-silu"),
    "phi": (BASE, "model.layers.{}.mlp.activation_fn", "gelu_new"),
    "phi3": ({**GQA, "pad_token_id": 0}, "model.layers.{}.mlp.gate_up_proj", "gated-silu"),
    "opt": ({"hidden_size": 64, "ffn_dim": D_MLP, "num_attention_heads": 4,
             "num_hidden_layers": 2, "word_embed_proj_dim": 64},
            "model.decoder.layers.{}.fc1", "relu"),
    "gptj": ({"n_embd": 64, "n_head": 4, "n_layer": 2, "rotary_dim": 8, "n_inner": D_MLP},
             "transformer.h.{}.mlp.act", "gelu_new"),
    "bloom": ({"hidden_size": 32, "n_head": 4, "n_layer": 2},  # d_mlp = 4 × hidden
              "transformer.h.{}.mlp.gelu_impl", "gelu"),
    "falcon": ({"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
                "new_decoder_architecture": False}, "transformer.h.{}.mlp.act", "gelu"),
    "starcoder2": ({**BASE, "num_key_value_heads": 2}, "model.layers.{}.mlp.act",
                   "gelu_pytorch_tanh"),
    "bert": (BASE, "bert.encoder.layer.{}.intermediate.intermediate_act_fn", "gelu"),
    "roberta": ({**BASE, "max_position_embeddings": 130},
                "roberta.encoder.layer.{}.intermediate.intermediate_act_fn", "gelu"),
}  # fmt: skip
MASKED = {"bert", "roberta"}


def _model_class(model_type: str):
    return AutoModelForMaskedLM if model_type in MASKED else AutoModelForCausalLM


def _folder(tmp_path, model_type: str):
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **ARCHS[model_type][0])
    torch.manual_seed(0)
    folder = tmp_path / model_type
    _model_class(model_type).from_config(config).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt"):  # fmt: skip
        shutil.copy(minilm_path() / name, folder / name)
    return folder


def _hf_firing(folder, model_type: str, tokens) -> dict[int, np.ndarray]:
    """Per layer, bool [tokens, d_mlp]: where the plain HF model's MLP fires."""
    hf = _model_class(model_type).from_pretrained(folder).eval()
    seen: dict[int, list] = {}
    for layer in range(2):
        module = hf.get_submodule(ARCHS[model_type][1].format(layer))
        keep = seen.setdefault(layer, [])
        module.register_forward_hook(lambda m, i, o, keep=keep: keep.append(o.flatten(0, -2)))
    with torch.inference_mode():
        for _, seq in tokens.groupby("seq_id", sort=True):
            hf(input_ids=torch.tensor(seq["token_id"].to_numpy())[None])
    out = {}
    for layer, parts in seen.items():
        source = torch.cat(parts)
        if model_type == "phi3":  # fused [gate | up]
            source = source[:, : source.shape[1] // 2]
        out[layer] = (source > 0).numpy()
    return out


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_probe_equals_the_models_own_forward(tmp_path, model_type):
    folder = _folder(tmp_path, model_type)
    store = tmp_path / "s"
    run_probe(str(folder), "stdlib-docs", store, ProbeConfig(max_tokens=192, seq_len=48,
              batch_size=4), quiet=True)  # fmt: skip
    r = Reader(store)
    (run_id,) = r.sql("SELECT run_id FROM runs")["run_id"]
    assert r.sql("SELECT act_fn FROM models").iloc[0, 0] == ARCHS[model_type][2]
    tokens = r.sql("SELECT seq_id, token_id FROM tokens ORDER BY seq_id, pos")
    assert len(tokens) == 192 and tokens["token_id"].max() < 30522
    fires = _hf_firing(folder, model_type, tokens)
    stats = r.sql("SELECT layer, n_active FROM layer_token_stats ORDER BY layer, seq_id, pos")
    neurons = r.sql("SELECT layer, neuron, n_active FROM neuron_stats ORDER BY layer, neuron")
    _, codes = run_codes(r, run_id)
    for layer, f in fires.items():
        where = f"{model_type} layer {layer}"
        got = stats[stats["layer"] == layer]["n_active"].to_numpy()
        np.testing.assert_array_equal(got, f.sum(1), err_msg=where)
        per_neuron = neurons[neurons["layer"] == layer]["n_active"].to_numpy()
        np.testing.assert_array_equal(per_neuron, f.sum(0), err_msg=where)
        np.testing.assert_array_equal(codes[layer], np.packbits(f, 1, bitorder="big"), where)


def test_an_architecture_the_bridge_cannot_boot_is_named_in_one_line(tmp_path):
    from tests.conftest import run_cli

    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(
        '{"architectures": ["NoSuchForCausalLM"], "model_type": "nosuch"}'
    )
    out = run_cli("probe", "--model", str(folder), "--store", str(tmp_path / "s"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "architecture NoSuchForCausalLM" in out.stderr and not (tmp_path / "s").exists()
