"""Train a TopK SAE or a g-SAE (METHODS.md §5) on activations streamed from a model.

Activations at ``hook`` (position 0, BOS/CLS, left out) go through a bounded shuffling
buffer into Adam steps on ``FVU + aux_coef · AuxK`` (AuxK: the residual reconstructed by the
top ``aux_k`` dead latents, dead = not fired in the last ``dead_tokens`` training tokens).
Decoder rows stay unit-norm: their gradient is projected, then they are renormalised.
A g-SAE selects its k latents by ``z + β·z ⊙ |W_decᵀ ∇_x L|`` (∇_x L: gradient of the
summed next-token loss at the hooked activation) and reconstructs with the plain ``z``.

Every ``every_heldout``-th token batch of the data (the first ``heldout_tokens`` of them) is
held out for the metrics. ``<out>/checkpoint.pt`` holds the whole training state; a rerun with
the same settings resumes from it. When training ends the SAE folder is written, evaluated,
and an ``sae`` run (its ``sae_feature_stats`` over the held-out tokens) plus the ``saes``
catalog row go into the store.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sparsescope.analysis.sae_metrics import FIRST, evaluate, lm_loss, stats_table
from sparsescope.probes import data as data_sources
from sparsescope.probes.batches import batches
from sparsescope.probes.hooks import hooked
from sparsescope.probes.models import LoadedModel, load_model
from sparsescope.probes.sae import SAE, register_sae
from sparsescope.store.catalog import init_store
from sparsescope.store.errors import BadInput
from sparsescope.store.writer import RunWriter

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_EVERY_S = 60.0


class TrainError(BadInput):
    """Bad training request; the message is one line."""


@dataclass
class TrainConfig:
    model: str
    hook: str
    data: str = "stdlib-docs"
    arch: str = "topk"
    k: int = 32
    expansion: int = 8
    tokens: int = 200_000
    batch_size: int = 512
    lr: float = 1e-3
    beta: float = 1.0
    aux_k: int = 256
    aux_coef: float = 1 / 32
    dead_tokens: int = 50_000
    seq_len: int = 128
    model_batch: int = 16
    buffer_tokens: int = 32_768
    heldout_tokens: int = 16_384
    every_heldout: int = 10
    seed: int = 0


class ShuffleBuffer:
    """Rows accumulate up to ``capacity``; then a random half leaves, shuffled."""

    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.chunks: list[torch.Tensor] = []
        self.size = 0
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, rows: torch.Tensor) -> torch.Tensor | None:
        self.chunks.append(rows)
        self.size += len(rows)
        if self.size < self.capacity:
            return None
        data = torch.cat(self.chunks)
        data = data[torch.randperm(len(data), generator=self.gen)]
        half = len(data) // 2
        self.chunks, self.size = [data[half:]], len(data) - half
        return data[:half]

    def state_dict(self) -> dict:
        rows = torch.cat(self.chunks) if self.chunks else torch.empty(0)
        return {"rows": rows, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.chunks = [state["rows"]] if len(state["rows"]) else []
        self.size = len(state["rows"])
        self.gen.set_state(state["gen"])


class Trainer:
    """Adam steps of one SAE; tracks tokens since each latent last fired."""

    def __init__(self, sae: SAE, cfg: TrainConfig):
        self.sae, self.cfg = sae, cfg
        self.opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.int64)
        self.steps = self.tokens = 0

    def step(self, x: torch.Tensor, grad: torch.Tensor | None = None) -> dict:
        """One optimiser step on activations ``x`` (and their loss gradients for a g-SAE)."""
        sae, cfg = self.sae, self.cfg
        if self.steps == 0:
            with torch.no_grad():
                sae.b_dec.copy_(x.mean(0))
        pre = sae.pre_acts(x)
        scores = None
        if grad is not None:
            z = pre.relu()
            scores = z + cfg.beta * z * (grad @ sae.W_dec.T).abs()
        z = sae.select(pre, scores)
        x_hat = sae.decode(z)
        var = ((x - x.mean(0)) ** 2).sum(-1).mean()
        fvu = ((x_hat - x) ** 2).sum(-1).mean() / var
        dead = self.since_fired >= cfg.dead_tokens
        aux = self._aux_loss(pre, (x - x_hat).detach(), dead) if dead.any() else torch.zeros(())
        self.opt.zero_grad(set_to_none=True)
        (fvu + cfg.aux_coef * aux).backward()
        sae.project_decoder_grad()
        self.opt.step()
        sae.normalize_decoder()
        fired = (z > 0).any(0).cpu()
        self.since_fired += len(x)
        self.since_fired[fired] = 0
        self.steps += 1
        self.tokens += len(x)
        return {"fvu": fvu.item(), "aux": aux.item(), "dead": int(dead.sum())}

    def _aux_loss(self, pre: torch.Tensor, err: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """FVU of the residual ``err`` reconstructed by the top ``aux_k`` dead latents."""
        k = min(self.cfg.aux_k, int(dead.sum()))
        masked = pre.masked_fill(~dead.to(pre.device), -torch.inf)
        idx = masked.topk(k, dim=-1).indices
        z_aux = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).relu())
        err_hat = z_aux @ self.sae.W_dec
        return ((err_hat - err) ** 2).sum(-1).mean() / ((err - err.mean(0)) ** 2).sum(-1).mean()

    def state_dict(self) -> dict:
        return {
            "sae": self.sae.state_dict(),
            "opt": self.opt.state_dict(),
            "since_fired": self.since_fired,
            "steps": self.steps,
            "tokens": self.tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.since_fired = state["since_fired"]
        self.steps, self.tokens = state["steps"], state["tokens"]


class _Stop(Exception):
    """Raised by a hook once the activation is captured: later layers need not run."""


def activations(model: LoadedModel, ids: torch.Tensor, hook: str) -> torch.Tensor:
    """Activations at ``hook`` from position FIRST on, as rows ``[B·(T−FIRST), d]``."""
    seen = {}

    def fn(tensor, hook):
        seen["x"] = tensor[:, FIRST:].detach()
        raise _Stop

    with torch.inference_mode(), hooked(model.bridge, [(hook, fn)]):
        try:
            model.backbone()(input_ids=ids)
        except _Stop:
            pass
    if "x" not in seen:
        raise TrainError(f"hook {hook} did not fire in the model's backbone")
    return seen["x"].reshape(-1, seen["x"].shape[-1]).float()


def activations_and_grads(model: LoadedModel, ids: torch.Tensor, hook: str) -> torch.Tensor:
    """Rows ``[x | ∇_x L]`` at ``hook`` (L: summed next-token loss), from position FIRST on."""
    leaf = {}

    def replace(x):
        leaf["x"] = x.detach().float().requires_grad_(True)
        return leaf["x"]

    with torch.enable_grad():
        loss, _ = lm_loss(model, ids, hook, replace)
        loss.backward()
    x, g = leaf["x"].detach(), leaf["x"].grad
    return torch.cat([x, g], -1).reshape(-1, 2 * x.shape[-1])


def sae_id_for(cfg: TrainConfig) -> str:
    """A readable id from the model spec, hook and settings (a folder spec: its last two parts)."""
    path = Path(cfg.model)
    model = "-".join(path.parts[-2:]) if path.exists() else cfg.model
    raw = f"{model}.{cfg.hook}.{cfg.arch}-k{cfg.k}-x{cfg.expansion}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-")


def _token_batches(model: LoadedModel, cfg: TrainConfig) -> Iterator[tuple[bool, torch.Tensor]]:
    """Endless (held_out, ids) over the corpus, epoch after epoch; held-out batches only once."""
    seq_len = min(cfg.seq_len, model.n_ctx)
    n_heldout = -(-cfg.heldout_tokens // (cfg.model_batch * seq_len))
    epoch = 0
    while True:
        empty = True
        for j, batch in enumerate(
            batches(model.tokenizer, data_sources.documents(cfg.data), seq_len, cfg.model_batch)
        ):
            empty = False
            held = (
                j % cfg.every_heldout == cfg.every_heldout - 1
                and j // cfg.every_heldout < n_heldout
            )
            if held and epoch > 0:
                continue
            yield held, batch.input_ids
        if empty:
            raise data_sources.DataError(f"data {cfg.data!r} gave no tokens")
        epoch += 1


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold]training SAE"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens · {task.fields[info]}"),
        TimeElapsedColumn(),
        disable=quiet,
    )


def _check_request(model: LoadedModel, cfg: TrainConfig) -> None:
    if cfg.hook not in model.bridge.hook_dict:
        raise TrainError(
            f"model {cfg.model!r} has no hook {cfg.hook!r} (e.g. blocks.0.hook_resid_post)"
        )
    if cfg.arch == "gsae" and not model.is_causal_lm:
        raise TrainError(f"--arch gsae needs a causal LM for ∇_x L; {cfg.model!r} is not one")


def train_sae(
    cfg: TrainConfig, store: Path, out: Path | None = None, device: str = "cpu", quiet: bool = False
) -> dict:
    """Train (or resume) a SAE, evaluate it, record it in the store; returns its catalog row."""
    if cfg.arch not in ("topk", "gsae"):
        raise TrainError(f"unknown --arch {cfg.arch!r}: use topk or gsae")
    data_sources.validate(cfg.data)
    store = init_store(Path(store))
    out = Path(out) if out else store / "saes" / sae_id_for(cfg)
    sae_id = out.name
    ckpt_path = out / CHECKPOINT
    saved = torch.load(ckpt_path, weights_only=False) if ckpt_path.is_file() else None
    if saved is not None and saved["config"] != dataclasses.asdict(cfg):
        raise TrainError(
            f"{ckpt_path} was made with other settings: use another --out or delete it"
        )
    model = load_model(cfg.model, device)
    _check_request(model, cfg)
    model.bridge.requires_grad_(False)
    probe_ids = torch.zeros((1, FIRST + 1), dtype=torch.long, device=device)
    d_in = activations(model, probe_ids, cfg.hook).shape[1]
    torch.manual_seed(cfg.seed)
    meta = {"sae_id": sae_id, "model_name": cfg.model, "dataset_path": cfg.data, "beta": cfg.beta}
    meta |= {"context_size": min(cfg.seq_len, model.n_ctx), "seqpos_slice": [FIRST, None]}
    sae = SAE(d_in, d_in * cfg.expansion, cfg.k, cfg.hook, cfg.arch, meta=meta).to(device)
    run = _Run(model, cfg, Trainer(sae, cfg), ckpt_path, device)
    if saved is not None:
        run.load_state_dict(saved)
    metrics = run.metrics
    if metrics is None:
        run.train(quiet)
        sae.eval()
        sae.save(out)
        metrics, stats = evaluate(model, sae, run.heldout, device)
        metrics |= {"train_seconds": run.elapsed, "train_tokens": run.trainer.tokens}
        with RunWriter(store, "sae", cfg.model, cfg.data, dataclasses.asdict(cfg), sae_id) as w:
            w.write("sae_feature_stats", stats_table(sae_id, metrics["dead_over_tokens"], stats))
            w.commit(metrics["dead_over_tokens"], models=[model.info])
        run.metrics = metrics
        run.save()
    register_sae(store, sae_id, sae, cfg.model, out, metrics)
    return {"sae_id": sae_id, "path": str(out), "metrics": metrics}


class _Run:
    """The training loop's state (trainer, buffer, rows not yet stepped on, stream position,
    held-out batches, seconds) and its checkpoint."""

    def __init__(
        self, model: LoadedModel, cfg: TrainConfig, trainer: Trainer, path: Path, device: str
    ):
        self.model, self.cfg, self.trainer, self.path, self.device = (
            model,
            cfg,
            trainer,
            path,
            device,
        )
        self.buffer = ShuffleBuffer(cfg.buffer_tokens, cfg.seed)
        self.pending = torch.empty(0)
        self.heldout: list[torch.Tensor] = []
        self.position = 0
        self.elapsed = 0.0
        self.metrics: dict | None = None
        self._since = time.perf_counter()

    def state_dict(self) -> dict:
        now = time.perf_counter()
        self.elapsed, self._since = self.elapsed + now - self._since, now
        return {
            "config": dataclasses.asdict(self.cfg),
            "trainer": self.trainer.state_dict(),
            "buffer": self.buffer.state_dict(),
            "pending": self.pending,
            "heldout": self.heldout,
            "position": self.position,
            "elapsed": self.elapsed,
            "metrics": self.metrics,
        }

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state["trainer"])
        self.buffer.load_state_dict(state["buffer"])
        self.pending, self.heldout = state["pending"], state["heldout"]
        self.position, self.elapsed, self.metrics = (
            state["position"],
            state["elapsed"],
            state["metrics"],
        )

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, self.path)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        if self.cfg.arch == "gsae":
            return activations_and_grads(self.model, ids, self.cfg.hook)
        return activations(self.model, ids, self.cfg.hook)

    def _step_pending(self, progress: Progress, task) -> None:
        cfg, trainer, d_in = self.cfg, self.trainer, self.trainer.sae.d_in
        while len(self.pending) and trainer.tokens < cfg.tokens:
            chunk = self.pending[: cfg.batch_size].to(self.device)
            log = trainer.step(chunk[:, :d_in], chunk[:, d_in:] if cfg.arch == "gsae" else None)
            self.pending = self.pending[cfg.batch_size :]
            info = f"fvu {log['fvu']:.3f} · dead {log['dead']}"
            progress.update(task, completed=trainer.tokens, info=info)

    def train(self, quiet: bool) -> None:
        """Stream, buffer and step until ``cfg.tokens`` are trained on and the held-out set is
        full; checkpoints every minute and on interruption (then re-raises)."""
        cfg = self.cfg
        n_heldout = -(-cfg.heldout_tokens // (cfg.model_batch * min(cfg.seq_len, self.model.n_ctx)))
        self._since = last_save = time.perf_counter()
        with _progress(quiet) as progress:
            task = progress.add_task(
                "sae", total=cfg.tokens, completed=self.trainer.tokens, info=""
            )
            try:
                self._step_pending(progress, task)
                for i, (held, ids) in enumerate(_token_batches(self.model, cfg)):
                    done = self.trainer.tokens >= cfg.tokens
                    if done and len(self.heldout) >= n_heldout:
                        break
                    if i < self.position or (done and not held):
                        continue
                    if held:
                        self.heldout.append(ids)
                    else:
                        ready = self.buffer.add(self._rows(ids).cpu())
                        self.pending = self.pending if ready is None else ready
                    self.position = i + 1
                    self._step_pending(progress, task)
                    if time.perf_counter() - last_save > CHECKPOINT_EVERY_S:
                        self.save()
                        last_save = time.perf_counter()
            except KeyboardInterrupt:
                self.save()
                raise
        self.save()
