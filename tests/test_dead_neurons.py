"""Dead neurons: planted dead / always-on / rare neurons in a tiny ReLU GPT-2, probed at
four checkpoints of a fake zoo; the analysis is checked against the planted sets and
against firing counts from a plain Hugging Face forward with torch hooks."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import plotly.io
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from sparsescope.analysis.dead_neurons import (
    checkpoint_runs,
    death_over_checkpoints,
    layer_summary,
    neuron_categories,
)
from sparsescope.probes.batches import batches
from sparsescope.probes.data import documents
from sparsescope.probes.job import ProbeConfig, run_probe
from sparsescope.probes.models import minilm_path
from sparsescope.store.console import run_sql
from sparsescope.store.reader import Reader
from tests.test_neuron_browser import dashboard_app, plotly_array

SEQ_LEN, BATCH, N_TOKENS = 64, 8, 2048
N_LAYERS, D_MODEL, D_MLP = 2, 32, 64
ALWAYS_ON = {(0, 9), (1, 40), (1, 41)}
RARE = (0, 60)  # fires only on the token(s) where its pre-activation is largest
DEAD_AT = {  # step -> planted dead neurons (layer, neuron)
    0: {(0, 1)},
    10: {(0, 1), (0, 2), (0, 3), (1, 4)},
    100: {(0, 1), (0, 2), (1, 5)},  # (0, 3) and (1, 4) revive
    1000: {(0, 1), (0, 2), (0, 3), (1, 5), (1, 6)},  # (0, 3) dies again
}
STEPS = sorted(DEAD_AT)
TOKEN_IDS = "SELECT token_id FROM tokens WHERE run_id = ? ORDER BY seq_id, pos"


def _probe_ids(tokenizer) -> torch.Tensor:
    docs = documents("stdlib-docs")
    return torch.cat([b.input_ids for b in batches(tokenizer, docs, SEQ_LEN, BATCH, N_TOKENS)])


def _hidden(model: GPT2LMHeadModel, ids: torch.Tensor) -> tuple[list, list]:
    """Per layer: MLP pre-activations and activations [tokens, d_mlp], via forward hooks."""
    pre, post = [None] * N_LAYERS, [None] * N_LAYERS
    handles = []
    for layer, block in enumerate(model.transformer.h):
        for module, out in ((block.mlp.c_fc, pre), (block.mlp.act, post)):
            handles.append(
                module.register_forward_hook(
                    lambda m, i, o, out=out, layer=layer: out.__setitem__(
                        layer, o.reshape(-1, D_MLP).clone()
                    )
                )
            )
    with torch.no_grad():
        model.transformer(input_ids=ids)
    for h in handles:
        h.remove()
    return pre, post


def _set(model, layer: int, neuron: int, bias: float) -> None:
    fc = model.transformer.h[layer].mlp.c_fc  # Conv1D: weight [d_model, d_mlp]
    fc.weight[:, neuron] = 0.0
    fc.bias[neuron] = bias


@torch.no_grad()
def _base_model(tokenizer, ids) -> GPT2LMHeadModel:
    """Random ReLU GPT-2; normal neurons fire on ~3% of the probe tokens, planted ones fixed."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=SEQ_LEN,
        n_embd=D_MODEL,
        n_layer=N_LAYERS,
        n_head=2,
        n_inner=D_MLP,
        activation_function="relu",
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    model = GPT2LMHeadModel(config).eval()
    for layer in range(N_LAYERS):
        fc = model.transformer.h[layer].mlp.c_fc
        pre = _hidden(model, ids)[0][layer]
        fc.bias -= torch.quantile(pre, 0.97, dim=0)
        if layer == RARE[0]:
            values = torch.unique(pre[:, RARE[1]] - torch.quantile(pre[:, RARE[1]], 0.97))
            fc.bias[RARE[1]] -= (values[-1] + values[-2]) / 2
        for on_layer, neuron in ALWAYS_ON:
            if on_layer == layer:
                _set(model, layer, neuron, 1.0)
    return model


def _write_zoo(zoo: Path, base: GPT2LMHeadModel, tokenizer) -> dict[int, GPT2LMHeadModel]:
    """A fake zoo manifest (preset micro, model 'planted') with one folder per checkpoint."""
    models, rows = {}, []
    for step in STEPS:
        model = copy.deepcopy(base)
        with torch.no_grad():
            for layer, neuron in DEAD_AT[step]:
                _set(model, layer, neuron, -1.0)
        path = f"planted/step-{step}"
        model.save_pretrained(zoo / "micro" / path)
        tokenizer.save_pretrained(zoo / "micro" / path)
        models[step] = model
        rows.append(
            {"name": "planted", "family": "gpt2", "act_fn": "relu", "step": step}
            | {"tokens_seen": step * 2048, "train_loss": None, "val_loss": None, "path": path}
        )
    manifest = {"preset": "micro", "checkpoints": rows}
    (zoo / "micro" / "zoo.json").write_text(json.dumps(manifest))
    return models


@pytest.fixture(scope="module")
def zoo_store(tmp_path_factory):
    """Four probed checkpoints of the planted model; brute-force firing counts per step."""
    root = tmp_path_factory.mktemp("planted")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    ids = _probe_ids(tokenizer)
    models = _write_zoo(root / "zoo", _base_model(tokenizer, ids), tokenizer)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSESCOPE_ZOO", str(root / "zoo"))
        config = ProbeConfig(max_tokens=N_TOKENS, seq_len=SEQ_LEN, batch_size=BATCH)
        run_ids = run_probe("zoo:planted@all", "stdlib-docs", root / "store", config, quiet=True)
    acts = {step: torch.stack(_hidden(m, ids)[1]).numpy() for step, m in models.items()}
    counts = {step: (a > 0).sum(1) for step, a in acts.items()}  # [layer, neuron]
    return SimpleNamespace(
        store=root / "store",
        zoo=root / "zoo",
        run_ids=run_ids,
        ids=ids,
        tokenizer=tokenizer,
        acts=acts,
        counts=counts,
    )


def _pairs(mask: np.ndarray) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for a, b in zip(*np.nonzero(mask), strict=True)}


def test_planted_sets_are_reported_exactly(zoo_store):
    reader = Reader(zoo_store.store)
    final = zoo_store.run_ids[-1]
    tokens = reader.sql(TOKEN_IDS, [final])
    assert np.array_equal(tokens["token_id"].to_numpy(), zoo_store.ids.reshape(-1).numpy())

    brute = zoo_store.counts[STEPS[-1]]
    assert _pairs(brute == 0) == DEAD_AT[STEPS[-1]]
    assert _pairs(brute / N_TOKENS > 0.1) == ALWAYS_ON
    assert 1 <= brute[RARE] <= 3
    df = neuron_categories(reader, final, nearly_dead=4 / N_TOKENS)
    by_category = {
        c: set(zip(g["layer"], g["neuron"], strict=True)) for c, g in df.groupby("category")
    }
    assert by_category["dead"] == DEAD_AT[STEPS[-1]]
    assert by_category["dense"] == ALWAYS_ON
    assert by_category["nearly dead"] == {RARE}
    stored = np.zeros_like(brute)
    stored[df["layer"], df["neuron"]] = df["n_active"]
    assert np.array_equal(stored, brute)

    summary = layer_summary(reader, final)
    assert summary["n_tokens"].tolist() == [N_TOKENS] * N_LAYERS
    for layer in range(N_LAYERS):
        row = summary.iloc[layer]
        f = brute[layer] / N_TOKENS
        assert row["dead"] == (f == 0).sum() and row["dense"] == (f > 0.1).sum()
        assert row["nearly dead"] == 0  # with 2,048 tokens any firing neuron has f > 1e-5
        assert row["normal"] == ((f > 0) & (f <= 0.1)).sum()
        assert row["dnr"] == pytest.approx(1 - brute[layer].sum() / (N_TOKENS * D_MLP), abs=1e-12)


def test_death_over_checkpoints_is_exact(zoo_store):
    reader = Reader(zoo_store.store)
    ckpts = checkpoint_runs(reader, zoo_store.run_ids[1])
    assert ckpts["run_id"].tolist() == zoo_store.run_ids
    assert ckpts["step"].tolist() == STEPS

    result = death_over_checkpoints(reader, zoo_store.run_ids)
    dead = np.stack([zoo_store.counts[s] == 0 for s in STEPS])  # brute force [K, L, D]
    for k, step in enumerate(STEPS):
        assert _pairs(dead[k]) == DEAD_AT[step]
    expected_death, expected_revivals = {}, {}
    for layer, neuron in _pairs(dead.any(0)):
        history = dead[:, layer, neuron].tolist()
        alive_after = [k for k, d in enumerate(history) if not d]
        last_alive = max(alive_after, default=-1)
        expected_death[layer, neuron] = last_alive + 1 if history[-1] else -1
        expected_revivals[layer, neuron] = sum(
            history[k - 1] and not history[k] for k in range(1, len(history))
        )
    assert expected_death == {(0, 1): 0, (0, 2): 1, (0, 3): 3, (1, 4): -1, (1, 5): 2, (1, 6): 3}
    neurons = result.neurons.set_index(["layer", "neuron"])
    for key, death in expected_death.items():
        assert neurons.loc[key, "death_checkpoint"] == death
        assert neurons.loc[key, "revivals"] == expected_revivals[key]
    assert (neurons["death_checkpoint"] >= 0).sum() == 5
    assert (neurons["revivals"] > 0).sum() == 2

    per = result.checkpoints.set_index(["checkpoint", "layer"])
    for k in range(len(STEPS)):
        for layer in range(N_LAYERS):
            assert per.loc[(k, layer), "dead"] == dead[k, layer].sum()
            died = sum(d == k for (lay, _), d in expected_death.items() if lay == layer)
            assert per.loc[(k, layer), "died"] == died
            revived = 0 if k == 0 else (dead[k - 1, layer] & ~dead[k, layer]).sum()
            assert per.loc[(k, layer), "revived"] == revived
    assert per["revived"].sum() == 2


def test_pages_on_a_multi_checkpoint_store(zoo_store, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSESCOPE_ZOO", str(zoo_store.zoo))
    final = zoo_store.run_ids[-1]
    at = dashboard_app(monkeypatch, tmp_path, zoo_store.store)
    at.switch_page("views/dead_neurons.py").run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Dead"] == "5" and metrics["Dense"] == "3"
    assert metrics["Dead for good by the last checkpoint"] == "5"
    assert metrics["Revived neurons (dead, then firing later)"] == "2"
    assert len(at.get("plotly_chart")) == 3
    table = at.dataframe[1].value.set_index(["layer", "neuron"])
    assert set(table.index) == DEAD_AT[STEPS[-1]] | ALWAYS_ON
    assert table.loc[(0, 3), "died_at_step"] == 1000 and table.loc[(1, 5), "died_at_step"] == 100
    assert table.loc[(0, 3), "browse"] == f"neuron_browser?run={final}&layer=0&neuron=3"

    at = dashboard_app(monkeypatch, tmp_path, zoo_store.store)
    at.query_params.update({"run": zoo_store.run_ids[1], "layer": "1", "neuron": "4"})
    at.switch_page("views/neuron_browser.py").run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Category"] == "dead"
    assert f"dead over {N_TOKENS:,} tokens" in at.caption[0].value
    charts = [plotly.io.from_json(c.proto.spec).data[0] for c in at.get("plotly_chart")]
    assert [c.type for c in charts] == ["bar", "scatter"]  # no top contexts; density; training
    density = charts[0]  # every token, none of them above 0
    assert sum(plotly_array(density.y)) == N_TOKENS
    assert all(label == "0" or label.startswith("-") for label in density.x), density.x
    at.toggle[0].set_value(True).run()
    assert not at.exception, at.exception
    hf = GPT2LMHeadModel.from_pretrained(zoo_store.zoo / "micro" / "planted" / "step-10")
    logits = hf.lm_head.weight @ hf.transformer.h[1].mlp.c_proj.weight[4]  # Conv1D [d_mlp, d]
    top, bottom = (at.dataframe[i].value for i in (0, 1))
    assert top["token_id"].tolist() == logits.topk(10).indices.tolist()
    assert bottom["token_id"].tolist() == logits.topk(10, largest=False).indices.tolist()


def _recipes() -> list[str]:
    """The SQL blocks of README's "SQL recipes: dead neurons" section."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## SQL recipes: dead neurons", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.S)


def _bind(query: str, **literals: str) -> str:
    for old, new in literals.items():
        assert old in query, old
        query = query.replace(old, new)
    return query


def test_readme_sql_recipes(zoo_store):
    dead_in_layer, top_contexts_sql, died_between = _recipes()
    final = zoo_store.run_ids[-1]

    rows = run_sql(zoo_store.store, _bind(dead_in_layer, **{"layer = 3": "layer = 1"}))
    df = rows.table.to_pandas()
    df = df[df["run_id"] == final]
    assert set(df["neuron"]) == {n for layer, n in DEAD_AT[STEPS[-1]] if layer == 1}
    assert (df["dead_over_tokens"] == N_TOKENS).all()

    layer, neuron = RARE
    query = _bind(
        top_contexts_sql,
        **{"layer = 3": f"layer = {layer}", "neuron = 42": f"neuron = {neuron}"},
    )
    df = run_sql(zoo_store.store, query).table.to_pandas()
    best = df[(df["run_id"] == final) & (df["rank"] == 0)].iloc[0]
    values = zoo_store.acts[STEPS[-1]][layer][:, neuron]
    assert best["value"] == pytest.approx(values.max(), abs=1e-5)
    seq_len = zoo_store.ids.shape[1]
    assert best["seq_id"] * seq_len + best["pos"] in np.flatnonzero(values == values.max())
    names = [zoo_store.tokenizer.decode([t]) for t in zoo_store.ids[best["seq_id"]].tolist()]
    pos = int(best["pos"])
    assert best["token"] == names[pos]
    assert best["context"] == " ".join(names[max(0, pos - 8) : pos + 9])

    query = _bind(
        died_between,
        **{"relu-l4-d128": "planted", "step = 39": "step = 100", "step = 240": "step = 1000"},
    )
    df = run_sql(zoo_store.store, query).table.to_pandas()
    before, after = (zoo_store.counts[s] for s in (100, 1000))
    assert set(zip(df["layer"], df["neuron"], strict=True)) == _pairs((before > 0) & (after == 0))
    assert set(zip(df["layer"], df["neuron"], strict=True)) == {(0, 3), (1, 6)}
