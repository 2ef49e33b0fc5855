"""Architectures whose attention or activation the probe once got wrong, probed as local
folders of tiny random-initialised models and checked against the plain Hugging Face model
(its own attention implementation) with forward hooks on the MLP activation."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sparsescope.probes.job import ProbeConfig, run_probe
from sparsescope.probes.models import minilm_path
from sparsescope.store.reader import Reader

VOCAB = 30528  # MiniLM's tokenizer (30522 ids) fits
ARCHS = {  # model_type -> (config fields, activation module of layer i, expected act_fn)
    "bloom": ({"hidden_size": 64, "n_head": 4, "n_layer": 2}, "transformer.h.{}.mlp.gelu_impl",
              "gelu"),
    "falcon": ({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                "new_decoder_architecture": False}, "transformer.h.{}.mlp.act", "gelu"),
    "gpt2": ({"n_embd": 64, "n_head": 4, "n_layer": 2}, "transformer.h.{}.mlp.act", "gelu_new"),
}  # fmt: skip


def _folder(tmp_path, model_type: str):
    fields, _, _ = ARCHS[model_type]
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path / model_type
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt"):  # fmt: skip
        shutil.copy(minilm_path() / name, folder / name)
    return folder


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_probe_equals_the_models_own_forward(tmp_path, model_type):
    folder = _folder(tmp_path, model_type)
    store = tmp_path / "s"
    config = ProbeConfig(max_tokens=384, seq_len=48, batch_size=4)
    run_probe(str(folder), "stdlib-docs", store, config, quiet=True)
    r = Reader(store)
    assert r.sql("SELECT act_fn FROM models").iloc[0, 0] == ARCHS[model_type][2]
    tokens = r.sql("SELECT seq_id, token_id FROM tokens ORDER BY seq_id, pos")
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()  # its own attention
    acts: dict[int, list] = {}
    for layer in range(2):
        module = hf.get_submodule(ARCHS[model_type][1].format(layer))
        module.register_forward_hook(
            lambda m, i, o, layer=layer: acts.setdefault(layer, []).append(o.reshape(-1, 256))
        )
    with torch.inference_mode():
        for _, seq in tokens.groupby("seq_id", sort=True):
            hf(input_ids=torch.tensor(seq["token_id"].to_numpy())[None])
    stats = r.sql("SELECT layer, n_active FROM layer_token_stats ORDER BY layer, seq_id, pos")
    for layer in range(2):
        expected = (torch.cat(acts[layer]) > 0).sum(1).numpy()
        got = stats[stats["layer"] == layer]["n_active"].to_numpy()
        np.testing.assert_array_equal(got, expected, err_msg=f"{model_type} layer {layer}")
