"""The sparsity-laws pipeline over the zoo: probe every checkpoint, PPL-p% and CETT
curves at the final checkpoints, then fit both law forms (METHODS.md §2).

Every step writes ordinary runs into the store and skips work already there, so
a second call on the same store is cheap.
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
from sparsescope.probes.models import load_model
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


def ratio_over_training(reader: Reader) -> pd.DataFrame:
    """Activation ratio (firing) per zoo checkpoint and layer on the held-out probe set."""
    return reader.sql(
        "SELECT m.family AS model, m.act_fn, m.n_layers, m.d_model, m.d_mlp, m.step,"
        " m.tokens_seen, m.val_loss, s.layer,"
        " sum(s.n_active) / sum(s.n_tokens) / any_value(m.d_mlp) AS activation_ratio"
        " FROM layer_summary s JOIN runs r USING (run_id) JOIN models m USING (model_id)"
        " WHERE m.source = 'zoo' AND r.kind = 'probe' AND r.dataset = ?"
        " GROUP BY ALL ORDER BY model, step, layer",
        [DATASET],
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
    console = console or Console()
    rows = train_zoo(preset)
    finals = {row["name"]: row for row in rows}  # manifest rows are in step order
    for row in rows:
        spec = f"zoo:{row['name']}@{row['step']}"
        if _done(store, "probe", spec, tokens):
            continue
        console.print(f"probing {spec}")
        model = load_model(spec)
        probe_model(model, DATASET, store, ProbeConfig(max_tokens=tokens), quiet=True)
    for name, row in finals.items():
        spec = f"zoo:{name}@{row['step']}"
        if not _done(store, "thresholds", spec):
            console.print(f"PPL-p% thresholds and CETT curves of {spec}")
            threshold_run(store, load_model(spec), ppl_tokens)
    fits = fit_rows(ratio_over_training(Reader(store)))
    config = {"preset": preset, "tokens": tokens}
    with RunWriter(store, "laws", None, DATASET, config, name=f"laws-{preset}") as writer:
        writer.write("law_fits", fits)
        writer.commit(None)
    return fits
