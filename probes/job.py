"""A probe job: stream a data set through a model with probes on, into one store run."""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sparsescope.probes import data as data_sources
from sparsescope.probes.batches import batches
from sparsescope.probes.hooks import hooked
from sparsescope.probes.mlp_probe import MlpProbe
from sparsescope.probes.models import LoadedModel, load_model
from sparsescope.store.writer import RunWriter


@dataclass
class ProbeConfig:
    max_tokens: int | None = 50_000
    seq_len: int = 128
    batch_size: int = 16
    device: str = "cpu"
    top_k: int = 20


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


def probe_model(
    model: LoadedModel,
    data: str,
    store: Path,
    config: ProbeConfig,
    name: str | None = None,
    quiet: bool = False,
) -> str:
    """Probe a loaded model over a data spec; returns the committed run id."""
    probe = MlpProbe(model.n_layers, model.d_mlp, model.gated, config.top_k, config.device)
    names = TokenNames(model.tokenizer)
    backbone = model.backbone()
    run_config = {
        **vars(config),
        "probes": ["tokens", "layer_token_stats", "neuron_stats", "neuron_top", "hash_codes"],
    }
    n_tokens = 0
    seq_len = min(config.seq_len, model.n_ctx)
    with ExitStack() as stack:
        writer = stack.enter_context(
            RunWriter(store, "probe", model.model_id, data, run_config, name)
        )
        progress = stack.enter_context(_progress(config.max_tokens, quiet))
        task = progress.add_task("probe", total=config.max_tokens)
        stack.enter_context(hooked(model.bridge, probe.hooks()))
        stack.enter_context(torch.inference_mode())
        stack.enter_context(model.fast_attention())
        for batch in batches(
            model.tokenizer,
            data_sources.documents(data),
            seq_len,
            config.batch_size,
            config.max_tokens,
        ):
            ids = batch.input_ids
            probe.start_batch(batch.seq_ids, ids.shape[1])
            backbone(input_ids=ids.to(config.device))
            flat = ids.reshape(-1).numpy()
            writer.write(
                "tokens",
                {
                    "seq_id": np.repeat(batch.seq_ids, ids.shape[1]),
                    "pos": np.tile(np.arange(ids.shape[1], dtype=np.int32), len(batch.seq_ids)),
                    "token_id": flat.astype(np.int32),
                    "token": names(flat),
                },
            )
            for table, rows in probe.take_rows().items():
                writer.write(table, pa.Table.from_batches(rows))
            n_tokens += flat.size
            progress.update(task, advance=flat.size)
        if n_tokens == 0:
            raise data_sources.DataError(f"data {data!r} gave no tokens")
        writer.write("neuron_stats", probe.neuron_stats())
        writer.write("neuron_top", probe.neuron_top())
        return writer.commit(n_tokens, models=[model.info])


def run_probe(
    model_spec: str,
    data: str,
    store: Path,
    config: ProbeConfig,
    name: str | None = None,
    quiet: bool = False,
) -> list[str]:
    """Validate inputs, then probe every model the spec names; returns the run ids."""
    from sparsescope.probes.models import expand

    data_sources.validate(data)
    specs = expand(model_spec)
    run_ids = []
    for spec in specs:
        model = load_model(spec, config.device)
        start = time.perf_counter()
        run_ids.append(probe_model(model, data, store, config, name, quiet))
        if not quiet:
            print(f"probed {spec} in {time.perf_counter() - start:.1f}s")
    return run_ids
