"""``sparsescope circuits`` on a micro model, and the Circuits page on its store."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from streamlit.testing.v1 import AppTest
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from sparsescope.analysis import tasks
from sparsescope.app.circuits_cli import circuits
from sparsescope.probes.tokenizer import train_tokenizer
from sparsescope.store.reader import Reader

PAGE = str(Path(__file__).parents[1] / "app" / "views" / "circuits.py")


@pytest.fixture(scope="module")
def circuits_store(tmp_path_factory):
    """A store with one circuits run of a random 2-layer GELU GPT-2 on 8 IOI prompt pairs."""
    root = tmp_path_factory.mktemp("circuits")
    docs = list(itertools.islice(tasks.ioi_training_docs(0), 4000))
    tokenizer = train_tokenizer(docs, 2048, 64)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=64,
        activation_function="gelu_new", initializer_range=0.3,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    app = typer.Typer()
    app.command()(circuits)
    args = ["--model", str(root / "model"), "--store", str(root / "store"), "--n", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return root / "store", result.output


def test_cli_writes_scores_and_evaluation(circuits_store):
    store, output = circuits_store
    assert "Pearson r" in output and "activation / RelP time ratio" in output
    r = Reader(store)
    counts = r.sql(
        "SELECT method, site, count(*) AS n FROM patching_scores GROUP BY ALL ORDER BY ALL"
    )
    assert set(counts["method"]) == {"activation", "attribution", "relp"}
    n = counts.pivot(index="site", columns="method", values="n")
    assert (n.nunique(axis=1) == 1).all()  # one row per component and method
    assert n.loc["neuron", "relp"] == 2 * 64 and n.loc["head", "relp"] == 2 * 2
    (config,) = r.sql("SELECT config FROM runs WHERE kind = 'circuits'")["config"]
    config = json.loads(config)
    assert set(config["agreement"]) == {"resid_pre", "attn_out", "mlp_out", "head", "neuron"}
    scores = r.sql("SELECT method, site, layer, pos, head, neuron, score FROM patching_scores")
    for site, part in scores.groupby("site"):
        keyed = {
            method: g.set_index(["layer", "pos", "head", "neuron"], drop=True)["score"]
            for method, g in part.fillna(-1).groupby("method")
        }
        truth = keyed["activation"].sort_index()
        for method in ("attribution", "relp"):
            other = keyed[method].reindex(truth.index)
            expected = np.corrcoef(truth.to_numpy(), other.to_numpy())[0, 1]
            assert config["agreement"][site][method] == pytest.approx(expected, abs=1e-9)
    assert set(config["seconds"]) == {"activation", "attribution", "relp"}


def test_cli_bad_task_is_one_line(circuits_store, tmp_path):
    app = typer.Typer()
    app.command()(circuits)
    model = circuits_store[0].parent / "model"
    result = CliRunner().invoke(
        app, ["--model", str(model), "--store", str(tmp_path / "s"), "--task", "nope"]
    )
    assert result.exit_code == 2 and "unknown task 'nope'" in result.output


def test_page_shows_run(circuits_store, monkeypatch):
    monkeypatch.setenv("SPARSESCOPE_STORE", str(circuits_store[0]))
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    assert [h.value for h in at.header] == [
        "Scores by method",
        "Agreement with activation patching",
        "Circuits",
    ]
    for site in ("head", "neuron"):
        at.selectbox[1].select(site).run()
        assert not at.exception


@pytest.fixture(scope="module")
def file_task_store(circuits_store):
    """A store with one circuits run of the same model on a JSONL file of 4 prompt pairs whose
    file name and first prompt hold markup characters."""
    model = circuits_store[0].parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(model)
    names = tasks.single_tokens(tokenizer, tasks.split_names("test"))
    text = "<b>Then {} met {} at the park, and then {} left. Later {} saw"
    pairs = [
        {"clean": text.format(a, b, a, b), "corrupted": text.format(c, d, c, d),
         "answer": " " + a, "wrong": " " + b}
        for a, b, c, d in zip(names[0:4], names[4:8], names[8:12], names[12:16], strict=True)
    ]  # fmt: skip
    path = circuits_store[0].parent / "my_*pairs*.jsonl"
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    store = circuits_store[0].parent / "file_store"
    app = typer.Typer()
    app.command()(circuits)
    args = ["--model", str(model), "--store", str(store), "--task", str(path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return store, path


def test_page_shows_file_task_run(file_task_store, monkeypatch):
    store, path = file_task_store
    monkeypatch.setenv("SPARSESCOPE_STORE", str(store))
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    assert "my_*pairs*" in at.selectbox[0].options[0]
    assert at.text[0].value.startswith(f"Task my_*pairs*: 4 prompt pairs from {path.resolve()}")
    assert at.metric[0].value == "4"
    heatmap = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]
    assert heatmap["x"][1] == "1 &lt;"  # the first prompt's tokens, escaped for Plotly
    assert not any("<" in x for x in heatmap["x"])


def test_page_on_empty_store(empty_store, monkeypatch):
    monkeypatch.setenv("SPARSESCOPE_STORE", str(empty_store))
    at = AppTest.from_file(PAGE, default_timeout=30).run()
    assert not at.exception and "No circuits runs yet" in at.info[0].value


def test_readme_patching_recipe(circuits_store):
    """README's patching_scores query, against the same ranking done in pandas."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    (sql,) = [b for b in text.split("```sql")[1:] if "patching_scores" in b.split("```")[0]]
    r = Reader(circuits_store[0])
    got = r.sql(sql.split("```")[0].strip().rstrip(";"))
    scores = r.sql("SELECT * FROM patching_scores WHERE site = 'mlp_out'")
    wide = scores.pivot_table(index=["layer", "pos"], columns="method", values="score")
    top = wide.reindex(wide["relp"].abs().sort_values(ascending=False).index).head(10)
    assert got["relp"].tolist() == top["relp"].tolist()
    assert got["activation"].tolist() == top["activation"].tolist()
