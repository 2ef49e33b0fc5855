"""Probe jobs on Ray: the batches of a job split into shards, one actor per shard.

Shard ``s`` of ``n`` probes the batches whose index ``i`` has ``i % n == s`` (every worker
reads the whole token stream and skips the others' batches), so seq_ids, positions and
batch contents are those of a local run. A worker loads the model once (one GPU per actor
when the cluster has GPUs), writes its token tables under
``staging/<run_id>/_shards/<shard>/<attempt>/`` and returns its mergeable statistics. The
driver merges them (sums add, maxima max, top-k lists concatenate and re-rank), checks that
every batch was probed exactly once, adopts each shard's successful attempt and commits the
run as a local run is committed. A worker that dies or fails is retried on a fresh actor;
when its retries run out the run is aborted and nothing of it becomes visible.

The store must be one path on a filesystem that every node mounts (NFS, Lustre, ...): the
driver commits by renaming what the workers wrote. Ray is imported only in this module.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from sparsescope.probes.codes import CodesError
from sparsescope.probes.data import DataError
from sparsescope.probes.job import (
    ProbeConfig,
    TokenNames,
    make_probes,
    model_batches,
    model_specs,
    probe_batch,
    probing,
    resolved_settings,
    run_config,
    write_final,
)
from sparsescope.probes.mlp_probe import MlpProbe
from sparsescope.probes.models import ModelError, load_model
from sparsescope.probes.sae import SaeError, load_sae, register_sae, sae_id_of
from sparsescope.probes.sae_probe import SaeProbe
from sparsescope.store.errors import StoreError
from sparsescope.store.writer import PartWriter, RunWriter

MAX_ATTEMPTS = 3
KILL_WAIT_S = 30.0
CRASH_ENV = "SPARSESCOPE_RAY_CRASH"  # "<shard>:<attempt>": that worker dies after a batch (tests)
ENV_PREFIX = "SPARSESCOPE_"  # environment variables forwarded to the workers
SUM_FIELDS = ("n_tokens", "n_active", "sum", "sum_sq", "density")
SAMPLE_FIELDS = ("sample_hash", "sample_key", "sample_val")
STATE_FIELDS = (*SUM_FIELDS, "max", "top_val", "top_key", "top_window", *SAMPLE_FIELDS)
BAD_INPUT = (
    ModelError,
    DataError,
    SaeError,
    StoreError,
    CodesError,
)  # not retried: a retry fails the same


class EngineError(RuntimeError):
    """The Ray engine cannot run or complete the job; the message is one line."""


def _ray():
    try:
        import ray
    except ImportError:
        raise EngineError("--engine ray needs Ray: pip install 'sparsescope[ray]'") from None
    return ray


def probe_state(probe: MlpProbe | SaeProbe) -> dict:
    """A probe's mergeable accumulators as numpy arrays (and the token count)."""
    out = {}
    for name in STATE_FIELDS:
        if hasattr(probe, name):
            value = getattr(probe, name)
            out[name] = value.cpu().numpy() if isinstance(value, torch.Tensor) else value
    return out


def merge_states(states: list[dict]) -> dict:
    """Combine the states of one probe from several shards."""
    out = {}
    for name in states[0]:
        values = [s[name] for s in states]
        if name in SUM_FIELDS:
            out[name] = sum(values[1:], values[0])
        elif name == "max":
            out[name] = np.maximum.reduce(values)
    if "top_val" in states[0]:  # [L, D, K] each: concatenate along K, keep the K best
        val = np.concatenate([s["top_val"] for s in states], axis=2)
        best = np.argsort(-val, axis=2, kind="stable")[..., : states[0]["top_val"].shape[2]]
        tops = [name for name in ("top_val", "top_key", "top_window") if name in states[0]]
        for name in tops:  # windows: [L, D, K, 2W + 1]
            both = np.concatenate([s[name] for s in states], axis=2)
            out[name] = np.take_along_axis(
                both, best.reshape(best.shape + (1,) * (both.ndim - 3)), 2
            )
    if "sample_hash" in states[0]:  # [L, D, bins, S] each: keep the S smallest hashes
        hashes = np.concatenate([s["sample_hash"] for s in states], axis=3)
        keep = np.argsort(hashes, axis=3, kind="stable")[..., : states[0]["sample_hash"].shape[3]]
        for name in SAMPLE_FIELDS:
            out[name] = np.take_along_axis(np.concatenate([s[name] for s in states], 3), keep, 3)
    return out


def load_state(probe: MlpProbe | SaeProbe, state: dict) -> None:
    for name, value in state.items():
        tensor = isinstance(getattr(probe, name), torch.Tensor)
        setattr(probe, name, torch.tensor(value) if tensor else value)


class ShardWorker:
    """A Ray actor: loads the model on its first shard, then probes shards of the data."""

    def __init__(self, model_spec: str, config: ProbeConfig):
        self.model_spec, self.config = model_spec, config
        self.model = None

    def probe(self, data: str, folder: str, shard: int, n_shards: int, attempt: int) -> dict:
        config = self.config
        if self.model is None:
            self.model = load_model(self.model_spec, config.device, config.dtype)
        model = self.model
        probes, _ = make_probes(model, config)
        parts = PartWriter(Path(folder))
        names = TokenNames(model.tokenizer)
        crash = os.environ.get(CRASH_ENV) == f"{shard}:{attempt}"
        stream_tokens = n_tokens = 0
        with probing(model, probes, data, config):
            for i, batch in enumerate(model_batches(model, data, config)):
                stream_tokens += batch.input_ids.numel()
                if i % n_shards == shard:
                    n_tokens += probe_batch(model, probes, batch, names, parts.write, model.device)
                    if crash:
                        parts.flush_all()  # leave a partial attempt behind, as a real crash may
                        os._exit(1)
        parts.flush_all()
        return {
            "n_tokens": n_tokens,
            "stream_tokens": stream_tokens,
            "rows": parts.rows,
            "states": [probe_state(p) for p in probes],
            "info": model.info,
            "settings": resolved_settings(model, config),
        }


def _placement(ray, workers: int | None) -> tuple[int, dict, str]:
    """(workers, actor options, device): one GPU per actor if the cluster has GPUs, else an
    equal share of the CPUs (at most one node's worth)."""
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    workers = workers or gpus or len(nodes)
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    options = {"runtime_env": {"env_vars": env}} if env else {}
    if gpus:
        return workers, {**options, "num_gpus": 1, "num_cpus": 1}, "cuda"
    node_cpus = max(int(n.get("CPU", 1)) for n in nodes)
    cpus = max(1, min(node_cpus, int(total.get("CPU", 1)) // workers))
    return workers, {**options, "num_cpus": cpus}, "cpu"


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}"


def _run_shards(ray, launch, n: int, max_attempts: int, progress: Progress) -> list[dict]:
    """Run every shard to success, retrying failures on fresh actors; results by shard.

    ``launch(shard, attempt)`` starts a fresh actor on a shard and returns (ref, actor).
    """
    pending = {}  # object ref -> (shard, attempt, actor)
    results: list = [None] * n
    task = progress.add_task("probing shards on Ray", total=n)
    try:
        for shard in range(n):
            ref, actor = launch(shard, 0)
            pending[ref] = (shard, 0, actor)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            shard, attempt, actor = pending.pop(ref)
            try:
                results[shard] = ray.get(ref) | {"attempt": attempt}
            except ray.exceptions.RayError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, BAD_INPUT):
                    raise cause from None
                if attempt + 1 >= max_attempts:
                    raise EngineError(
                        f"shard {shard} failed {max_attempts} times, run aborted: {_one_line(err)}"
                    ) from None
                if not progress.disable:
                    progress.console.print(f"shard {shard} failed ({_one_line(err)}); retrying")
                retry, new_actor = launch(shard, attempt + 1)
                pending[retry] = (shard, attempt + 1, new_actor)
            else:
                progress.update(task, advance=1)
            finally:
                ray.kill(actor)
    finally:  # on failure: stop the other shards before the run's staging is removed
        for _, _, actor in pending.values():
            ray.kill(actor)
        ray.wait(list(pending), num_returns=len(pending), timeout=KILL_WAIT_S)
    return results


def _adopt(writer: RunWriter, shard_root: Path, results: list) -> int:
    """Move each shard's successful attempt into the run; check that no batch is missing."""
    streams = {r["stream_tokens"] for r in results}
    n_tokens = sum(r["n_tokens"] for r in results)
    if len(streams) != 1 or n_tokens != streams.pop():
        raise EngineError(f"shards probed {n_tokens} tokens of streams of {streams} tokens")
    for shard, result in enumerate(results):
        folder = shard_root / str(shard) / str(result["attempt"])
        rows = writer.adopt(folder) if folder.exists() else {}
        if rows != result["rows"] or rows.get("tokens", 0) != result["n_tokens"]:
            raise EngineError(f"shard {shard}: staged rows {rows} != written {result['rows']}")
    return n_tokens


def _merged_probes(config: ProbeConfig, results: list) -> list:
    """Driver-side probes holding the merged statistics of all shards."""
    states = [merge_states([r["states"][i] for r in results]) for i in range(len(config.saes) + 1)]
    n_layers, d_mlp, top_k = states[0]["top_val"].shape
    probes = [MlpProbe(n_layers, d_mlp, False, top_k)]
    probes += [SaeProbe(load_sae(path), sae_id_of(path)) for path in config.saes]
    for probe, state in zip(probes, states, strict=True):
        load_state(probe, state)
    return probes


def probe_on_ray(
    ray,
    spec: str,
    data: str,
    store: Path,
    config: ProbeConfig,
    name: str | None,
    quiet: bool,
    workers: int | None,
    max_attempts: int,
) -> str:
    """Probe one model spec on the connected Ray cluster; returns the committed run id."""
    n, options, device = _placement(ray, workers)
    config = replace(config, device=device)
    worker = ray.remote(ShardWorker).options(**options)
    extra = {"engine": "ray", "workers": n}
    with (
        RunWriter(
            store, "probe", spec, data, run_config(config, bool(config.saes), {}, **extra), name
        ) as writer,
        Progress(disable=quiet) as progress,
    ):
        shard_root = writer.staging / "_shards"

        def launch(shard: int, attempt: int):
            actor = worker.remote(spec, config)
            folder = str(shard_root / str(shard) / str(attempt))
            return actor.probe.remote(data, folder, shard, n, attempt), actor

        results = _run_shards(ray, launch, n, max_attempts, progress)
        n_tokens = _adopt(writer, shard_root, results)
        if n_tokens == 0:
            raise DataError(f"data {data!r} gave no tokens")
        probes = _merged_probes(config, results)
        write_final(probes, writer.write)
        settings = run_config(config, bool(config.saes), results[0]["settings"], **extra)
        run_id = writer.commit(n_tokens, models=[results[0]["info"]], config=settings)
    for path, probe in zip(config.saes, probes[1:], strict=True):
        register_sae(store, probe.sae_id, probe.sae, spec, Path(path))
    return run_id


def run_probe_ray(
    model_spec: str,
    data: str,
    store: Path,
    config: ProbeConfig,
    name: str | None = None,
    quiet: bool = False,
    address: str | None = None,
    workers: int | None = None,
    max_attempts: int = MAX_ATTEMPTS,
) -> list[str]:
    """``run_probe`` on Ray: connect (or start a local cluster), probe every model the spec
    names with ``workers`` actors; returns the run ids."""
    ray = _ray()
    specs = model_specs(model_spec, data, config)
    store = Path(store).expanduser().resolve()  # workers on other nodes see the same path
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, log_to_driver=not quiet)
        except (ConnectionError, ValueError, RuntimeError) as err:
            where = address or "a new local cluster"
            raise EngineError(f"cannot start Ray at {where}: {_one_line(err)}") from None
    try:
        run_ids = []
        for spec in specs:
            start = time.perf_counter()
            run_ids.append(
                probe_on_ray(ray, spec, data, store, config, name, quiet, workers, max_attempts)
            )
            if not quiet:
                print(f"probed {spec} on Ray in {time.perf_counter() - start:.1f}s")
        return run_ids
    finally:
        if started:
            ray.shutdown()
