"""Make a TransformerBridge's MLPs run sparse (METHODS.md §7); ``restore()`` brings them back.

Only torch is imported, the model is duck-typed: ``bridge.blocks[l].mlp`` has LinearBridge
children ``in``, ``out`` (and ``gate``), each wrapping a projection (``nn.Linear``, or GPT-2's
``Conv1D`` whose weight is stored ``[d_in, d_out]``) as ``original_component``. A sparsified
projection gets a mask on its input, applied by a forward pre-hook on the LinearBridge, i.e.
before its TransformerLens hook points fire (``blocks.{l}.mlp.hook_post`` is ``out.hook_in``,
so probes see the sparsified activation), and its ``original_component`` becomes a
:class:`SparseLinear` whose product skips the zeroed channels through ``kernels.ops``.

Sites per method (thresholds calibrated per layer at the target sparsity, ``kernels.thresholds``):

- relu-exact, cett, stat-topk, chess (ungated): the down projection's input ``a``;
- cett: one global CETT target for all layers (the Sparsing Law), so the layers' sparsities
  differ and their mean is the target;
- threshold, wina: ``a`` and the MLP input ``x`` of the gate/up (``in``) projections;
- chess (gated): the gate's output, zeroed where ``|σ(gate)| ≤ τ/E|up|``, so ``a`` is zero
  there too and ``hook_pre`` shows the mask.

stat-topk masks (keeps ``a`` where Spark's ``relu(|a| − θ)`` is positive) instead of shifting
values, which needs training; its ``k`` is calibrated so the target sparsity holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsescope.store.errors import BadInput

from . import ops, reference, thresholds, triton_mlp

METHODS = tuple(thresholds.METHODS)
INPUT_SIDE = ("threshold", "wina")  # methods that also sparsify the gate/up input


UNION_BATCHES = (1, 2, 4, 8, 16, 32, 64)
CALIBRATION_BATCHES = 4  # of 16 × 128 tokens, when calibrating on data


class SparsifyError(BadInput):
    """A sparsify request cannot be carried out; the message is one line."""


def union_sparsity(kept: torch.Tensor) -> dict[int, float]:
    """Sparsity of the kept set of B calibration tokens (the union over random groups of B;
    METHODS.md §7: bytes scale with it), for each B of ``UNION_BATCHES`` the data allows.
    ``kept`` is a boolean ``[n_tokens, d]``."""
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(0))
    out = {}
    for b in UNION_BATCHES:
        n = len(kept) // b
        if n == 0:
            break
        out[b] = 1.0 - float(kept[order[: n * b]].view(n, b, -1).any(1).float().mean())
    return out


class SparseLinear(nn.Module):
    """Drop-in for a projection ``y = x @ W^T + b`` computed input-sparse by ``kernels.ops``.

    The input arrives masked, so ``thresh = 0`` keeps exactly its nonzero channels. Inputs of
    more than ``MAX_BATCH`` rows (prefill) run dense on the masked input: the same values.
    ``union`` (calibrated sparsity of the kept set per batch size, :func:`union_sparsity`)
    drives the dense fallback below ``crossover``, for the batch size of each call.
    """

    def __init__(self, dense: nn.Module, union: dict[int, float], crossover: float):
        super().__init__()
        w = dense.weight.detach()
        w_t = w.t() if isinstance(dense, nn.Linear) else w
        self.register_buffer("w_t", w_t.contiguous(), persistent=False)
        self.register_buffer("thresh", w.new_zeros(w_t.shape[0], dtype=torch.float32), False)
        self.bias = dense.bias
        self.union, self.crossover = union, crossover
        self._dense = (dense,)  # not a submodule: restore() puts it back

    def batch_sparsity(self, rows: int) -> float:
        """Calibrated kept-set sparsity at ``rows`` tokens (largest tabled batch ≤ rows)."""
        return self.union[max(b for b in self.union if b <= rows)]

    @property
    def weight(self) -> torch.Tensor:
        """The original weight (for readers such as ``mlp.W_out``)."""
        return self._dense[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > triton_mlp.MAX_BATCH:
            y = reference.dense_matmul(x, self.w_t)
        else:
            s = self.batch_sparsity(rows)
            y = ops.sparse_matmul(x, self.w_t, self.thresh, s, self.crossover)
        return y if self.bias is None else y + self.bias


@dataclass
class Calibration:
    """Per-layer activations of a dense forward: MLP input ``x``, hidden ``a`` (the down
    projection's input) and, for gated MLPs, gate pre-activation ``gate`` and ``up``."""

    x: list[torch.Tensor]
    a: list[torch.Tensor]
    gate: list[torch.Tensor] | None
    up: list[torch.Tensor] | None


@dataclass
class _Site:
    """One masked tensor and its running count of dropped entries."""

    keep: Callable[[torch.Tensor], torch.Tensor]
    dropped: torch.Tensor | float = 0.0
    total: int = 0


@dataclass
class SparseHandle:
    """A sparsified model: ``restore()`` undoes the swap; ``track`` counts dropped entries."""

    method: str
    target: float
    calibrated: float  # mean sparsity of the sites on the calibration data
    sites: list[_Site] = field(default_factory=list)
    matrices: list[tuple[_Site, int]] = field(default_factory=list)  # (its site, weights)
    _undo: list[Callable[[], None]] = field(default_factory=list)
    track: bool = False

    def achieved(self) -> float:
        """Mean over sites (layers and matrices equally) of the fraction of dropped entries
        seen while ``track`` was on; nan if nothing was seen."""
        fracs = [float(s.dropped) / s.total for s in self.sites if s.total]
        return sum(fracs) / len(fracs) if fracs else float("nan")

    def ceiling(self, total_weights: int) -> float:
        """Model-level speed ceiling ``1/ρ`` of batch-1 decoding (METHODS.md §7):
        ``ρ = [Σ_m (1 − s_m)|W_m| + dense weights] / total``, with ``s_m`` the share of matrix
        m's input channels (weight rows) its site dropped while ``track`` was on."""
        skipped = sum(float(site.dropped) / site.total * n for site, n in self.matrices
                      if site.total)  # fmt: skip
        return total_weights / (total_weights - skipped)

    def reset(self) -> None:
        for s in self.sites:
            s.dropped, s.total = 0.0, 0

    def restore(self) -> None:
        """Bring the dense MLPs back (the original modules, untouched)."""
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> SparseHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _bridge(model):
    return getattr(model, "bridge", model)


def _mlps(bridge) -> list[nn.Module]:
    return [block.mlp for block in bridge.blocks]


def weight_count(model) -> int:
    """Elements of the weight matrices a decoding step reads: every ``nn.Linear``, GPT-2
    ``Conv1D`` and :class:`SparseLinear` of the model (embedding gathers and norms left out).

    Weights are counted by the memory they span, so views that share it (the bridge's q, k, v
    of a fused qkv; an LM head tied to the embedding) count once."""
    spans = sorted(
        (w.data_ptr(), w.data_ptr() + w.numel() * w.element_size(), w.element_size())
        for m in _bridge(model).modules()
        if isinstance(m, nn.Linear | SparseLinear) or type(m).__name__ == "Conv1D"
        for w in [m.weight]
    )
    total, end = 0, 0
    for lo, hi, size in spans:
        total += max(hi - max(lo, end), 0) // size
        end = max(end, hi)
    return total


def _gated(bridge) -> bool:
    return bool(getattr(bridge.cfg, "gated_mlp", False))


def _act(bridge) -> Callable[[torch.Tensor], torch.Tensor]:
    name = str(getattr(bridge.cfg, "act_fn", "relu"))
    key = next((k for k in reference.ACTIVATIONS if name.startswith(k)), None)
    if key is None:
        raise SparsifyError(f"activation {name!r} is not one of {', '.join(reference.ACTIVATIONS)}")
    return reference.ACTIVATIONS[key]


def _w_t(module: nn.Module) -> torch.Tensor:
    """The wrapped projection's weight as ``[d_in, d_out]``."""
    proj = module.original_component
    w = proj.weight.detach()
    return w.t() if isinstance(proj, nn.Linear) else w


def capture(model, batches: Iterable[torch.Tensor], max_rows: int = 8192) -> Calibration:
    """Run the dense model over token batches (``[B, T]`` ids) and keep up to ``max_rows``
    tokens of each layer's MLP activations (forward hooks on the LinearBridges)."""
    bridge = _bridge(model)
    gated = _gated(bridge)
    names = ("x", "a", "gate", "up") if gated else ("x", "a")
    store: dict[str, list[list[torch.Tensor]]] = {n: [[] for _ in bridge.blocks] for n in names}

    def keep(name: str, layer: int, t: torch.Tensor) -> None:
        rows = store[name][layer]
        have = sum(r.shape[0] for r in rows)
        if have < max_rows:
            rows.append(t.detach().reshape(-1, t.shape[-1])[: max_rows - have].float())

    def pre(name: str, layer: int):
        return lambda mod, args: keep(name, layer, args[0])

    def post(name: str, layer: int):
        return lambda mod, args, out: keep(name, layer, out)

    handles = []
    for layer, mlp in enumerate(_mlps(bridge)):
        up = mlp.get_submodule("in")
        handles += [up.register_forward_pre_hook(pre("x", layer)),
                    mlp.out.register_forward_pre_hook(pre("a", layer))]  # fmt: skip
        if gated:
            handles += [mlp.gate.register_forward_hook(post("gate", layer)),
                        up.register_forward_hook(post("up", layer))]  # fmt: skip
    run = model.backbone() if hasattr(model, "backbone") else bridge.original_model.base_model
    device = next(bridge.parameters()).device
    n = 0
    try:
        with torch.no_grad():
            for ids in batches:
                run(input_ids=ids.to(device))
                n += ids.numel()
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise SparsifyError("calibration gave no tokens: pass a non-empty list of token batches")
    cat = {name: [torch.cat(rows) for rows in layers] for name, layers in store.items()}
    return Calibration(cat["x"], cat["a"], cat.get("gate"), cat.get("up"))


def _magnitude(t: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """keep ``|v_i| > t_i``."""
    return lambda v: v.abs() > t.to(v.device)


def _stat_topk(a: torch.Tensor, sparsity: float, steps: int = 24) -> float:
    """The ``k`` for which ``stat_topk(|a|, k) > 0`` drops a ``sparsity`` share of ``a``."""
    z = a.abs()
    lo, hi = 0.0, float(z.shape[-1])
    for _ in range(steps):
        k = (lo + hi) / 2
        dropped = float((thresholds.stat_topk(z, k) <= 0).float().mean())
        lo, hi = (k, hi) if dropped > sparsity else (lo, k)
    return (lo + hi) / 2


def _down_keep(method: str, cal: Calibration, layer: int, w_out_t: torch.Tensor, s: float):
    """The keep rule on the down projection's input ``a`` of one layer."""
    a = cal.a[layer]
    if method == "relu-exact":
        return _magnitude(thresholds.relu_exact(a))
    if method == "threshold":
        return _magnitude(thresholds.threshold(a, s))
    if method == "wina":
        return _magnitude(thresholds.wina(a, w_out_t, s))
    if method == "chess":  # ungated: importance |a_j|, E|up| = 1
        return _magnitude(thresholds.chess(a, torch.ones_like(a[:1]), s))
    k = _stat_topk(a, s)
    return lambda v: thresholds.stat_topk(v.abs(), k) > 0


def _check(bridge, method: str, target: float | None) -> float:
    """The target to use (relu-exact needs none); refuses bad requests."""
    if method not in METHODS:
        raise SparsifyError(f"unknown sparsify method {method!r}: use one of {', '.join(METHODS)}")
    if target is None and method != "relu-exact":
        raise SparsifyError(f"sparsify method {method!r} needs a target in [0, 1), e.g. 0.5")
    target = 0.0 if target is None else target
    if not 0.0 <= target < 1.0:
        raise SparsifyError(f"sparsify target {target} must be in [0, 1)")
    if any(isinstance(m.out.original_component, SparseLinear) for m in _mlps(bridge)):
        raise SparsifyError("the model is already sparsified: call restore() on its handle first")
    return target


def calibration_batches(tokenizer, data, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """The first ``CALIBRATION_BATCHES`` token batches of (validated) data: a data spec or a
    list of texts."""
    import itertools

    from sparsescope.probes import data as data_sources
    from sparsescope.probes.batches import batches

    found = batches(tokenizer, data_sources.documents(data), seq_len, batch_size)
    return [b.input_ids for b in itertools.islice(found, CALIBRATION_BATCHES)]


def _union(keep: Callable, t: torch.Tensor) -> dict[int, float]:
    return union_sparsity(keep(t).reshape(-1, t.shape[-1]))


def sparsify(
    model,
    method: str,
    target: float | None = None,
    calibration: Calibration | Iterable[torch.Tensor] | str | list[str] = "stdlib-docs",
    crossover: float = reference.DEFAULT_CROSSOVER,
    seq_len: int = 128,
    batch_size: int = 16,
) -> SparseHandle:
    """Swap every MLP of a TransformerBridge (or a LoadedModel) for a sparse one.

    ``target`` is the fraction of dropped entries per sparsified input (relu-exact needs
    none). ``calibration`` is a :class:`Calibration`, token batches (``[B, T]`` ids) to
    capture one from, or data (a data spec or a list of texts) whose first
    ``CALIBRATION_BATCHES`` batches of ``batch_size × seq_len`` tokens are captured. Returns
    the handle whose ``restore()`` (or the end of a ``with`` block) brings the dense MLPs back.
    """
    bridge = _bridge(model)
    target = _check(bridge, method, target)
    if isinstance(calibration, str) or (
        isinstance(calibration, list | tuple) and calibration and isinstance(calibration[0], str)
    ):
        from sparsescope.probes.data import validate

        validate(calibration)
        tokenizer = getattr(model, "tokenizer", None)
        calibration = calibration_batches(tokenizer, calibration, seq_len, batch_size)
    cal = calibration if isinstance(calibration, Calibration) else capture(model, calibration)
    gated = _gated(bridge)
    handle = SparseHandle(method, target, 0.0)
    rates = []
    mlps = _mlps(bridge)
    if method == "cett":  # one global CETT target over the layers
        cett_t = thresholds.cett(cal.a, [_w_t(mlp.out) for mlp in mlps], target)
    try:
        for layer, mlp in enumerate(mlps):
            ins = [mlp.gate, mlp.get_submodule("in")] if gated else [mlp.get_submodule("in")]
            w_out_t = _w_t(mlp.out)
            if method == "chess" and gated:
                act = _act(bridge)
                g = act(cal.gate[layer])
                t = thresholds.chess(g, cal.up[layer], target)
                site = _output_site(handle, mlp.gate,
                                    lambda v, t=t, f=act: f(v).abs() > t.to(v.device))  # fmt: skip
                union = _union(_magnitude(t), g)
            else:
                keep = (_magnitude(cett_t[layer]) if method == "cett"
                        else _down_keep(method, cal, layer, w_out_t, target))  # fmt: skip
                site = _input_site(handle, mlp.out, keep)
                union = _union(keep, cal.a[layer])
            _swap(handle, mlp.out, site, union, crossover)
            rates.append(union[1])
            if method in INPUT_SIDE:
                w_in = [_w_t(m) for m in ins]
                t = (thresholds.threshold(cal.x[layer], target) if method == "threshold"
                     else thresholds.wina(cal.x[layer], w_in, target))  # fmt: skip
                union = _union(_magnitude(t), cal.x[layer])
                for m in ins:
                    _swap(handle, m, _input_site(handle, m, _magnitude(t)), union, crossover)
                rates.append(union[1])
    except BaseException:
        handle.restore()
        raise
    handle.calibrated = sum(rates) / len(rates)
    return handle


def _count(handle: SparseHandle, site: _Site, keep: torch.Tensor) -> None:
    if handle.track:
        site.dropped = site.dropped + (~keep).sum()
        site.total += keep.numel()


def _input_site(handle: SparseHandle, module: nn.Module, keep_fn: Callable) -> _Site:
    """Mask the input of ``module`` (before its hook points fire)."""
    site = _Site(keep_fn)
    handle.sites.append(site)

    def pre_hook(mod, args):
        x = args[0]
        keep = site.keep(x)
        _count(handle, site, keep)
        return (x.masked_fill(~keep, 0), *args[1:])

    h = module.register_forward_pre_hook(pre_hook)
    handle._undo.append(h.remove)
    return site


def _output_site(handle: SparseHandle, module: nn.Module, keep_fn: Callable) -> _Site:
    """Zero the wrapped projection's output of ``module`` where ``keep_fn`` is false (before
    the LinearBridge's ``hook_out`` fires)."""
    site = _Site(keep_fn)
    handle.sites.append(site)

    def hook(mod, args, out):
        keep = site.keep(out)
        _count(handle, site, keep)
        return out.masked_fill(~keep, 0)

    h = module.original_component.register_forward_hook(hook)
    handle._undo.append(h.remove)
    return site


def _swap(
    handle: SparseHandle, module: nn.Module, site: _Site, union: dict[int, float], crossover: float
) -> None:
    """Replace the LinearBridge's projection with a :class:`SparseLinear` whose skipped input
    channels are those ``site`` drops."""
    dense = module.original_component
    module.set_original_component(SparseLinear(dense, union, crossover))
    handle.matrices.append((site, dense.weight.numel()))
    handle._undo.append(lambda: module.set_original_component(dense))
