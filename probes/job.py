"""A probe job: stream a data set through a model with probes on, into one store run."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from numbers import Integral
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sparsescope.probes import data as data_sources
from sparsescope.probes import host_memory
from sparsescope.probes.batches import Batch, batches
from sparsescope.probes.codes import CodePolicy, parse_codes
from sparsescope.probes.hooks import hook_widths, hooked
from sparsescope.probes.mlp_probe import MlpProbe
from sparsescope.probes.models import (
    LoadedModel,
    ModelError,
    check_dtype,
    expand,
    load_model,
    resolve_device,
)
from sparsescope.probes.sae import SaeError, load_sae, model_name_matches, register_sae, sae_id_of
from sparsescope.probes.sae_probe import SaeProbe
from sparsescope.probes.sparsified import parse_sparsify, sparsified
from sparsescope.store.catalog import store_path
from sparsescope.store.errors import BadInput
from sparsescope.store.writer import RunWriter


@dataclass
class ProbeConfig:
    max_tokens: int | None = 100_000  # dead neurons need N ≥ 10^5 tokens (METHODS.md §3)
    seq_len: int = 128
    batch_size: int = 16
    device: str = "auto"  # auto: cuda when present, else cpu
    dtype: str = "auto"  # auto: the checkpoint's dtype on a GPU, float32 on a CPU
    codes: str = "auto"  # which hash codes to keep (probes.codes)
    top_k: int = 20
    saes: list[str] = field(default_factory=list)  # SAELens or sparsify folders to probe too
    sae_any_model: bool = False  # probe SAEs whose metadata names another model
    sparsify: str | None = None  # METHOD:TARGET: probe the model running sparse


class TokenNames:
    """Token id -> display string, decoded once per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: np.ndarray) -> list[str]:
        out = []
        for i in ids.tolist():
            name = self.cache.get(i)
            if name is None:
                name = self.cache[i] = self.tokenizer.decode([i])
            out.append(name)
        return out


def _progress(total: int | None, quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold]probing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TimeRemainingColumn(),
        disable=quiet,
        transient=False,
    )


def _sae_probes(model: LoadedModel, config: ProbeConfig) -> list[tuple[str, SaeProbe]]:
    saes = [(path, load_sae(path, model.device)) for path in config.saes]
    for path, sae in saes:
        if sae.hook_name not in model.bridge.hook_dict:
            raise ModelError(f"SAE {path} hooks {sae.hook_name}, which {model.model_id} lacks")
    widths = hook_widths(model.bridge, [sae.hook_name for _, sae in saes]) if saes else {}
    for path, sae in saes:
        if widths.get(sae.hook_name) != sae.d_in:
            raise ModelError(
                f"SAE {path} reads {sae.d_in} values at {sae.hook_name}, where "
                f"{model.model_id} has {widths.get(sae.hook_name)}: it was made for another model"
            )
        made_for = sae.meta.get("model_name")  # checked last: --sae-any-model lifts only this
        names = (model.model_id, model.info.get("family"))
        if not (config.sae_any_model or model_name_matches(made_for, *names)):
            raise SaeError(
                f"SAE {path} was made for {made_for!r}, not {model.model_id!r}:"
                " pass --sae-any-model to probe it anyway"
            )
    return [(path, SaeProbe(sae, sae_id_of(path), model.device)) for path, sae in saes]


def code_policy(model: LoadedModel, config: ProbeConfig) -> CodePolicy:
    return parse_codes(config.codes, model.n_layers, model.d_mlp)


def make_probes(model: LoadedModel, config: ProbeConfig) -> tuple[list, list[tuple[str, SaeProbe]]]:
    """The probes of a job: the MLP probe, then one per SAE; and the (path, probe) SAE pairs.

    The MLP probe computes its statistics where the model runs: on the host (numba) for a
    CPU model, else on the model's device."""
    saes = _sae_probes(model, config)
    stats_device = None if model.device.type == "cpu" else model.device
    mlp = MlpProbe(
        model.n_layers, model.d_mlp, model.gated, config.top_k, code_policy(model, config),
        stats_device, sparse=config.sparsify is not None,
    )  # fmt: skip
    return [mlp] + [probe for _, probe in saes], saes


def resolved_settings(model: LoadedModel, config: ProbeConfig) -> dict:
    """The device, dtype and code policy a job's ``auto`` settings became for ``model``."""
    return {
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "codes": code_policy(model, config).spec,
    }


def run_config(config: ProbeConfig, with_saes: bool, resolved: dict, **extra) -> dict:
    """The config JSON of a probe run: the settings (``resolved``: see ``resolved_settings``)
    and the tables it writes."""
    tables = ["tokens", "layer_token_stats", "neuron_stats", "neuron_top", "hash_codes"]
    if with_saes:
        tables += ["sae_feature_acts", "sae_feature_stats"]
    return {**asdict(config), **resolved, "probes": tables, **extra}


def seq_len_of(model: LoadedModel, config: ProbeConfig) -> int:
    return min(config.seq_len, model.n_ctx)


@contextmanager
def probing(model: LoadedModel, probes: list, data: str, config: ProbeConfig) -> Iterator[None]:
    """Sparsify the model if asked, attach the probes' hooks and set up fast inference
    (with host memory reused from batch to batch)."""
    with ExitStack() as stack:
        stack.enter_context(host_memory.reused_memory())
        # sparsify first: its calibration passes must not reach the probes' hooks
        stack.enter_context(
            sparsified(model, config.sparsify, data, seq_len_of(model, config), config.batch_size)
        )
        stack.enter_context(hooked(model.bridge, [h for p in probes for h in p.hooks()]))
        stack.enter_context(torch.inference_mode())
        stack.enter_context(model.fast_attention())
        stack.enter_context(model.native_norms())
        yield


def model_batches(model: LoadedModel, data: str, config: ProbeConfig) -> Iterator[Batch]:
    """The job's batches, in order (deterministic for a data spec and config)."""
    docs = data_sources.documents(data)
    seq_len = seq_len_of(model, config)
    return batches(model.tokenizer, docs, seq_len, config.batch_size, config.max_tokens)


def probe_batch(
    model: LoadedModel,
    probes: list,
    batch: Batch,
    names: TokenNames,
    write: Callable[[str, object], None],
    device: torch.device,
    seconds: dict[str, float] | None = None,
) -> int:
    """Run one batch inside ``probing``; write its token rows; returns its token count.
    ``seconds["forward"]`` (if given) gains the wall time of the model's forward call."""
    ids = batch.input_ids
    for probe in probes:
        probe.start_batch(batch.seq_ids, ids.shape[1])
    start = time.perf_counter()
    model.backbone()(input_ids=ids.to(device))
    if seconds is not None:
        seconds["forward"] += time.perf_counter() - start
    flat = ids.reshape(-1).numpy()
    write(
        "tokens",
        {
            "seq_id": np.repeat(batch.seq_ids, ids.shape[1]),
            "pos": np.tile(np.arange(ids.shape[1], dtype=np.int32), len(batch.seq_ids)),
            "token_id": flat.astype(np.int32),
            "token": names(flat),
        },
    )
    for probe in probes:
        for table, rows in probe.take_rows().items():
            if rows:
                write(table, pa.Table.from_batches(rows))
    return flat.size


def write_final(probes: list, write: Callable[[str, object], None]) -> None:
    """Write the probes' run-level tables (neuron stats, top contexts, SAE feature stats)."""
    for probe in probes:
        for table, rows in probe.final_tables().items():
            write(table, rows)


def probe_model(
    model: LoadedModel,
    data: data_sources.Data,
    store: Path,
    config: ProbeConfig,
    name: str | None = None,
    quiet: bool = False,
) -> str:
    """Probe a loaded model over validated data (see ``probe``); returns the run id."""
    probes, saes = make_probes(model, config)
    names = TokenNames(model.tokenizer)
    n_tokens, seconds = 0, {"forward": 0.0}
    with ExitStack() as stack:
        writer = stack.enter_context(
            RunWriter(
                store,
                "probe",
                model.model_id,
                data_sources.label(data),
                run_config(config, bool(saes), resolved_settings(model, config)),
                name,
            )
        )
        stack.enter_context(probing(model, probes, data, config))
        progress = stack.enter_context(_progress(config.max_tokens, quiet))
        task = progress.add_task("probe", total=config.max_tokens)
        for batch in model_batches(model, data, config):
            size = probe_batch(model, probes, batch, names, writer.write, model.device, seconds)
            n_tokens += size
            progress.update(task, advance=size)
        if n_tokens == 0:
            raise data_sources.DataError(f"data {data_sources.label(data)!r} gave no tokens")
        write_final(probes, writer.write)
        mlp = probes[0]
        seconds["statistics"] = mlp.stats_seconds
        measured = {"host_bytes": mlp.host_bytes, "seconds": seconds}
        settings = run_config(config, bool(saes), resolved_settings(model, config) | measured)
        run_id = writer.commit(n_tokens, models=[model.info], config=settings)
    for path, probe in saes:
        register_sae(store, probe.sae_id, probe.sae, model.model_id, Path(path))
    return run_id


_LEAST = {"max_tokens": 1, "seq_len": 2, "batch_size": 1, "top_k": 1}  # as the CLI's bounds


def _check_sizes(config: ProbeConfig) -> None:
    for name, least in _LEAST.items():
        value = getattr(config, name)
        if name == "max_tokens" and value is None:  # no limit
            continue
        if isinstance(value, bool) or not isinstance(value, Integral) or value < least:
            raise BadInput(f"{name} must be an integer of at least {least}, not {value!r}")
    if not isinstance(config.saes, list | tuple):
        raise BadInput(f"saes must be a list of SAE folders, not {config.saes!r}")


def check_job(data: data_sources.Data, config: ProbeConfig) -> None:
    """Validate the data and options of a job before any work starts."""
    _check_sizes(config)
    data_sources.validate(data)
    if config.sparsify:
        parse_sparsify(config.sparsify)
    parse_codes(config.codes, n_layers=1 << 20, d_mlp=8)  # the syntax; layers are checked later
    resolve_device(config.device)
    check_dtype(config.dtype)


def model_specs(model_spec: str, data: data_sources.Data, config: ProbeConfig) -> list[str]:
    """Validate the data and options of a job; returns the model specs it probes."""
    check_job(data, config)
    return expand(model_spec)


def probe(
    model: object,
    data: data_sources.Data,
    store: Path | str,
    config: ProbeConfig | None = None,
    *,
    name: str | None = None,
    quiet: bool = False,
    tokenizer=None,
    **options,
) -> str:
    """Probe one model over ``data`` into ``store``; returns the committed run id.

    ``model`` is a spec naming one model or a model in memory (a ``TransformerBridge``, a
    Hugging Face model with its ``tokenizer``, a ``LoadedModel``: see ``load_model``), used
    where it is; ``data`` a data spec or a list of texts; ``options`` are ``ProbeConfig``
    fields (``max_tokens=10_000``, ``sparsify="threshold:0.5"``, ...) over ``config``.
    """
    known = {f.name for f in fields(ProbeConfig)}
    if unknown := sorted(set(options) - known):
        raise TypeError(f"unknown probe option(s) {unknown}: use {sorted(known)}")
    config = replace(config or ProbeConfig(), **options)
    store = store_path(store)
    check_job(data, config)
    if isinstance(model, str) and expand(model) != [model]:
        raise ModelError(f"{model!r} names several checkpoints: probe them one by one")
    loaded = load_model(model, config.device, config.dtype, tokenizer)
    return probe_model(loaded, data, store, config, name, quiet)


def run_probe(
    model_spec: str,
    data: str,
    store: Path,
    config: ProbeConfig,
    name: str | None = None,
    quiet: bool = False,
) -> list[str]:
    """Validate inputs, then probe every model the spec names (``zoo:<name>@all``: each
    checkpoint); returns the run ids."""
    run_ids = []
    for spec in model_specs(model_spec, data, config):
        model = load_model(spec, config.device, config.dtype)
        start = time.perf_counter()
        run_ids.append(probe_model(model, data, store, config, name, quiet))
        if not quiet:
            print(f"probed {spec} in {time.perf_counter() - start:.1f}s")
    return run_ids
