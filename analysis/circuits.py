"""Owner of METHODS.md §6 agreement and circuit faithfulness; runs and stores the comparison.

- Agreement: Pearson r of AtP and RelP scores against activation patching, per site.
- Circuit: the top-k nodes by |score|, where the nodes are attention and MLP outputs per
  layer × position (together with the embeddings they make up the residual stream).
  Faithfulness = M of the clean run with every other node mean-ablated (its mean over the
  clean prompts at that position) divided by M of the clean run (= 1).
- Wall time of each method over all sites, its clean forward included.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sparsescope.analysis import patching
from sparsescope.analysis.tasks import Task, TaskError
from sparsescope.probes.models import LoadedModel, load_model
from sparsescope.store.catalog import check_writable
from sparsescope.store.writer import RunWriter

KS = (1, 2, 5, 10, 20, 40)
NODE_SITES = ("attn_out", "mlp_out")


@dataclass
class CircuitReport:
    scores: pd.DataFrame  # patching_scores rows
    agreement: dict[str, dict[str, float]]  # site → method → r against activation patching
    faithfulness: dict[str, list[list[float]]]  # method → [[k, faithfulness], ...]
    seconds: dict[str, float]  # method → wall time
    ld: tuple[float, float]  # mean clean and corrupted LD
    run_id: str | None = None  # the circuits run, when stored


def agreement(scores: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Pearson r of each gradient method's scores against activation patching, per site."""
    keys = ["site", "layer", "pos", "head", "neuron"]
    filled = scores.fillna({k: -1 for k in keys[2:]})  # nulls would drop out of the grouping
    wide = filled.pivot_table(index=keys, columns="method", values="score")
    out: dict[str, dict[str, float]] = {}
    for site, part in wide.groupby(level="site"):
        if "activation" not in part:
            continue
        truth = part["activation"].to_numpy()
        out[site] = {
            m: float(np.corrcoef(truth, part[m].to_numpy())[0, 1])
            for m in ("attribution", "relp")
            if m in part and truth.std() > 0 and part[m].std() > 0
        }
    return out


def faithfulness(
    model: LoadedModel,
    task: Task,
    scores: pd.DataFrame,
    ld: tuple[float, float],
    ks: Sequence[int] = KS,
) -> dict[str, list[list[float]]]:
    """Faithfulness of each method's top-k node circuit, for every k in ``ks``."""
    clean = patching.cache(model, task.clean, NODE_SITES)
    means = {name: act.mean(0, keepdim=True) for name, act in clean.items()}
    nodes = scores[scores["site"].isin(NODE_SITES)]
    full = patching.patched_metric(model, task, task.clean, means, [[]], ld).item()
    out = {}
    for method, part in nodes.groupby("method"):
        order = part.assign(mag=part["score"].abs()).sort_values("mag", ascending=False)
        comps = [(r.site, int(r.layer), int(r.pos)) for r in order.itertuples()]
        kept = [k for k in ks if k <= len(comps)]
        values = patching.patched_metric(
            model, task, task.clean, means, [comps[k:] for k in kept], ld
        )
        out[method] = [[k, v / full] for k, v in zip(kept, values.tolist(), strict=True)]
    return out


def compare(
    model: LoadedModel,
    task: Task,
    sites: Sequence[str] = patching.SITES,
    ks: Sequence[int] = KS,
    ah_rule: bool = False,
) -> CircuitReport:
    """Run activation patching, AtP and RelP on every site; score agreement and circuits."""
    frames, seconds = [], {}
    for method in patching.METHODS:
        start = time.perf_counter()
        clean = patching.cache(model, task.clean, sites)
        ld = patching.baselines(model, task)
        if math.isclose(*ld, rel_tol=1e-6, abs_tol=1e-6):
            raise TaskError(
                f"the mean logit difference is {ld[0]:.4g} on clean and on corrupted prompts:"
                " the normalised metric is undefined"
            )
        if method == "activation":
            result = {s: patching.activation_patching(model, task, s, clean, ld) for s in sites}
        else:
            relp = method == "relp"
            result = patching.gradient_scores(model, task, sites, clean, ld, relp, ah_rule)
        seconds[method] = time.perf_counter() - start
        frames += [patching.score_rows(task, method, s, result[s]) for s in sites]
    scores = pd.concat(frames, ignore_index=True)
    faith = faithfulness(model, task, scores, ld, ks)
    return CircuitReport(scores, agreement(scores), faith, seconds, ld)


def write_run(
    store: Path, model: LoadedModel, task: Task, report: CircuitReport, config: dict
) -> str:
    """Store the scores as a ``circuits`` run; the task and the evaluation go into the run's
    config."""
    config = {
        **config,
        **task.info,
        "task": task.name,
        "n": len(task.clean),
        "pos_labels": task.pos_labels,
        "ld_clean": report.ld[0],
        "ld_corr": report.ld[1],
        "agreement": report.agreement,
        "faithfulness": report.faithfulness,
        "seconds": report.seconds,
    }
    with RunWriter(store, "circuits", model.model_id, task.name, config) as writer:
        writer.write("patching_scores", report.scores)
        return writer.commit(int(task.clean.numel() + task.corrupted.numel()), [model.info])


def circuits(
    model, task: Task, store: Path | str | None = None, ah_rule: bool = False,
    config: dict | None = None,
) -> CircuitReport:  # fmt: skip
    """Score every component of a causal LM (a spec or a model in memory, see
    ``load_model``) on ``task`` with activation patching, AtP and RelP (``compare``); with
    ``store``, also keep the scores there as a ``circuits`` run (``report.run_id``)."""
    if store is not None:
        check_writable(Path(store))
    loaded = load_model(model)
    if not loaded.is_causal_lm:
        raise TaskError(f"circuits score next-token logits: {loaded.model_id!r} is not a causal LM")
    if task.clean.shape[1] > loaded.n_ctx:
        raise TaskError(
            f"the prompts are {task.clean.shape[1]} tokens, over the {loaded.n_ctx} of"
            f" {loaded.model_id!r}"
        )
    report = compare(loaded, task, ah_rule=ah_rule)
    if store is not None:
        settings = {"ah_rule": ah_rule, "torch_threads": torch.get_num_threads(), **(config or {})}
        report.run_id = write_run(Path(store), loaded, task, report, settings)
    return report
