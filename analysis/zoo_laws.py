"""The sparsity-laws pipeline over checkpoint series: probe every checkpoint, PPL-p% and
CETT curves at each series' final checkpoint, then fit both law forms (METHODS.md §2).

The zoo (``analyze_zoo``) is the default; ``analyze_series`` runs the same steps on one
series spec (``series:GLOB``, ``org/name@REV1,REV2``, ``zoo:<name>@all``). A series is the
models rows of one family with a step. Every step writes ordinary runs into the store and
skips work already there, so a second call on the same store is cheap.
"""

from __future__ import annotations

import pandas as pd
import torch
from rich.console import Console

from sparsescope.analysis import cett, laws
from sparsescope.kernels.thresholds import cett_curve
from sparsescope.probes.batches import batches
from sparsescope.probes.data import documents
from sparsescope.probes.job import ProbeConfig, probe_model
from sparsescope.probes.models import ModelError, expand, load_model, locate
from sparsescope.store.catalog import check_writable, is_store
from sparsescope.store.reader import Reader
from sparsescope.store.writer import RunWriter

DATASET = "stdlib-docs:heldout"
CETT_GRID = 24


def _done(store, kind: str, model_id: str | None, n_tokens: int | None = None) -> bool:
    if not is_store(store):
        return False
    query = "SELECT 1 FROM runs WHERE status = 'complete' AND kind = ? AND dataset = ?"
    params = [kind, DATASET]
    if model_id is not None:
        query += " AND model_id = ?"
        params.append(model_id)
    if n_tokens is not None:
        query += " AND n_tokens >= ?"
        params.append(n_tokens)
    return not Reader(store).sql(query, params).empty


def heldout_batches(model, tokens: int, batch_size: int = 8) -> list[torch.Tensor]:
    return [
        b.input_ids
        for b in batches(model.tokenizer, documents(DATASET), model.n_ctx, batch_size, tokens)
    ]


def threshold_run(store, model, tokens: int) -> str:
    """PPL-p% thresholds for every p and the CETT curve of each layer, as one run."""
    token_batches = heldout_batches(model, tokens)
    acts = cett.capture_post(model, token_batches)
    norms = cett.w_out_norms(model)
    config = {"tokens": tokens, "ps": list(cett.PS), "tolerance": cett.PPL_TOL}
    with RunWriter(store, "thresholds", model.model_id, DATASET, config) as writer:
        for p in cett.PS:
            result = cett.ppl_p_thresholds(model, token_batches, p, acts)
            writer.write("thresholds", cett.thresholds_rows(result))
        for layer, (a, norm) in enumerate(zip(acts, norms, strict=True)):
            w_out = model.bridge.blocks[layer].mlp.W_out.detach().float()
            grid, values = cett_curve(a, w_out, torch.linspace(0.0, 0.99, CETT_GRID))
            writer.write(
                "cett_curves",
                {
                    "layer": [layer] * CETT_GRID,
                    "threshold": grid.tolist(),
                    "cett": values.tolist(),
                    "activation_ratio": [
                        float(((a.abs() * norm) > t).float().mean()) for t in grid
                    ],
                },
            )
        return writer.commit(sum(b.numel() for b in token_batches), models=[model.info])


def ratio_over_training(reader: Reader, families: list[str] | None = None) -> pd.DataFrame:
    """Activation ratio (firing) per checkpoint (a model with a step; ``model`` is its
    family) and layer on the held-out probe set, of every series or of ``families``."""
    only = "" if families is None else " AND list_contains(?, m.family)"
    return reader.sql(
        "SELECT m.family AS model, m.act_fn, m.n_layers, m.d_model, m.d_mlp, m.step,"
        " m.tokens_seen, m.val_loss, s.layer,"
        " sum(s.n_active) / sum(s.n_tokens) / any_value(m.d_mlp) AS activation_ratio"
        " FROM layer_summary s JOIN runs r USING (run_id) JOIN models m USING (model_id)"
        f" WHERE m.step IS NOT NULL AND r.kind = 'probe' AND r.dataset = ?{only}"
        " GROUP BY ALL ORDER BY model, step, layer",
        [DATASET] + ([] if families is None else [families]),
    )


def fit_rows(ratios: pd.DataFrame) -> pd.DataFrame:
    """Both law forms per model, for each layer and for the mean over layers (layer −1)."""
    mean = (
        ratios.groupby(
            ["model", "act_fn", "n_layers", "d_model", "d_mlp", "step", "tokens_seen"],
            as_index=False,
        )["activation_ratio"]
        .mean()
        .assign(layer=-1)
    )
    rows = []
    for keys, group in pd.concat([ratios, mean]).groupby(
        ["model", "act_fn", "n_layers", "d_model", "d_mlp", "layer"]
    ):
        group = group.sort_values("tokens_seen")
        for form, fit in laws.fit_both(group["tokens_seen"], group["activation_ratio"]).items():
            params = fit.params if fit else {}
            rows.append(
                {
                    **dict(
                        zip(
                            ["model", "act_fn", "n_layers", "d_model", "d_mlp", "layer"],
                            keys,
                            strict=True,
                        )
                    ),
                    "form": form,
                    "c": params.get("c"),
                    "alpha": params.get("alpha"),
                    "b": params.get("b"),
                    "a0": params.get("a0"),
                    "r2": fit.r2 if fit else None,
                    "n_points": int((group["tokens_seen"] > 0).sum()),
                }
            )
    return pd.DataFrame(rows)


def _analyze(
    store,
    series: dict[str, list[str]],
    config: dict,
    name: str,
    tokens: int,
    ppl_tokens: int,
    console: Console,
) -> pd.DataFrame:
    """Probe every checkpoint (family -> specs in step order), threshold each series' last
    one, fit the laws of those families; one ``laws`` run holds the fits."""
    for specs in series.values():
        for spec in specs:
            if _done(store, "probe", spec, tokens):
                continue
            console.print(f"probing {spec}")
            model = load_model(spec)
            probe_model(model, DATASET, store, ProbeConfig(max_tokens=tokens), quiet=True)
    for specs in series.values():
        if not _done(store, "thresholds", specs[-1]):
            console.print(f"PPL-p% thresholds and CETT curves of {specs[-1]}")
            threshold_run(store, load_model(specs[-1]), ppl_tokens)
    fits = fit_rows(ratio_over_training(Reader(store), list(series)))
    with RunWriter(store, "laws", None, DATASET, config, name=name) as writer:
        writer.write("law_fits", fits)
        writer.commit(None)
    return fits


def analyze_zoo(
    store,
    preset: str = "tiny",
    tokens: int = 16_384,
    ppl_tokens: int = 8_192,
    console: Console | None = None,
) -> pd.DataFrame:
    """Train (cached), probe every checkpoint, threshold the final ones, fit the laws."""
    from sparsescope.probes.zoo import train_zoo

    check_writable(store)
    series: dict[str, list[str]] = {}
    for row in train_zoo(preset):  # manifest rows: per model, in step order
        series.setdefault(row["name"], []).append(f"zoo:{row['name']}@{row['step']}")
    config = {"preset": preset, "tokens": tokens}
    return _analyze(
        store, series, config, f"laws-{preset}", tokens, ppl_tokens, console or Console()
    )


def analyze_series(
    store,
    spec: str,
    tokens: int = 16_384,
    ppl_tokens: int = 8_192,
    console: Console | None = None,
) -> pd.DataFrame:
    """``analyze_zoo`` on one checkpoint series spec; D is each checkpoint's tokens seen, and
    checkpoints that record none are left out of the fits (as step 0 is)."""
    check_writable(store)
    console = console or Console()
    specs = expand(spec)
    infos = [locate(s)[1] for s in specs]
    if any(info.get("step") is None for info in infos):
        raise ModelError(
            f"--model {spec!r} is not a checkpoint series: use series:GLOB,"
            " org/name@REV1,REV2 or zoo:<name>@all"
        )
    family = infos[0]["family"]
    unknown = [s for s, info in zip(specs, infos, strict=True) if info.get("tokens_seen") is None]
    if unknown:
        console.print(
            f"{len(unknown)} of {len(specs)} checkpoints of {family} record no tokens seen"
            f" (first: {unknown[0]}): the fits leave them out"
        )
    config = {"model": spec, "tokens": tokens}
    return _analyze(store, {family: specs}, config, f"laws-{family}", tokens, ppl_tokens, console)
