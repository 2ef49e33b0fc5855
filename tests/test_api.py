"""The Python API (``import sparsescope as ss``): a model in memory probed where it is, SQL
to DataFrames and Arrow, sparsify and restore, and the README's notebook example."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import sparsescope as ss
from sparsescope.probes.models import minilm_path

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse activations make some neurons silent on most tokens.",
    "A store keeps every run of a probe, and DuckDB reads it with SQL.",
] * 4
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def hf_llama():
    """A tiny random Llama in memory (never saved), the MiniLM tokenizer, and an untouched
    deep copy of the model for the independent reference."""
    config = AutoConfig.for_model(
        "llama", vocab_size=30528, hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return model, AutoTokenizer.from_pretrained(str(minilm_path())), copy.deepcopy(model)


def _gate_firing(model, tokens: pd.DataFrame) -> np.ndarray:
    """[layer, token] active-neuron counts where the plain HF model's gate is positive."""
    seen: dict[int, list] = {0: [], 1: []}
    handles = [
        model.model.layers[i].mlp.gate_proj.register_forward_hook(
            lambda m, a, out, keep=seen[i]: keep.append(out.flatten(0, -2))
        )
        for i in seen
    ]
    with torch.inference_mode():
        for _, seq in tokens.groupby("seq_id", sort=True):
            model(input_ids=torch.tensor(seq["token_id"].to_numpy())[None])
    for h in handles:
        h.remove()
    return np.stack([(torch.cat(seen[i]) > 0).sum(1).numpy() for i in seen])


def test_a_model_in_memory_is_probed_where_it_is(tmp_path, hf_llama):
    model, tokenizer, reference = hf_llama
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    store = tmp_path / "s"
    run_id = ss.probe(model, TEXTS, store, tokenizer=tokenizer, name="mine", seq_len=16,
                      batch_size=2, max_tokens=96, quiet=True)  # fmt: skip
    with ss.open_store(store) as db:
        runs = db.sql("SELECT run_id, model_id, dataset, n_tokens FROM runs")
        assert runs.to_dict("records") == [
            {"run_id": run_id, "model_id": "llama", "dataset": "texts:12", "n_tokens": 96}
        ]
        assert db.sql("SELECT source FROM models").iloc[0, 0] == "memory"
        tokens = db.sql("SELECT seq_id, token_id FROM tokens ORDER BY seq_id, pos")
        stats = db.arrow(
            "SELECT layer, n_active FROM layer_token_stats ORDER BY layer, seq_id, pos"
        )
    assert isinstance(stats, pa.Table) and stats.num_rows == 2 * 96
    expected = _gate_firing(reference, tokens)
    got = np.asarray(stats["n_active"]).reshape(2, 96)
    np.testing.assert_array_equal(got, expected)
    assert got.sum() > 0
    # nothing was reloaded or left behind: same modules and weights, no hooks, still usable
    assert list(model.state_dict()) == list(weights) and model.config._attn_implementation == (
        reference.config._attn_implementation
    )
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    ids = torch.from_numpy(tokens["token_id"].to_numpy()[None, :16].astype(np.int64))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_sparsify_and_restore_from_python(hf_llama):
    model, tokenizer, _ = hf_llama
    loaded = ss.load_model(model, tokenizer=tokenizer)
    shared = loaded.bridge.original_model.model.layers[0].mlp.gate_proj.weight
    assert shared.data_ptr() == model.model.layers[0].mlp.gate_proj.weight.data_ptr()
    ids = tokenizer(TEXTS[1], return_tensors="pt").input_ids
    run = loaded.bridge.original_model  # the bridge's view of the model: what runs sparse
    with torch.inference_mode():
        dense, mine = run(ids).logits, model(ids).logits
        torch.testing.assert_close(dense, mine, atol=1e-5, rtol=0)  # eager vs sdpa attention
    with ss.sparsify(loaded, "threshold", 0.5, calibration=TEXTS, seq_len=16) as handle:
        assert 0.3 < handle.calibrated < 0.7
        with torch.inference_mode():
            assert not torch.allclose(run(ids).logits, dense, atol=1e-3)
            assert torch.equal(model(ids).logits, mine)  # the caller's object stays dense
    with torch.inference_mode():
        assert torch.equal(run(ids).logits, dense)
    # relu-exact needs no target (it used to raise a TypeError on None)
    ss.sparsify(loaded, "relu-exact", calibration=TEXTS, seq_len=16).restore()
    with pytest.raises(ss.BadInput, match="needs a target"):
        ss.sparsify(loaded, "threshold", calibration=TEXTS)


def test_bad_python_input_is_one_clear_error(tmp_path, hf_llama):
    model, tokenizer, _ = hf_llama
    with pytest.raises(ss.BadInput, match="needs its tokenizer"):
        ss.load_model(model)
    with pytest.raises(ss.BadInput, match="cannot probe a dict"):
        ss.probe({}, TEXTS, tmp_path / "s")
    with pytest.raises(ss.BadInput, match=r"data\[1\] is a int"):
        ss.probe(model, ["text", 3], tmp_path / "s", tokenizer=tokenizer)
    with pytest.raises(ss.BadInput, match="no text"):
        ss.probe(model, ["  ", "\x00"], tmp_path / "s", tokenizer=tokenizer)
    with pytest.raises(TypeError, match="unknown probe option"):
        ss.probe(model, TEXTS, tmp_path / "s", tokenizer=tokenizer, max_tokenz=5)
    with pytest.raises(ss.BadInput, match="stays where it is"):
        ss.probe(model, TEXTS, tmp_path / "s", tokenizer=tokenizer, device="cpu")
    bad_options = [{"top_k": 0}, {"top_k": -1}, {"batch_size": 0}, {"seq_len": 1},
                   {"max_tokens": -1}, {"max_tokens": 1.5}, {"max_tokens": "16"},
                   {"saes": "folder"}]  # fmt: skip
    for options in bad_options:  # top_k=0 once wrote past an array's end and aborted Python
        (name,) = options
        with pytest.raises(ss.BadInput, match=name):
            ss.probe(model, TEXTS, tmp_path / "s", tokenizer=tokenizer, **options)
    for name in (5, "a\nb", "red\x1b[31m"):
        with pytest.raises(ss.BadInput, match="name"):
            ss.probe(model, TEXTS, tmp_path / "s", tokenizer=tokenizer, name=name, max_tokens=8)
    for store in (None, 5):
        with pytest.raises(ss.BadInput, match="folder path"):
            ss.probe(model, TEXTS, store, tokenizer=tokenizer, max_tokens=8)
        with pytest.raises(ss.BadInput, match="folder path"):
            ss.open_store(store)
    assert not (tmp_path / "s").exists()


def test_import_is_light_and_names_are_listed():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, sparsescope as ss; print('torch' in sys.modules,"
         " sorted(ss.__all__) == sorted(n for n in dir(ss) if n in ss.__all__))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.split() == ["False", "True"]


def test_readme_notebook_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Python API") :]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # the README's own example
    assert isinstance(namespace["ratio"], pd.DataFrame) and len(namespace["ratio"]) == 6
    sae, store = namespace["sae"], namespace["store"]
    assert sae.d_sae == 2 * sae.d_in == 768 and sae.k == 8
    store.refresh()
    acts = store.sql(
        "SELECT count(*) AS n, max(value) AS top FROM sae_feature_acts WHERE run_id = ?",
        [namespace["features_run"]],
    ).iloc[0]
    assert acts["n"] > 0 and acts["top"] > 0
    assert (tmp_path / "stores" / "nb").is_dir()


def test_circuits_on_a_task_object(tmp_path, hf_llama):
    """``ss.circuits`` on pairs built in Python: the stored clean and corrupted logit
    differences equal the plain HF model's logits at the last position."""
    model, tokenizer, reference = hf_llama
    words = ["cat", "dog", "tree", "house", "river", "stone"]
    records = [
        {"clean": f"the {a} saw the {b} and the", "corrupted": f"the {b} saw the {a} and the",
         "answer": f" {a}", "wrong": f" {b}"}
        for a, b in zip(words, words[1:], strict=False)
    ]  # fmt: skip
    task = ss.task_from_records(tokenizer, records, name="swap")
    report = ss.circuits(ss.load_model(model, tokenizer=tokenizer), task, tmp_path / "s")
    with torch.inference_mode():
        lds = []
        for ids in (task.clean, task.corrupted):
            last = reference(ids).logits[:, -1]
            rows = torch.arange(len(ids))
            lds.append(
                float((last[rows, task.answers[:, 0]] - last[rows, task.answers[:, 1]]).mean())
            )
    np.testing.assert_allclose(report.ld, lds, atol=1e-5)
    with ss.open_store(tmp_path / "s") as db:
        run = db.sql("SELECT run_id, config->>'task' AS task FROM runs").iloc[0]
        n = db.sql("SELECT count(*) FROM patching_scores").iloc[0, 0]
    assert (run["run_id"], run["task"]) == (report.run_id, "swap") and n == len(report.scores)


def test_no_folder_of_the_repository_shadows_an_installed_module():
    """The sub-packages' folders sit at the repository root, which is on ``sys.path`` for
    ``python -m`` and notebooks started there: a folder named like a module that an installed
    distribution provides (``kernels``, a transformers dependency) would be imported instead."""
    from importlib.metadata import packages_distributions

    root = README.parent
    folders = {p.parent.name for p in root.glob("*/__init__.py")} - {"sparsescope"}
    assert {"probes", "store", "app", "sparse_kernels"} <= folders
    installed = packages_distributions()
    assert {f: installed[f] for f in folders if f in installed} == {}
    probe = "import transformers.integrations.hub_kernels, transformer_lens.model_bridge"
    result = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
