"""IOI task data and the three patching methods, checked against plain torch on micro models."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sparsescope.analysis import circuits, patching, tasks
from sparsescope.probes.hooks import hooked
from sparsescope.probes.models import load_model
from sparsescope.probes.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    docs = list(itertools.islice(tasks.ioi_training_docs(0), 4000))
    return train_tokenizer(docs, 2048, 64)


@pytest.fixture(scope="module")
def task(tokenizer):
    return tasks.ioi_task(tokenizer, n=6, split="test", seed=3)


def _model(tmp_path, tokenizer, act: str, linear_attention: bool = False):
    """A random 2-layer GPT-2 booted as a bridge; optionally with W_Q = W_K = 0."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2,
        n_inner=64, activation_function=act, initializer_range=0.3,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    hf = GPT2LMHeadModel(config)
    if linear_attention:
        with torch.no_grad():
            for block in hf.transformer.h:  # uniform causal pattern whatever the input
                block.attn.c_attn.weight[:, : 2 * config.n_embd] = 0
                block.attn.c_attn.bias[: 2 * config.n_embd] = 0
    folder = tmp_path / act
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(str(folder)), hf


def _centre(x):
    return x - x.mean(-1, keepdim=True)


def _plain_logits(hf, ids, resid=None, capture=None):
    """Plain-torch GPT-2 with W_Q = W_K = 0 (uniform causal attention) and centring for LN.

    ``resid`` maps a layer to a replacement residual stream; ``capture`` collects it.
    """
    t = ids.shape[1]
    x = hf.transformer.wte(ids) + hf.transformer.wpe(torch.arange(t))
    uniform = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]
    for layer, block in enumerate(hf.transformer.h):
        if resid is not None and layer in resid:
            x = resid[layer]
        if capture is not None:
            capture[layer] = x
        d = x.shape[-1]
        v = _centre(x) @ block.attn.c_attn.weight[:, 2 * d :] + block.attn.c_attn.bias[2 * d :]
        x = x + block.attn.c_proj(uniform @ v)
        x = x + block.mlp.c_proj(torch.relu(block.mlp.c_fc(_centre(x))))
    return _centre(x) @ hf.transformer.wte.weight.T


def _ld(task, logits):
    last = logits[:, -1]
    rows = torch.arange(len(last))
    return last[rows, task.answers[:, 0]] - last[rows, task.answers[:, 1]]


def test_ioi_task_data(tokenizer):
    train, val, test = (tasks.split_names(s) for s in ("train", "val", "test"))
    assert len({*train, *val, *test}) == len(train + val + test) == len(tasks.NAMES)
    assert len(test) > 10 and len(val) > 10
    assert tasks.single_tokens(tokenizer, train + test) == train + test
    task = tasks.ioi_task(tokenizer, n=8, seed=5)
    again = tasks.ioi_task(tokenizer, n=8, seed=5)
    assert torch.equal(task.clean, again.clean) and torch.equal(task.corrupted, again.corrupted)
    assert task.clean.shape == task.corrupted.shape and len(task.pos_labels) == task.clean.shape[1]
    test_ids = {tokenizer.encode(" " + n, add_special_tokens=False)[0] for n in test}
    for clean, corr, (io, s) in zip(task.clean, task.corrupted, task.answers.tolist(), strict=True):
        clean, corr = clean.tolist(), corr.tolist()
        assert clean.count(io) == 1 and clean.count(s) == 2 and {io, s} <= test_ids
        names = [i for i in corr if i in test_ids]
        assert len(set(names)) == 3 and not {io, s} & set(names)
        assert [a for a, b in zip(clean, corr, strict=True) if a != b] == [
            i for i in clean if i in test_ids
        ]
    assert {bool(c[2] == a[0]) for c, a in zip(task.clean, task.answers, strict=True)} == {
        True,
        False,
    }  # both ABBA and BABA


def test_training_docs_answer_ioi_on_train_names_only():
    held_out = set(tasks.split_names("test") + tasks.split_names("val"))
    stand_ins = set(tasks.stand_in_names())
    docs = list(itertools.islice(tasks.ioi_training_docs(1), 3000))
    answered = [d for d in docs if " to " in d]
    copies = [d for d in docs if d.endswith(" left.")]
    assert answered and copies and len(answered) + len(copies) == len(docs)
    answers = {d.rsplit(" ", 1)[1].rstrip(".") for d in answered}
    assert answers & stand_ins and answers & set(tasks.split_names("train"))
    assert not answers & held_out and not stand_ins & set(tasks.NAMES)
    assert {d.split()[0] for d in copies} >= held_out  # held-out names are seen, as names
    for doc in copies:  # the copied name is one of the one or two names before it
        words = doc.split()
        assert words[-2] in {words[0], words[2]} and {words[0], words[2]} & set(tasks.NAMES)


def test_normalized_ld_matches_plain_torch(task):
    logits = torch.randn(len(task.clean), task.clean.shape[1], int(task.answers.max()) + 1)
    ld = torch.tensor(
        [logits[b, -1, io] - logits[b, -1, s] for b, (io, s) in enumerate(task.answers.tolist())]
    )
    assert torch.allclose(task.logit_diff(logits), ld)
    got = tasks.normalized_ld(task.logit_diff(logits), 0.5, -1.0)
    assert torch.isclose(got, (ld.mean() + 1.0) / 1.5)


def test_lrp_hooks_keep_logits(tmp_path, tokenizer, task):
    model, _ = _model(tmp_path, tokenizer, "gelu_new")
    with torch.no_grad():
        plain = model.bridge(task.corrupted)
        with patching._hooks(model, patching.lrp_hooks(model, ah_rule=True)):
            lrp = model.bridge(task.corrupted)
    assert torch.allclose(plain, lrp, atol=1e-5, rtol=0)
    # ... while the backward differs: RelP is not AtP on a model with LayerNorm and GELU
    clean = patching.cache(model, task.clean, ["resid_pre"])
    ld = patching.baselines(model, task)
    atp = patching.gradient_scores(model, task, ["resid_pre"], clean, ld, relp=False)
    relp = patching.gradient_scores(model, task, ["resid_pre"], clean, ld, relp=True)
    assert not torch.allclose(atp["resid_pre"], relp["resid_pre"], atol=1e-4)


def test_relp_equals_atp_without_ln_softmax_and_smooth_activation(tmp_path, tokenizer, task):
    """LN cut to its linear part (scale fixed at 1; weight 1 and bias 0 as initialised), W_Q =
    W_K = 0 (a constant attention pattern), ReLU MLPs: every LRP rule is the gradient."""
    model, hf = _model(tmp_path, tokenizer, "relu", linear_attention=True)
    bridge = model.bridge
    for ln in [bridge.ln_final] + [n for b in bridge.blocks for n in (b.ln1, b.ln2)]:
        ln.hook_scale.forward = torch.ones_like  # the hook point's own value; hooks still fire
    with torch.no_grad():
        assert torch.allclose(bridge(task.clean), _plain_logits(hf, task.clean), atol=1e-4)
    sites = ["resid_pre", "mlp_out", "head", "neuron"]
    clean = patching.cache(model, task.clean, sites)
    ld = patching.baselines(model, task)
    atp = patching.gradient_scores(model, task, sites, clean, ld, relp=False)
    relp = patching.gradient_scores(model, task, sites, clean, ld, relp=True, ah_rule=True)
    for site in sites:
        assert torch.allclose(atp[site], relp[site], atol=1e-6, rtol=1e-4), site
    # independent AtP of the residual stream in plain torch
    cap_clean, cap_corr = {}, {}
    with torch.no_grad():
        _plain_logits(hf, task.clean, capture=cap_clean)
    _plain_logits(hf, task.corrupted, capture=cap_corr)
    leaves = {li: x.detach().requires_grad_() for li, x in cap_corr.items()}
    for li, leaf in leaves.items():
        ld_corr = _ld(task, _plain_logits(hf, task.corrupted, resid={li: leaf}))
        metric = (ld_corr.mean() - ld[1]) / (ld[0] - ld[1])
        (grad,) = torch.autograd.grad(metric, leaf)
        expected = ((cap_clean[li] - leaf.detach()) * grad).sum(dim=(0, 2))
        assert torch.allclose(relp["resid_pre"][li], expected, atol=1e-5, rtol=1e-3)


def test_activation_patching(tmp_path, tokenizer, task):
    model, _ = _model(tmp_path, tokenizer, "gelu_new")
    clean = patching.cache(model, task.clean, patching.SITES)
    ld = patching.baselines(model, task)
    every = [c for s in patching.SITES for c in patching.components(model, task, s)]
    # own clean value on the clean run: metric unchanged (= 1), component by component
    same = patching.patched_metric(model, task, task.clean, clean, [[c] for c in every], ld)
    assert torch.allclose(same, torch.ones(len(every)), atol=1e-5)
    # everything patched on the corrupted run reproduces the clean metric
    whole = patching.patched_metric(model, task, task.corrupted, clean, [every], ld)
    assert torch.allclose(whole, torch.ones(1), atol=1e-5)
    # one component at a time, against a plain hook that overwrites one position
    scores = patching.activation_patching(model, task, "resid_pre", clean, ld)
    for layer, pos in [(0, 0), (0, 2), (1, task.clean.shape[1] - 1)]:
        name = f"blocks.{layer}.hook_resid_pre"

        def put(t, hook, name=name, pos=pos):
            t = t.clone()
            t[:, pos] = clean[name][:, pos]
            return t

        with torch.no_grad(), hooked(model.bridge, [(name, put)]):
            lds = _ld(task, model.bridge(task.corrupted))
        assert torch.isclose(scores[layer, pos], (lds.mean() - ld[1]) / (ld[0] - ld[1]), atol=1e-5)


def _hf_metric(hf, task, overwrite=None) -> float:
    """Normalised-LD numerator pieces from plain HF: mean LD of the corrupted run where
    ``overwrite = (module, fn)`` replaces the module's input by ``fn(input)``."""
    handle = None
    if overwrite is not None:
        module, fn = overwrite
        handle = module.register_forward_pre_hook(lambda m, args: (fn(args[0]),))
    with torch.no_grad():
        lds = _ld(task, hf(task.corrupted).logits)
    if handle is not None:
        handle.remove()
    return float(lds.mean())


@pytest.mark.parametrize("site", ["head", "neuron"])
def test_head_and_neuron_patching_against_plain_hf_hooks(tmp_path, tokenizer, task, site):
    """One head's output (all positions) or one neuron (last position) set to its clean value
    by a pre-hook on HF's c_proj (merged heads / MLP activations), as plain torch."""
    model, hf = _model(tmp_path, tokenizer, "gelu_new")
    clean = patching.cache(model, task.clean, [site])
    scores = patching.activation_patching(model, task, site, clean, patching.baselines(model, task))
    with torch.no_grad():
        ld_clean = float(_ld(task, hf(task.clean).logits).mean())
    ld_corr = _hf_metric(hf, task)
    d_head = 32 // 2
    for layer, idx in [(0, 1), (1, 0), (1, 37)] if site == "neuron" else [(0, 0), (1, 1)]:
        block = hf.transformer.h[layer]
        proj = block.mlp.c_proj if site == "neuron" else block.attn.c_proj
        seen = []
        h = proj.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0]))
        with torch.no_grad():
            hf(task.clean)
        h.remove()
        cols = slice(idx, idx + 1) if site == "neuron" else slice(idx * d_head, (idx + 1) * d_head)
        rows = slice(-1, None) if site == "neuron" else slice(None)

        def put(x, ref=seen[0], cols=cols, rows=rows):
            x = x.clone()
            x[:, rows, cols] = ref[:, rows, cols]
            return x

        patched = _hf_metric(hf, task, (proj, put))
        expected = (patched - ld_corr) / (ld_clean - ld_corr)
        assert float(scores[layer, idx]) == pytest.approx(expected, abs=1e-4), (layer, idx)


def test_faithfulness_mean_ablates_all_but_the_circuit(tmp_path, tokenizer, task):
    model, _ = _model(tmp_path, tokenizer, "gelu_new")
    ld = patching.baselines(model, task)
    nodes = [(s, li, p) for s in circuits.NODE_SITES for li in range(2) for p in range(15)]
    scores = pd.DataFrame(
        {
            "method": "relp",
            "site": [s for s, _, _ in nodes],
            "layer": [li for _, li, _ in nodes],
            "pos": [p for _, _, p in nodes],
            "score": torch.linspace(1, 0, len(nodes)).tolist(),  # nodes[0] ranks first
        }
    )
    (faith,) = circuits.faithfulness(model, task, scores, ld, ks=(1, len(nodes))).values()
    assert faith[1] == [len(nodes), pytest.approx(1.0, abs=1e-5)]
    # independent: every attention/MLP output but attn_out of layer 0, position 0 is its mean
    names = [f"blocks.{li}.hook_{s}" for li in range(2) for s in circuits.NODE_SITES]
    acts = {}
    with torch.no_grad(), hooked(model.bridge, [(n, _keep(acts, n)) for n in names]):
        model.bridge(task.clean)

    def ablate(name):
        def fn(t, hook):
            mean = acts[name].mean(0, keepdim=True).expand_as(t).clone()
            if name == "blocks.0.hook_attn_out":
                mean[:, 0] = t[:, 0]
            return mean

        return fn

    with torch.no_grad(), hooked(model.bridge, [(n, ablate(n)) for n in names]):
        lds = _ld(task, model.bridge(task.clean))
    assert faith[0][1] == pytest.approx(float((lds.mean() - ld[1]) / (ld[0] - ld[1])), abs=1e-5)


def _keep(acts, name):
    def fn(t, hook):
        acts[name] = t

    return fn
