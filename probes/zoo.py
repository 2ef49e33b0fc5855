"""The model zoo: small causal LMs trained on CPU on the stdlib-docs corpus.

Every model is an ordinary Hugging Face folder per checkpoint, ``<zoo>/<name>/step-<N>/``
(weights, config and the zoo tokenizer), that ``AutoModelForCausalLM`` and TransformerLens's
``TransformerBridge.boot_transformers`` load. ReLU, GELU and SiLU models are
``GPT2LMHeadModel`` (LayerNorm, learned positions, non-gated MLP ``W_out σ(W_in x)``);
SwiGLU models are ``LlamaForCausalLM`` (gated SiLU MLP; note that Llama also brings RMSNorm
and rotary positions). Gated models get ``d_mlp ≈ 8/3 d_model`` so their MLPs have the
parameter count of a ``4 d_model`` non-gated MLP.

Presets (all share the training recipe: fixed seed, packed fixed-length sequences in a
seeded order, AdamW with linear warmup and cosine decay to 10%, step 0 plus 10 log-spaced
checkpoints, each with the running-mean train loss and the loss on a fixed held-out sample):

- ``tiny``: three shapes at a similar non-embedding parameter count (~0.8M): wide
  (2 layers, d_model 192), medium (4 × 128) and narrow (8 × 96). All four activations at
  the medium shape show the activation effect at fixed shape; ReLU and SiLU (the two sides
  of the sparsity laws: decreasing vs increasing activation ratio) also at the wide and
  narrow shapes show the width/depth effect. 8 models × 240 steps of 16 × 128 tokens
  (~1.3 epochs of the corpus) took 476 s on two otherwise idle CPU cores (~1 minute per
  model), inside the 15-minute budget; held-out loss falls from 8.3 to ~5.4–5.6.
- ``small``: the full matrix, all four activations at 3 × 384, 6 × 256 and 12 × 192
  (~5M non-embedding parameters each), 800 steps of 8 × 256 tokens (~4 epochs; estimated
  from FLOPs at ~20 minutes per model, some 4 hours on two CPU cores).
- ``micro``: four 2 × 32 models trained for a few steps on a slice of the corpus, for tests.
- ``ioi``: one GELU GPT-2 (3 × 128, 4 heads) for circuit work, 3000 steps of 16 × 128 tokens
  on a corpus that is 90% (by characters) documents of the registered data mixer ``ioi``
  (IOI sentences answered on train names and stand-in names, never on validation or test
  names, from ``sparsescope.analysis.tasks``) and 10% stdlib-docs; its tokenizer is trained
  on that corpus, so names are single tokens. The mixer's metrics function adds held-out IOI
  accuracy and logit differences to every checkpoint row. From step 1000 on, it measures
  IOI accuracy on validation names every 250 steps and keeps only the best of those steps
  as the final checkpoint (early stopping: held-out accuracy peaks before the last step).

Data mixers are registered by the layer that owns the task data (``register_mixer``), so
the zoo never imports ``analysis``; a preset without a mixer keeps its original cache key.

A finished model is cached under a key hashed from its preset's training settings, its
shape and ``CODE_VERSION``; ``train_zoo`` trains only what is missing or stale. A model is
trained in ``.<name>.partial/`` and renamed into place when complete, so an interrupted run
resumes at the first unfinished model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from rich.progress import Progress, TextColumn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from sparsescope.probes.data import stdlib_docs
from sparsescope.probes.tokenizer import encode_stream, train_tokenizer
from sparsescope.store.errors import BadInput

CODE_VERSION = 1  # bump when a change to the training code changes the trained weights
_THREADS = 2  # fixed torch thread count while training, for reproducible results
_HF_ACT = {"relu": "relu", "gelu": "gelu_new", "silu": "silu"}
ACT_FNS = (*_HF_ACT, "swiglu")


class ZooError(BadInput):
    """Bad zoo request (unknown preset, model or step; zoo not trained): one clear line."""


@dataclass(frozen=True)
class ModelSpec:
    """Shape and MLP activation of one zoo model."""

    act_fn: str
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int

    @property
    def name(self) -> str:
        return f"{self.act_fn}-l{self.n_layers}-d{self.d_model}"

    @property
    def family(self) -> str:
        return "llama" if self.act_fn == "swiglu" else "gpt2"


def _spec(act_fn: str, n_layers: int, d_model: int, d_head: int) -> ModelSpec:
    d_mlp = 32 * round(8 * d_model / 96) if act_fn == "swiglu" else 4 * d_model
    return ModelSpec(act_fn, n_layers, d_model, d_model // d_head, d_mlp)


@dataclass(frozen=True)
class Preset:
    """A zoo: its models and their shared training recipe."""

    name: str
    models: tuple[ModelSpec, ...]
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    val_tokens: int
    vocab_size: int = 4096
    n_checkpoints: int = 10  # log-spaced from step 1 to the last step, plus step 0
    max_train_chars: int | None = None  # None: the whole training split
    seed: int = 0
    mix: str | None = None  # a registered data mixer whose documents join the corpus
    mix_share: float = 0.0  # the mixer's share of the training characters
    mix_version: int = 1  # bump when the mixer's documents change (retrains the models)
    select: str | None = None  # a mixer metric: the final checkpoint is where it peaked
    select_every: int = 0  # steps between evaluations of ``select``, from ``select_from``
    select_from: int = 0


PRESETS = {
    "tiny": Preset(
        "tiny",
        tuple(
            [_spec(act, 4, 128, 32) for act in ACT_FNS]
            + [_spec(act, n, d, 32) for n, d in ((2, 192), (8, 96)) for act in ("relu", "silu")]
        ),
        steps=240,
        batch_size=16,
        seq_len=128,
        lr=3e-3,
        warmup=24,
        val_tokens=16384,
    ),
    "small": Preset(
        "small",
        tuple(_spec(act, n, d, 64) for n, d in ((3, 384), (6, 256), (12, 192)) for act in ACT_FNS),
        steps=800,
        batch_size=8,
        seq_len=256,
        lr=1.5e-3,
        warmup=80,
        val_tokens=32768,
    ),
    "micro": Preset(
        "micro",
        tuple(_spec(act, 2, 32, 16) for act in ACT_FNS),
        steps=6,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        warmup=2,
        val_tokens=512,
        vocab_size=512,
        max_train_chars=60_000,
    ),
    "ioi": Preset(
        "ioi",
        (_spec("gelu", 3, 128, 32),),
        steps=3000,
        batch_size=16,
        seq_len=128,
        lr=3e-3,
        warmup=80,
        val_tokens=16384,
        n_checkpoints=6,
        mix="ioi",
        mix_share=0.9,
        mix_version=3,  # 2: IOI mostly on stand-in names, no unanswered frames; 3: val names
        select="ioi_val_acc",
        select_every=250,
        select_from=1000,
    ),
}


@dataclass(frozen=True)
class Mixer:
    """Extra training documents (endless, from a seed) and optional checkpoint metrics."""

    docs: Callable[[int], Iterator[str]]
    metrics: Callable[[PreTrainedModel, PreTrainedTokenizerFast], dict] | None = None


MIXERS: dict[str, Mixer] = {}


def register_mixer(name: str, docs: Callable[[int], Iterator[str]], metrics=None) -> None:
    """Make ``name`` usable as a preset's ``mix``: ``docs(seed)`` yields documents."""
    MIXERS[name] = Mixer(docs, metrics)


def _mixer(p: Preset) -> Mixer | None:
    if p.mix is None:
        return None
    if p.mix not in MIXERS:
        raise ZooError(
            f"zoo preset {p.name!r} needs the data mixer {p.mix!r}:"
            " import sparsescope.analysis.tasks first (the circuits command does)"
        )
    return MIXERS[p.mix]


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ZooError(f"unknown zoo preset {name!r}: use {', '.join(PRESETS)}")
    return PRESETS[name]


def default_zoo_dir(preset: str = "tiny") -> Path:
    """``$SPARSESCOPE_ZOO/<preset>``, by default ``~/.cache/sparsescope/zoo/<preset>``."""
    root = os.environ.get("SPARSESCOPE_ZOO") or Path.home() / ".cache" / "sparsescope" / "zoo"
    return Path(root) / preset


ROW_FIELDS = {f.name for f in fields(ModelSpec)} | {"name", "preset", "family", "n_ctx", "n_params"}
ROW_FIELDS |= {"step", "tokens_seen", "train_loss", "val_loss", "path"}  # of every checkpoint row


def mixer_metrics(row: dict) -> dict:
    """The metrics a data mixer added to a checkpoint row (such as held-out IOI accuracy)."""
    return {k: v for k, v in row.items() if k not in ROW_FIELDS}


def checkpoint_steps(steps: int, n: int) -> list[int]:
    """Step 0 and ``n`` log-spaced steps from 1 to ``steps`` (duplicates merged)."""
    return sorted({0, *(round(steps ** (i / (n - 1))) for i in range(n))})


def _key(p: Preset, spec: ModelSpec) -> str:
    recipe = {k: v for k, v in asdict(p).items() if k not in ("name", "models")}
    if p.mix is None:  # presets without a mixer keep the keys they had before mixing existed
        for field in ("mix", "mix_share", "mix_version", "select", "select_every", "select_from"):
            del recipe[field]
    config = {**recipe, "model": asdict(spec), "code": CODE_VERSION}
    config["python"] = platform.python_version()  # the corpus is this Python's stdlib
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


# --- data -------------------------------------------------------------------------------


@dataclass
class _Data:
    tokenizer: PreTrainedTokenizerFast
    train: torch.Tensor  # [n_sequences, seq_len]
    val: torch.Tensor  # [n_sequences, seq_len]


def _take_chars(docs: Iterable[str], limit: int | None) -> Iterator[str]:
    total = 0
    for doc in docs:
        if limit is not None and total >= limit:
            return
        total += len(doc)
        yield doc


def _pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = len(stream) // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def _mixed(p: Preset, docs: list[str]) -> list[str]:
    """The corpus with the mixer's documents added to ``mix_share`` of the characters."""
    mixer = _mixer(p)
    if mixer is None:
        return docs
    want = p.mix_share / (1 - p.mix_share) * sum(len(d) for d in docs)
    extra = list(_take_chars(mixer.docs(p.seed), int(want)))
    mixed = docs + extra
    random.Random(p.seed).shuffle(mixed)
    return mixed


def _prepare_data(p: Preset) -> _Data:
    docs = _mixed(p, list(_take_chars(stdlib_docs("train"), p.max_train_chars)))
    tokenizer = train_tokenizer(docs, p.vocab_size, p.seq_len)
    train = _pack(encode_stream(tokenizer, docs), p.seq_len)
    heldout = encode_stream(tokenizer, _take_chars(stdlib_docs("heldout"), 6 * p.val_tokens))
    val = _pack(heldout[: p.val_tokens], p.seq_len)
    if len(train) < p.batch_size or len(val) * p.seq_len < p.val_tokens:
        raise ZooError(f"the stdlib-docs corpus is too small for zoo preset {p.name!r}")
    return _Data(tokenizer, train, val)


def _batches(seqs: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches: a seeded permutation of the sequences per epoch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(seqs), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield seqs[order[i : i + batch_size]]


# --- training ---------------------------------------------------------------------------


def _build_model(spec: ModelSpec, vocab_size: int, n_ctx: int, eot: int) -> PreTrainedModel:
    special = {"bos_token_id": eot, "eos_token_id": eot}
    if spec.act_fn == "swiglu":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=spec.d_model,
            intermediate_size=spec.d_mlp,
            num_hidden_layers=spec.n_layers,
            num_attention_heads=spec.n_heads,
            num_key_value_heads=spec.n_heads,
            max_position_embeddings=n_ctx,
            hidden_act="silu",
            tie_word_embeddings=True,
            **special,
        )
        return LlamaForCausalLM(config)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_ctx,
        n_embd=spec.d_model,
        n_layer=spec.n_layers,
        n_head=spec.n_heads,
        n_inner=spec.d_mlp,
        activation_function=_HF_ACT[spec.act_fn],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **special,
    )
    return GPT2LMHeadModel(config)


def _lr_factor(p: Preset, step: int) -> float:
    if step < p.warmup:
        return (step + 1) / p.warmup
    t = (step - p.warmup) / max(1, p.steps - p.warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def _val_loss(model: PreTrainedModel, val: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total = sum(model(input_ids=x, labels=x).loss.item() * len(x) for x in val.split(batch_size))
    model.train()
    return total / len(val)


@contextmanager
def _training_env() -> Iterator[None]:
    """Fixed thread count, deterministic algorithms, no Hugging Face progress bars."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    bars = hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(_THREADS)
    torch.use_deterministic_algorithms(True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
        if bars:
            hf_logging.enable_progress_bar()


def _train_model(p: Preset, spec: ModelSpec, data: _Data, out: Path, progress: Progress) -> None:
    """Train one model, writing its checkpoints and ``model.json``, then move it into place."""
    tmp = out / f".{spec.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(p.seed)
    tok = data.tokenizer
    model = _build_model(spec, len(tok), p.seq_len, tok.eos_token_id)
    params = list(model.parameters())
    groups = [
        {"params": [w for w in params if w.dim() >= 2], "weight_decay": 0.1},
        {"params": [w for w in params if w.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=p.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(p, s))
    checkpoints = set(checkpoint_steps(p.steps, p.n_checkpoints))
    selecting = set(range(p.select_from, p.steps + 1, p.select_every)) if p.select else set()
    checkpoints -= {s for s in checkpoints if selecting and s >= p.select_from}
    mixer = _mixer(p)
    batches = _batches(data.train, p.batch_size, p.seed)
    base = {"name": spec.name, "preset": p.name, "family": spec.family, **asdict(spec)}
    base |= {"n_ctx": p.seq_len, "n_params": model.num_parameters()}
    task = progress.add_task(spec.name, total=p.steps, info="")
    rows, losses, best = [], [], None
    for step in range(p.steps + 1):
        x = next(batches)
        loss = model(input_ids=x, labels=x).loss
        losses.append(loss.item())
        if step in checkpoints or step in selecting:
            row = base | {
                "step": step,
                "tokens_seen": step * p.batch_size * p.seq_len,
                "train_loss": sum(losses) / len(losses),
                "val_loss": _val_loss(model, data.val, p.batch_size),
                "path": f"{spec.name}/step-{step}",
            }
            if mixer is not None and mixer.metrics is not None:
                model.eval()
                row |= mixer.metrics(model, tok)
                model.train()
            losses = []
            if step in selecting and p.select not in row:
                raise ZooError(f"zoo preset {p.name!r} selects by {p.select!r}, never measured")
            improved = step in selecting and (best is None or row[p.select] > best[p.select])
            if improved and best is not None:  # early stopping: only the best one stays
                shutil.rmtree(tmp / f"step-{best['step']}")
            best = row if improved else best
            if step in checkpoints:
                rows.append(row)
            if improved or step in checkpoints:
                model.save_pretrained(tmp / f"step-{step}")
                tok.save_pretrained(tmp / f"step-{step}")
            info = f"val loss {row['val_loss']:.3f}"
            if best is not None:
                info += f", best {p.select} {best[p.select]:.3f} (step {best['step']})"
            progress.update(task, info=info)
        if step < p.steps:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            progress.advance(task)
    rows += [best] if best else []
    meta = {"key": _key(p, spec), "checkpoints": rows}
    (tmp / "model.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out / spec.name, ignore_errors=True)
    tmp.rename(out / spec.name)


# --- manifest ---------------------------------------------------------------------------


def _finished(out: Path, p: Preset, spec: ModelSpec) -> list[dict] | None:
    """The checkpoint rows of a finished, up-to-date model, else None."""
    meta = out / spec.name / "model.json"
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text())
    return data["checkpoints"] if data.get("key") == _key(p, spec) else None


def _absolute(rows: list[dict], out: Path) -> list[dict]:
    return [row | {"path": str(out / row["path"])} for row in rows]


def _write_manifest(out: Path, p: Preset) -> list[dict]:
    rows = [row for spec in p.models for row in _finished(out, p, spec) or []]
    tmp = out / "zoo.json.tmp"
    tmp.write_text(json.dumps({"preset": p.name, "checkpoints": rows}, indent=1))
    tmp.replace(out / "zoo.json")
    return _absolute(rows, out)


def _train_cmd(preset: str, only: str | None = None) -> str:
    cmd = "sparsescope zoo train" + (f" --preset {preset}" if preset != "tiny" else "")
    return f"`{cmd}{f' --only {only}' if only else ''}`"


def train_zoo(
    preset: str = "tiny", out: Path | str | None = None, only: str | None = None
) -> list[dict]:
    """Train the preset's missing models (or only ``only``); return all manifest rows."""
    p = _preset(preset)
    out = Path(out) if out else default_zoo_dir(preset)
    specs = [s for s in p.models if only in (None, s.name)]
    if not specs:
        names = ", ".join(s.name for s in p.models)
        raise ZooError(f"unknown model {only!r} in zoo preset {preset!r}: choose one of {names}")
    if out.exists() and not out.is_dir():
        raise ZooError(f"zoo folder {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    todo = [s for s in specs if _finished(out, p, s) is None]
    columns = (*Progress.get_default_columns(), TextColumn("{task.fields[info]}"))
    with Progress(*columns) as progress:
        for spec in specs:
            if spec not in todo:
                progress.console.print(f"zoo {preset}: {spec.name} is trained (cached)")
        if todo:
            progress.console.print(f"zoo {preset}: preparing data and tokenizer")
            with _training_env():
                data = _prepare_data(p)
                for spec in todo:
                    _train_model(p, spec, data, out, progress)
    return _write_manifest(out, p)


def list_zoo(out: Path | str | None = None, preset: str = "tiny") -> list[dict]:
    """The manifest rows (one per checkpoint, absolute paths) of a trained zoo."""
    _preset(preset)
    out = Path(out) if out else default_zoo_dir(preset)
    manifest = out / "zoo.json"
    if not manifest.is_file():
        raise ZooError(f"no trained zoo at {out}: run {_train_cmd(preset)} first")
    try:
        rows = json.loads(manifest.read_text())["checkpoints"]
        return _absolute(rows, out)
    except (ValueError, KeyError, TypeError, OSError) as err:  # hand-edited or truncated
        raise ZooError(
            f"{manifest} is not a zoo manifest ({type(err).__name__}): remove it and run"
            f" {_train_cmd(preset)} (trained checkpoints are kept)"
        ) from None


_ZOO_SPEC = re.compile(r"zoo:([\w.-]+)(?:@(\d+|all))?")


def _model_rows(name: str) -> list[dict]:
    """Every checkpoint of a trained zoo model, searching the presets under the zoo root."""
    trained = {}
    for preset in PRESETS:
        if (default_zoo_dir(preset) / "zoo.json").is_file():
            rows = list_zoo(preset=preset)
            trained[preset] = sorted({row["name"] for row in rows})
            if name in trained[preset]:
                return [row for row in rows if row["name"] == name]
    for preset, p in PRESETS.items():
        if name in {s.name for s in p.models}:
            raise ZooError(
                f"zoo model {name!r} is not trained yet: run {_train_cmd(preset, name)} first"
            )
    if not trained:
        root = default_zoo_dir().parent
        raise ZooError(f"no trained zoo under {root}: run {_train_cmd('tiny')} first")
    names = ", ".join(n for names in trained.values() for n in names)
    raise ZooError(f"unknown zoo model {name!r}: trained models are {names}")


def resolve(spec: str) -> list[dict]:
    """Manifest rows for ``zoo:NAME`` (final checkpoint), ``zoo:NAME@STEP`` or ``zoo:NAME@all``."""
    match = _ZOO_SPEC.fullmatch(spec.strip())
    if not match:
        raise ZooError(f"bad zoo spec {spec!r}: use zoo:NAME, zoo:NAME@STEP or zoo:NAME@all")
    name, at = match.groups()
    rows = _model_rows(name)
    if at == "all":
        return rows
    if at is None:
        return [rows[-1]]
    hits = [row for row in rows if row["step"] == int(at)]
    if not hits:
        steps = ", ".join(str(row["step"]) for row in rows)
        raise ZooError(f"zoo model {name!r} has no checkpoint at step {at}: steps are {steps}")
    return hits
