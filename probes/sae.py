"""The TopK sparse autoencoder (METHODS.md §5) and its SAELens-compatible folder.

``z = ReLU(TopK_k(W_enc (x − b_dec) + b_enc))``, ``x̂ = W_dec z + b_dec`` with unit-norm
decoder rows. A g-SAE is the same module: only its training selects latents with the
gradient; inference (probes, metrics) uses the plain TopK.

Folder format: ``cfg.json`` (``architecture``, ``hook_name``, ``d_in``, ``d_sae``, ``k``, ...)
and ``sae_weights.safetensors`` (``W_enc`` [d_in, d_sae], ``b_enc``, ``W_dec`` [d_sae, d_in],
``b_dec``). ``load_sae`` also reads SAELens's older "standard + topk activation" config and its
``metadata.hook_name`` layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparsescope.store import catalog
from sparsescope.store.errors import BadInput

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
ARCHS = ("topk", "gsae")


class SaeError(BadInput):
    """A SAE folder cannot be read; the message is one line."""


class SAE(nn.Module):
    """TopK SAE on the activation at ``hook_name``."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        hook_name: str,
        arch: str = "topk",
        apply_b_dec_to_input: bool = True,
        meta: dict | None = None,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise SaeError(f"unknown SAE architecture {arch!r}: use one of {', '.join(ARCHS)}")
        if not 0 < k <= d_sae:
            raise SaeError(f"k = {k} must be between 1 and d_sae = {d_sae}")
        self.d_in, self.d_sae, self.k, self.hook_name, self.arch = d_in, d_sae, k, hook_name, arch
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.meta = dict(meta or {})
        dec = torch.randn(d_sae, d_in)
        dec /= dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(dec)
        self.W_enc = nn.Parameter(dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``W_enc (x − b_dec) + b_enc`` (b_dec subtracted unless the config says not to)."""
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def select(self, pre: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """Dense codes: ``ReLU(pre)`` at the top-k of ``scores`` (default: ``pre``), else 0."""
        idx = (pre if scores is None else scores).topk(self.k, dim=-1).indices
        return torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).relu())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.select(self.pre_acts(x))

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
        return {
            "architecture": "topk",
            "hook_name": self.hook_name,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "k": self.k,
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": self.k},
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "dtype": "float32",
            "device": "cpu",
            **{key: self.meta[key] for key in ("model_name", "dataset_path") if key in self.meta},
            "sparsescope": {"arch": self.arch, **self.meta},
        }

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


def _read_cfg(folder: Path) -> dict:
    path = folder / CFG
    if not path.is_file() or not (folder / WEIGHTS).is_file():
        raise SaeError(f"SAE folder {folder} needs {CFG} and {WEIGHTS} (SAELens format)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SaeError(f"{path}: not valid JSON ({err.msg})") from None


def load_sae(folder: Path | str, device: str = "cpu") -> SAE:
    """Load a SAELens-format TopK SAE folder."""
    folder = Path(folder)
    cfg = _read_cfg(folder)
    kwargs = cfg.get("activation_fn_kwargs") or {}
    arch = cfg.get("architecture", "standard")
    k = cfg.get("k", kwargs.get("k"))
    if not (arch == "topk" or cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk"):
        raise SaeError(
            f"{folder}: architecture {arch!r} is not a TopK SAE (only TopK is supported)"
        )
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise SaeError(
            f"{folder}: normalize_activations={cfg['normalize_activations']!r} unsupported"
        )
    hook = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")
    missing = [n for n, v in (("hook_name", hook), ("k", k), ("d_in", cfg.get("d_in"))) if not v]
    if missing or "d_sae" not in cfg:
        raise SaeError(f"{folder}/{CFG} lacks {', '.join(missing or ['d_sae'])}")
    ours = cfg.get("sparsescope") or {}
    meta = {key: value for key, value in ours.items() if key != "arch"}
    sae = SAE(
        int(cfg["d_in"]),
        int(cfg["d_sae"]),
        int(k),
        hook,
        ours.get("arch", "topk"),
        bool(cfg.get("apply_b_dec_to_input", True)),
        meta,
    )
    try:
        weights = load_file(str(folder / WEIGHTS))
    except Exception as err:  # safetensors raises its own error type for a bad file
        raise SaeError(f"{folder}/{WEIGHTS}: cannot be read ({err})") from None
    expected = {n: tuple(p.shape) for n, p in sae.named_parameters()}
    got = {n: tuple(weights[n].shape) for n in expected if n in weights}
    if got != expected:
        raise SaeError(f"{folder}/{WEIGHTS}: tensors {got} do not match the config {expected}")
    sae.load_state_dict({n: weights[n].float() for n in expected})
    return sae.to(device).eval()


def sae_id_of(folder: Path | str) -> str:
    """The SAE's id: the one SparseScope recorded in ``cfg.json``, else the folder name."""
    folder = Path(folder)
    return (_read_cfg(folder).get("sparsescope") or {}).get("sae_id") or folder.resolve().name


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
