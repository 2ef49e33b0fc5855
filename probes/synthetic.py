"""Synthetic models: random-initialised Hugging Face models with a real model's layer shapes.

``synthetic:<shape>`` or ``synthetic:<shape>:<n_layers>`` builds, offline, a model of the
architecture and widths of a published checkpoint with only a few layers, for benchmarks at
real widths without downloads. The weights are drawn from a fixed seed, so the same spec
gives the same model; the tokenizer is MiniLM's (its ids fit every vocabulary here).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from sparsescope.store.errors import BadInput

SEED = 0
SHAPES: dict[str, tuple[str, dict, int]] = {  # shape -> (model_type, config fields, layers)
    "llama-3-8b": (
        "llama",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "max_position_embeddings": 8192,
            "rope_theta": 500000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
        },
        2,
    ),
    "pythia-14m": (
        "gpt_neox",
        {
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_attention_heads": 4,
            "vocab_size": 50304,
            "max_position_embeddings": 2048,
            "rotary_pct": 0.25,
            "hidden_act": "gelu",
        },
        6,
    ),
    "gpt2-small": (
        "gpt2",
        {"n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257},
        12,
    ),
}


class SyntheticError(BadInput):
    """A synthetic spec that names no known shape; the message is one line."""


def parse(spec: str) -> tuple[str, int]:
    """``synthetic:<shape>[:<n_layers>]`` -> (shape, n_layers)."""
    shape, _, layers = spec.removeprefix("synthetic:").partition(":")
    if shape not in SHAPES or (layers and not (layers.isdigit() and 1 <= int(layers) <= 256)):
        raise SyntheticError(
            f"model {spec!r}: use synthetic:<shape>[:<n_layers>] with shape one of"
            f" {', '.join(SHAPES)} and 1-256 layers"
        )
    return shape, int(layers) if layers else SHAPES[shape][2]


def config(spec: str):
    """The Hugging Face config of a synthetic spec."""
    from transformers import AutoConfig

    shape, n_layers = parse(spec)
    model_type, fields, _ = SHAPES[shape]
    layer_key = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
    return AutoConfig.for_model(model_type, **fields, **{layer_key: n_layers})


def folder(spec: str) -> Path:
    """A folder with the spec's config.json and the tokenizer (no weights), made once."""
    from sparsescope.probes.models import minilm_path

    shape, n_layers = parse(spec)
    root = Path(os.environ.get("SPARSESCOPE_SYNTHETIC", Path.home() / ".cache/sparsescope/synth"))
    out = root / f"{shape}-l{n_layers}"
    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "vocab.txt"):  # fmt: skip
            shutil.copy(minilm_path() / name, out / name)
        config(spec).save_pretrained(out)
    return out


def build(spec: str, dtype: torch.dtype = torch.float32, causal_lm: bool = True):
    """The random-initialised model of a spec (weights from ``SEED``): a causal LM, or its
    backbone (``AutoModel``) for a bare forward."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal_lm else AutoModel
    torch.manual_seed(SEED)
    return cls.from_config(config(spec), torch_dtype=dtype, attn_implementation="sdpa").eval()
