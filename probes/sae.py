"""Sparse autoencoders (METHODS.md §5): one ``SAE`` module for every architecture SparseScope
reads, and the folder layouts of SAELens and EleutherAI sparsify.

With ``x' = x − b_dec`` (or ``x`` when ``apply_b_dec_to_input`` is false) and
``pre = x' W_enc + b_enc``, the encoders are

- ``standard``: ``z = ReLU(pre)``;
- ``topk`` (and ``gsae``: its training selects latents with the gradient, its inference is
  the plain TopK): ``z = ReLU(TopK_k(pre))``;
- ``jumprelu``: ``z = ReLU(pre) · [pre > threshold]`` (a batchtopk SAE is saved as this);
- ``gated``: ``z = [x' W_enc + b_gate > 0] · ReLU(x' (W_enc ⊙ exp(r_mag)) + b_mag)``;

and the decoder is ``x̂ = z W_dec + b_dec``. A SAELens TopK SAE with
``rescale_acts_by_decoder_norm`` ranks and outputs ``pre ⊙ ‖W_dec‖`` and decodes
``z / ‖W_dec‖``; ``load_sae`` folds the norms into W_enc, b_enc and unit W_dec rows, which
gives the same z and x̂.

Layouts: SAELens (``cfg.json`` + ``sae_weights.safetensors``; the 6.x ``metadata`` block and
the older flat config) and sparsify (``cfg.json`` + ``sae.safetensors`` in one folder per
hookpoint of a training checkpoint, whose ``config.json`` names the model). ``SAE.save``
writes the SAELens 6 layout plus a ``sparsescope`` block.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparsescope.store import catalog
from sparsescope.store.errors import BadInput

CFG, WEIGHTS, SPARSIFY_WEIGHTS = "cfg.json", "sae_weights.safetensors", "sae.safetensors"
ARCHS = ("standard", "topk", "gsae", "jumprelu", "gated")
TOPK = ("topk", "gsae")
# SAELens 6 ``metadata`` keys SparseScope reads and writes (``hook_name`` is ``SAE.hook_name``)
METADATA = (
    "model_name", "model_class_name", "hook_head_index", "context_size", "prepend_bos",
    "seqpos_slice", "dataset_path", "model_from_pretrained_kwargs", "neuronpedia_id",
)  # fmt: skip
SAELENS_LAYOUT = "6.0.0"  # SAELens reads a cfg.json as its 6.x layout from this version on


class SaeError(BadInput):
    """A SAE folder cannot be read; the message is one line."""


class SAE(nn.Module):
    """A SAE on the activation at ``hook_name``; ``k`` is None unless ``arch`` is TopK."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int | None,
        hook_name: str,
        arch: str = "topk",
        apply_b_dec_to_input: bool = True,
        meta: dict | None = None,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise SaeError(f"unknown SAE architecture {arch!r}: use one of {', '.join(ARCHS)}")
        if arch in TOPK and not (isinstance(k, int) and 0 < k <= d_sae):
            raise SaeError(f"k = {k} must be an integer between 1 and d_sae = {d_sae}")
        self.d_in, self.d_sae, self.hook_name, self.arch = d_in, d_sae, hook_name, arch
        self.k = k if arch in TOPK else None
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.meta = dict(meta or {})  # SAELens metadata (model_name, ...) and our own keys
        dec = torch.randn(d_sae, d_in)
        dec /= dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(dec)
        self.W_enc = nn.Parameter(dec.T.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if arch == "gated":
            self.b_gate = nn.Parameter(torch.zeros(d_sae))
            self.r_mag = nn.Parameter(torch.zeros(d_sae))
            self.b_mag = nn.Parameter(torch.zeros(d_sae))
        else:
            self.b_enc = nn.Parameter(torch.zeros(d_sae))
        if arch == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae))

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``pre = x' W_enc + b_enc`` (gated: the gate's, with ``b_gate``)."""
        return self._input(x) @ self.W_enc + (self.b_gate if self.arch == "gated" else self.b_enc)

    def select(self, pre: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """TopK codes: ``ReLU(pre)`` at the top-k of ``scores`` (default: ``pre``), else 0."""
        idx = (pre if scores is None else scores).topk(self.k, dim=-1).indices
        return torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).relu())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        if self.arch in TOPK:
            return self.select(pre)
        if self.arch == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        if self.arch == "gated":
            magnitude = self._input(x) @ (self.W_enc * self.r_mag.exp()) + self.b_mag
            return (pre > 0) * magnitude.relu()
        return pre.relu()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component along each (unit) decoder row."""
        if self.W_dec.grad is not None:
            w, g = self.W_dec, self.W_dec.grad
            g -= (g * w).sum(1, keepdim=True) * w

    def config(self) -> dict:
        """``cfg.json`` in the SAELens 6 layout, our own keys in a ``sparsescope`` block."""
        metadata = {key: value for key, value in self.meta.items() if key in METADATA}
        ours = {key: value for key, value in self.meta.items() if key not in METADATA}
        cfg = {
            "architecture": "topk" if self.arch in TOPK else self.arch,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {
                "sae_lens_version": SAELENS_LAYOUT,
                "sae_lens_training_version": None,
                "hook_name": self.hook_name,
                "hook_head_index": None,
                **metadata,
            },
            "sparsescope": {"arch": self.arch, **ours},
        }
        if self.arch in TOPK:
            cfg |= {"k": self.k, "rescale_acts_by_decoder_norm": False}
        return cfg

    def save(self, folder: Path) -> Path:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {
            name: p.detach().float().cpu().contiguous() for name, p in self.named_parameters()
        }
        save_file(weights, str(folder / WEIGHTS))
        (folder / CFG).write_text(json.dumps(self.config(), indent=1))
        return folder


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SaeError(f"{path}: not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise SaeError(f"{path}: not a JSON object")
    return value


def _weights_file(folder: Path) -> Path:
    """The folder's weights file (SAELens or sparsify), after checking it has a cfg.json."""
    for name in (WEIGHTS, SPARSIFY_WEIGHTS):
        if (folder / CFG).is_file() and (folder / name).is_file():
            return folder / name
    inner = [*folder.glob(f"*/{CFG}"), *folder.glob(f"*/*/{CFG}")] if folder.is_dir() else []
    if inner and not (folder / CFG).exists():
        names = sorted(str(p.parent.relative_to(folder)) for p in inner)
        raise SaeError(
            f"{folder} holds several SAEs ({', '.join(names[:4])}{', ...' * (len(names) > 4)}):"
            f" name one folder, e.g. {folder / names[0]}"
        )
    raise SaeError(
        f"SAE folder {folder} needs {CFG} with {WEIGHTS} (SAELens) or {SPARSIFY_WEIGHTS} (sparsify)"
    )


def _tensors(path: Path, expected: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The file's tensors as float32, checked against ``expected`` names and shapes."""
    try:
        raw = load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for a bad file
        detail = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise SaeError(f"{path}: cannot be read ({detail})") from None
    scale = raw.pop("scaling_factor", None)  # SAELens's finetuning scale; all ones is a no-op
    if scale is not None and not torch.all(scale == 1):
        raise SaeError(f"{path}: a finetuning scaling_factor other than 1 is not supported")
    missing, extra = sorted(expected.keys() - raw.keys()), sorted(raw.keys() - expected.keys())
    if missing or extra:
        parts = [f"lacks {', '.join(missing)}"] * bool(missing)
        parts += [f"has unexpected {', '.join(extra)}"] * bool(extra)
        raise SaeError(f"{path}: {' and '.join(parts)} for its architecture")
    for name, shape in expected.items():
        if tuple(raw[name].shape) != shape:
            got = tuple(raw[name].shape)
            raise SaeError(f"{path}: {name} has shape {got}, the config implies {shape}")
    return {name: tensor.float() for name, tensor in raw.items()}


def _int(cfg: dict, key: str, where: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SaeError(f"{where}: {key} must be a positive integer, not {value!r}")
    return value


# SAELens before 6.0 named these keys differently
_RENAMED = {
    "hook_point": "hook_name",
    "hook_point_head_index": "hook_head_index",
    "activation_fn_str": "activation_fn",
}


def _saelens(folder: Path) -> tuple[SAE, dict[str, torch.Tensor]]:
    """A SAELens folder: the SAE (on the meta device) and its tensors."""
    path = folder / CFG
    cfg = _read_json(path)
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    # one flat dict, as before 6.0 (a top-level key wins over the same key in metadata)
    flat = {_RENAMED.get(key, key): value for key, value in {**metadata, **cfg}.items()}
    arch = flat.get("architecture", "standard")
    activation = flat.get("activation_fn", "relu")  # before 6.0: "standard" + topk activation
    k = (flat.get("activation_fn_kwargs") or {}).get("k", flat.get("k"))
    if activation == "topk":
        arch = "topk"
    elif activation != "relu":
        raise SaeError(f"{path}: activation function {activation!r} is not supported")
    if arch not in ("standard", "topk", "jumprelu", "gated"):
        raise SaeError(
            f"{path}: SAE architecture {arch!r} is not supported (standard, topk, jumprelu, gated)"
        )
    norm = flat.get("normalize_activations")  # before 6.0 a bool: true was the April scaling
    norm = "none" if norm in (None, False) else "expected_average_only_in" if norm is True else norm
    hook = flat.get("hook_name")
    reshape = flat.get("reshape_activations", "hook_z" if "hook_z" in str(hook) else "none")
    for bad, what in (
        (norm != "none", f"normalize_activations={norm!r}"),
        (reshape != "none", f"reshape_activations={reshape!r}"),
        (flat.get("hook_head_index") is not None, "a per-head SAE (hook_head_index)"),
    ):
        if bad:
            raise SaeError(f"{path}: {what} is not supported")
    if not isinstance(hook, str) or not hook:
        raise SaeError(f"{path}: lacks hook_name")
    ours = cfg.get("sparsescope") or {}
    if arch == "topk" and ours.get("arch") == "gsae":
        arch = "gsae"
    meta = {key: flat[key] for key in METADATA if flat.get(key) is not None}
    meta |= {key: value for key, value in ours.items() if key != "arch"}
    d_in, d_sae = _int(flat, "d_in", path), _int(flat, "d_sae", path)
    with torch.device("meta"):
        sae = SAE(d_in, d_sae, k, hook, arch, bool(flat.get("apply_b_dec_to_input", True)), meta)
    weights = _tensors(folder / WEIGHTS, {n: tuple(p.shape) for n, p in sae.named_parameters()})
    if arch in TOPK and flat.get("rescale_acts_by_decoder_norm"):
        norms = weights["W_dec"].norm(dim=1).clamp_min(1e-12)
        weights["W_enc"] = weights["W_enc"] * norms
        weights["b_enc"] = weights["b_enc"] * norms
        weights["W_dec"] = weights["W_dec"] / norms[:, None]
    return sae, weights


_LAYER = re.compile(r"(?:.+\.)?(?:layers|layer|h|blocks)\.(\d+)(?:\.(mlp|attn|self_attn))?")
_LAYER_PARTS = {None: "hook_resid_post", "mlp": "hook_mlp_out"} | dict.fromkeys(
    ("attn", "self_attn"), "hook_attn_out"
)


def sparsify_hook(hookpoint: str) -> str:
    """The TransformerLens hook of a sparsify hookpoint (a Hugging Face module name whose
    output the SAE reads): ``<layers>.N`` -> ``blocks.N.hook_resid_post``,
    ``<layers>.N.mlp`` -> ``blocks.N.hook_mlp_out``, ``<layers>.N.attn|self_attn`` ->
    ``blocks.N.hook_attn_out``, ``embed_tokens|wte|embed_in`` -> ``hook_embed``."""
    if hookpoint.rpartition(".")[2] in ("embed_tokens", "wte", "embed_in"):
        return "hook_embed"
    match = _LAYER.fullmatch(hookpoint)
    if match is None:
        raise SaeError(
            f"sparsify hookpoint {hookpoint!r} has no known TransformerLens hook: SparseScope maps"
            " <layers>.N, <layers>.N.mlp, <layers>.N.attn|self_attn and embed_tokens"
        )
    layer, part = match.groups()
    return f"blocks.{layer}.{_LAYER_PARTS[part]}"


def _hookpoint_dir(folder: Path) -> Path:
    """The hookpoint folder of a sparsify SAE folder (its parent for a ``seedN`` one)."""
    return folder.parent if re.fullmatch(r"seed\d+", folder.name) else folder


def _sparsify(folder: Path) -> tuple[SAE, dict[str, torch.Tensor]]:
    """A sparsify hookpoint folder (``<checkpoint>/<hookpoint>[/seedN]``): SAE and tensors."""
    path = folder / CFG
    cfg = _read_json(path)
    for key in ("transcode", "skip_connection", "signed"):
        if cfg.get(key):
            raise SaeError(f"{path}: {key}=true is not supported (SparseScope reads plain SAEs)")
    if cfg.get("activation", "topk") != "topk":
        raise SaeError(f"{path}: activation {cfg['activation']!r} is not supported (topk only)")
    d_in = _int(cfg, "d_in", path)
    if cfg.get("num_latents"):  # else sparsify's default: d_in · expansion_factor (32)
        d_sae = _int(cfg, "num_latents", path)
    else:
        d_sae = d_in * _int({"expansion_factor": 32} | cfg, "expansion_factor", path)
    hookpoint_dir = _hookpoint_dir(folder)
    run_cfg = hookpoint_dir.parent / "config.json"  # the training run's settings
    run = _read_json(run_cfg) if run_cfg.is_file() else {}
    meta = {"model_name": run.get("model"), "dataset_path": run.get("dataset")}
    meta = {key: v for key, v in meta.items() if v} | {"hookpoint": hookpoint_dir.name}
    hook = sparsify_hook(hookpoint_dir.name)
    with torch.device("meta"):
        sae = SAE(d_in, d_sae, cfg.get("k", 32), hook, "topk", True, meta)
    shapes = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,)}
    shapes |= {"W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    raw = _tensors(folder / SPARSIFY_WEIGHTS, shapes)
    weights = {"W_enc": raw["encoder.weight"].T, "b_enc": raw["encoder.bias"]}
    return sae, weights | {"W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}


def load_sae(folder: Path | str, device: str | torch.device = "cpu") -> SAE:
    """Load a SAELens or sparsify SAE folder (float32, eval mode)."""
    folder = Path(folder)
    reader = _sparsify if _weights_file(folder).name == SPARSIFY_WEIGHTS else _saelens
    sae, weights = reader(folder)
    sae.load_state_dict({n: w.contiguous() for n, w in weights.items()}, assign=True)
    return sae.to(device).eval()


def sae_id_of(folder: Path | str) -> str:
    """The SAE's id: the one SparseScope recorded in ``cfg.json``, else the folder name (a
    sparsify one's: ``<checkpoint>.<hookpoint>[.seedN]``) and 10 hex digits of the SHA-256 of
    its config and weights files, so that two SAEs in same-named folders get two ids."""
    folder = Path(folder).resolve()
    weights = _weights_file(folder)
    cfg = _read_json(folder / CFG)
    if sae_id := (cfg.get("sparsescope") or {}).get("sae_id"):
        return sae_id
    digest = hashlib.sha256((folder / CFG).read_bytes())
    with weights.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    name = folder.name
    if weights.name == SPARSIFY_WEIGHTS:
        run = _hookpoint_dir(folder).parent
        name = ".".join(folder.relative_to(run.parent).parts)
    return f"{name}-{digest.hexdigest()[:10]}"


def model_name_matches(model_name: str | None, *model_ids: str | None) -> bool:
    """Whether a SAE made for ``model_name`` fits a probed model known by ``model_ids`` (its
    spec and family, see probes.models): names are reduced to their last path component (a
    Hub name's, a folder's; a zoo spec's name) without a ``@`` revision or step, resolving
    TransformerLens aliases (``gpt2-small`` is ``gpt2``), and compared without case. An SAE
    that names no model fits any."""
    key = _model_key(str(model_name)) if model_name else None
    return key is None or any(key == _model_key(m) for m in model_ids if m)


def _model_key(name: str) -> str:
    from transformer_lens.supported_models import MODEL_ALIASES

    name = re.sub(r"@[^/]*$", "", name.strip().rstrip("/").removeprefix("zoo:"))
    official = {a.lower(): hf for hf, aliases in MODEL_ALIASES.items() for a in aliases}
    return Path(official.get(name.lower(), name)).name.lower()


def register_sae(
    root: Path, sae_id: str, sae: SAE, model_id: str, folder: Path, metrics: dict | None = None
) -> None:
    """Insert or replace the SAE's row in the catalog's ``saes`` table (one short transaction).

    Without ``metrics`` an existing row is kept (probing a registered SAE keeps its metrics).
    """
    verb = "INSERT OR IGNORE" if metrics is None else "INSERT OR REPLACE"
    with catalog.connect(catalog.init_store(Path(root))) as con:
        con.execute(
            f"{verb} INTO saes (sae_id, model_id, hook, arch, d_in, d_sae, k, metrics,"
            " path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                sae_id,
                model_id,
                sae.hook_name,
                sae.arch,
                sae.d_in,
                sae.d_sae,
                sae.k,
                json.dumps(metrics or {}),
                str(Path(folder).resolve()),
            ],
        )
