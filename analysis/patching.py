"""Owner of METHODS.md §6 activation patching, attribution patching (AtP) and RelP.

Components ("sites"), all through TransformerBridge hook points:

- ``resid_pre``, ``attn_out``, ``mlp_out``: one vector per layer × position;
- ``head``: one head's ``attn.hook_z`` at every position, per layer × head;
- ``neuron``: one MLP neuron (``mlp.hook_post``) at the last position, per layer × neuron
  (the position the metric reads; all positions would multiply activation patching by the
  prompt length).

Scores are effects on the normalised logit difference M (0 corrupted, 1 clean) of moving a
component from its corrupted to its clean value in every prompt at once. Activation patching
measures it (one corrupted forward per component, replicas of the batch stacked so that one
call runs many components). AtP and RelP estimate it by ``Σ (a_clean − a_corr) · ∂M/∂a`` at
the corrupted run; RelP takes the backward pass through LRP rules set at forward time by
hooks that keep forward values: LN rule (``hook_scale`` detached), identity rule for the MLP
activation, half rule for gated products, optional AH rule (``hook_pattern`` detached).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import pandas as pd
import torch

from sparsescope.analysis.tasks import Task, normalized_ld
from sparsescope.probes.hooks import hooked
from sparsescope.probes.models import LoadedModel

SITES = ("resid_pre", "attn_out", "mlp_out", "head", "neuron")
METHODS = ("activation", "attribution", "relp")
_HOOKS = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "head": "blocks.{}.attn.hook_z",
    "neuron": "blocks.{}.mlp.hook_post",
}
_LN_SCALE = re.compile(r"(blocks\.\d+\.ln\d+|ln_final)\.hook_scale")
_EPS = 1e-6  # the identity rule's stabiliser of z away from 0

Component = tuple[str, int, int]  # (site, layer, index within the layer)


def hook_name(site: str, layer: int) -> str:
    return _HOOKS[site].format(layer)


def _index(site: str, idx: int) -> tuple:
    """The component's part of a site tensor, after the batch dimension."""
    if site == "head":
        return (slice(None), idx)  # [batch, pos, head, d_head]
    if site == "neuron":
        return (-1, idx)  # [batch, pos, d_mlp], last position
    return (idx,)  # [batch, pos, d_model]


def _per_component(site: str, x: torch.Tensor) -> torch.Tensor:
    """Sum a site tensor ``[batch, ...]`` over everything but its components → ``[n]``."""
    if site == "head":
        return x.sum(dim=(0, 1, 3))
    if site == "neuron":
        return x[:, -1].sum(0)
    return x.sum(dim=(0, 2))


def components(model: LoadedModel, task: Task, site: str) -> list[Component]:
    """Every component of a site, layer by layer."""
    cfg = model.bridge.cfg
    n = {"head": cfg.n_heads, "neuron": cfg.d_mlp}.get(site, task.clean.shape[1])
    return [(site, layer, i) for layer in range(cfg.n_layers) for i in range(n)]


# --- forward passes ----------------------------------------------------------------------


def _compose(fns: list[Callable]) -> Callable:
    def fn(t, hook):
        for f in fns:
            t = f(t, hook)
        return t

    return fn


@contextmanager
def _hooks(model: LoadedModel, hooks: dict[str, list[Callable]]) -> Iterator[None]:
    with hooked(model.bridge, [(name, _compose(fns)) for name, fns in hooks.items()]):
        yield


def _capture(store: dict[str, torch.Tensor], name: str, detach: bool) -> Callable:
    def fn(t, hook):
        store[name] = t.detach() if detach else t
        return t

    return fn


@torch.no_grad()
def cache(model: LoadedModel, ids: torch.Tensor, sites: Sequence[str]) -> dict[str, torch.Tensor]:
    """Activations at every layer's hook of the sites (detached), keyed by hook name."""
    out: dict[str, torch.Tensor] = {}
    names = [hook_name(s, li) for s in sites for li in range(model.n_layers)]
    with _hooks(model, {n: [_capture(out, n, detach=True)] for n in names}):
        model.bridge(ids)
    return out


@torch.no_grad()
def baselines(model: LoadedModel, task: Task) -> tuple[float, float]:
    """Mean LD on the clean and on the corrupted prompts."""
    return tuple(float(task.logit_diff(model.bridge(ids)).mean()) for ids in task.prompts)


@torch.no_grad()
def patched_metric(
    model: LoadedModel,
    task: Task,
    ids: torch.Tensor,
    source: dict[str, torch.Tensor],
    patch_sets: Sequence[Sequence[Component]],
    ld: tuple[float, float],
    chunk: int = 64,
) -> torch.Tensor:
    """M of ``ids`` with patch set k's components set to ``source`` values, one per set.

    ``source[hook]`` has the batch of ``ids`` or a batch of 1 (e.g. a mean); each set runs as
    its own replica of the batch, ``chunk`` replicas per forward call.
    """
    n, out = len(ids), []
    for start in range(0, len(patch_sets), chunk):
        sets = patch_sets[start : start + chunk]
        todo: dict[str, list[tuple[int, tuple]]] = defaultdict(list)
        for k, comps in enumerate(sets):
            for site, layer, idx in comps:
                todo[hook_name(site, layer)].append((k, _index(site, idx)))

        def patch(name: str, todo=todo) -> Callable:
            def fn(t, hook):
                t = t.clone()
                for k, index in todo[name]:
                    rows = (slice(k * n, (k + 1) * n), *index)
                    t[rows] = source[name][(slice(None), *index)]
                return t

            return fn

        with _hooks(model, {name: [patch(name)] for name in todo}):
            logits = model.bridge(ids.repeat(len(sets), 1))
        lds = task.logit_diff(logits).view(len(sets), n)
        out.append(torch.stack([normalized_ld(row, *ld) for row in lds]))
    return torch.cat(out)


# --- the three methods -------------------------------------------------------------------


def activation_patching(
    model: LoadedModel, task: Task, site: str, clean: dict, ld: tuple[float, float]
) -> torch.Tensor:
    """Ground truth ``[n_layers, n]``: M of the corrupted run with one component clean."""
    comps = components(model, task, site)
    scores = patched_metric(model, task, task.corrupted, clean, [[c] for c in comps], ld)
    return scores.view(model.n_layers, -1)


def _stable(z: torch.Tensor) -> torch.Tensor:
    """z with entries nearer 0 than ``_EPS`` moved to ±``_EPS`` (others exact)."""
    return torch.where(z.abs() < _EPS, torch.where(z >= 0, _EPS, -_EPS), z)


def lrp_hooks(model: LoadedModel, ah_rule: bool = False) -> dict[str, list[Callable]]:
    """Forward hooks whose outputs equal their inputs but whose gradients follow LRP rules."""
    names = model.bridge.hook_dict
    hooks: dict[str, list[Callable]] = defaultdict(list)
    for name in names:
        if _LN_SCALE.fullmatch(name):
            hooks[name].append(lambda t, hook: t.detach())  # LN rule
    for layer in range(model.n_layers):
        pre: dict[str, torch.Tensor] = {}
        z_name, u_name = f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_pre_linear"
        gated = model.gated and u_name in names
        hooks[z_name].append(_capture(pre, "z", detach=False))
        if gated:
            hooks[u_name].append(_capture(pre, "u", detach=False))

        def rule(post, hook, pre=pre, gated=gated):
            if gated:  # identity rule on σ(gate), then the half rule on σ(gate) ⊙ up
                z, u = pre["z"], pre["u"]
                s = 0.5 * z * u * (post / (_stable(z) * _stable(u))).detach()
            else:  # identity rule: σ(z) acts as z · σ(z)/z
                s = pre["z"] * (post / _stable(pre["z"])).detach()
            return s + (post - s).detach()  # forward value: post; gradient: that of s

        hooks[f"blocks.{layer}.mlp.hook_post"].append(rule)
        if ah_rule:
            hooks[f"blocks.{layer}.attn.hook_pattern"].append(lambda t, hook: t.detach())
    return hooks


def gradient_scores(
    model: LoadedModel,
    task: Task,
    sites: Sequence[str],
    clean: dict,
    ld: tuple[float, float],
    relp: bool,
    ah_rule: bool = False,
) -> dict[str, torch.Tensor]:
    """AtP (``relp=False``) or RelP scores ``{site: [n_layers, n]}``: one forward, one backward.

    ``clean`` is the clean run's cache (the method's other forward pass).
    """
    acts: dict[str, torch.Tensor] = {}
    hooks = lrp_hooks(model, ah_rule) if relp else defaultdict(list)
    names = [hook_name(s, li) for s in sites for li in range(model.n_layers)]
    for name in names:
        hooks[name].append(_capture(acts, name, detach=False))
    with torch.enable_grad(), _hooks(model, hooks):
        metric = normalized_ld(task.logit_diff(model.bridge(task.corrupted)), *ld)
        grads = torch.autograd.grad(metric, [acts[n] for n in names])
    grad = dict(zip(names, grads, strict=True))
    return {
        site: torch.stack(
            [
                _per_component(site, (clean[n] - acts[n].detach()) * grad[n])
                for n in (hook_name(site, li) for li in range(model.n_layers))
            ]
        )
        for site in sites
    }


def score_rows(task: Task, method: str, site: str, scores: torch.Tensor) -> pd.DataFrame:
    """``patching_scores`` rows of one site's ``[n_layers, n]`` scores."""
    layer, idx = torch.meshgrid(
        torch.arange(scores.shape[0]), torch.arange(scores.shape[1]), indexing="ij"
    )
    idx = pd.array(idx.flatten().tolist(), dtype="Int32")
    none = pd.array([None] * len(idx), dtype="Int32")
    last = pd.array([task.clean.shape[1] - 1] * len(idx), dtype="Int32")
    pos = {"head": none, "neuron": last}.get(site, idx)
    return pd.DataFrame(
        {
            "task": task.name,
            "method": method,
            "site": site,
            "layer": layer.flatten().numpy().astype("int16"),
            "pos": pos,
            "head": idx if site == "head" else none,
            "neuron": idx if site == "neuron" else none,
            "score": scores.flatten().double().numpy(),
        }
    )
