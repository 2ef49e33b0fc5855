"""The model zoo on its ``micro`` preset: tokenizer, training, checkpoints, cache, specs."""

from __future__ import annotations

import dataclasses
import json
from itertools import repeat
from pathlib import Path

import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from sparsescope.app.zoo_cli import zoo_app
from sparsescope.probes.data import stdlib_docs
from sparsescope.probes.tokenizer import EOT, train_tokenizer
from sparsescope.probes.zoo import (
    ACT_FNS,
    MIXERS,
    PRESETS,
    Mixer,
    ZooError,
    list_zoo,
    resolve,
    train_zoo,
)

MICRO = PRESETS["micro"]
FIELDS = {"name", "act_fn", "n_layers", "d_model", "d_mlp", "n_params", "step", "tokens_seen"}
FIELDS |= {"train_loss", "val_loss", "path"}


@pytest.fixture(scope="module")
def zoo(micro_zoo):
    """The micro zoo, with SPARSESCOPE_ZOO pointing at it."""
    root, rows = micro_zoo
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSESCOPE_ZOO", str(root))
        yield root / "micro", rows


def _final(rows: list[dict], act_fn: str) -> dict:
    return [row for row in rows if row["act_fn"] == act_fn][-1]


def test_tokenizer_deterministic_and_round_trips():
    docs = [doc for doc, _ in zip(stdlib_docs("train"), range(300), strict=False)]
    a, b = (train_tokenizer(docs, 512, 64) for _ in range(2))
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    text = "Return the value of x.\n\n    >>> f(1)  # naïve ünïcode → ok"
    assert a.decode(a.encode(text, add_special_tokens=False)) == text
    assert a.bos_token == a.eos_token == EOT and a.convert_tokens_to_ids(EOT) == 0


def test_manifest(zoo):
    out, rows = zoo
    assert rows == list_zoo(preset="micro")
    assert json.loads((out / "zoo.json").read_text())["preset"] == "micro"
    assert {row["act_fn"] for row in rows} == set(ACT_FNS)
    for spec in MICRO.models:
        ckpts = [row for row in rows if row["name"] == spec.name]
        assert all(FIELDS <= row.keys() and Path(row["path"]).is_dir() for row in ckpts)
        assert ckpts[0]["step"] == 0 and ckpts[-1]["step"] == MICRO.steps
        seen = [row["tokens_seen"] for row in ckpts]
        assert seen == sorted(set(seen))
        assert ckpts[-1]["val_loss"] < ckpts[0]["val_loss"]


def test_training_is_reproducible(zoo, tmp_path):
    _, rows = zoo
    name = MICRO.models[0].name
    again = train_zoo("micro", out=tmp_path, only=name)
    first = [row["val_loss"] for row in rows if row["name"] == name]
    assert [row["name"] for row in again] == [name] * len(first)
    assert [row["val_loss"] for row in again] == pytest.approx(first, abs=1e-6)


def _mlp_out_proj(model, act_fn: str) -> torch.nn.Module:
    if act_fn == "swiglu":
        return model.model.layers[0].mlp.down_proj
    return model.transformer.h[0].mlp.c_proj


@pytest.mark.parametrize("act_fn", ACT_FNS)
def test_checkpoint_loads_with_bridge_and_hf(zoo, act_fn):
    row = _final(zoo[1], act_fn)
    tokenizer = AutoTokenizer.from_pretrained(row["path"])
    hf = AutoModelForCausalLM.from_pretrained(row["path"]).eval()
    bridge = TransformerBridge.boot_transformers(row["path"], device="cpu")
    assert (bridge.cfg.n_layers, bridge.cfg.d_mlp) == (row["n_layers"], row["d_mlp"])
    ids = tokenizer(EOT + "Return the sum of the two arguments.", return_tensors="pt").input_ids
    seen = {}
    hook = _mlp_out_proj(hf, act_fn).register_forward_pre_hook(
        lambda module, args: seen.setdefault("post", args[0])
    )
    with torch.no_grad():
        hf_logits = hf(ids).logits
        bridge_logits, cache = bridge.run_with_cache(ids, names_filter="blocks.0.mlp.hook_post")
    hook.remove()
    torch.testing.assert_close(bridge_logits, hf_logits, atol=1e-4, rtol=1e-4)
    post = cache["blocks.0.mlp.hook_post"]
    assert post.shape == (1, ids.shape[1], row["d_mlp"])
    torch.testing.assert_close(post, seen["post"], atol=1e-5, rtol=1e-5)


def test_second_train_reuses_finished_models(zoo):
    out, rows = zoo
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/model.json")}
    assert len(stamps) == len(MICRO.models)
    assert train_zoo("micro") == rows
    assert train_zoo("micro", only=MICRO.models[1].name) == rows
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/model.json")} == stamps


def test_resolve(zoo):
    rows = zoo[1]
    name = MICRO.models[0].name
    mine = [row for row in rows if row["name"] == name]
    assert resolve(f"zoo:{name}") == mine[-1:]
    assert resolve(f"zoo:{name}@0") == mine[:1]
    assert resolve(f"zoo:{name}@all") == mine


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("relu", "bad zoo spec 'relu': use zoo:NAME"),
        ("zoo:relu-l2-d32@x", "bad zoo spec"),
        ("zoo:nope", "unknown zoo model 'nope': trained models are gelu-l2-d32"),
        ("zoo:relu-l2-d32@99", "has no checkpoint at step 99: steps are 0, 1"),
        ("zoo:relu-l4-d128", "is not trained yet: run `sparsescope zoo train --only relu-l4-d128`"),
    ],
)
def test_resolve_bad_specs(zoo, spec, message):
    with pytest.raises(ZooError, match=message) as err:
        resolve(spec)
    assert "\n" not in str(err.value)


def test_untrained_zoo_says_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSESCOPE_ZOO", str(tmp_path))
    with pytest.raises(
        ZooError, match="no trained zoo under .*: run `sparsescope zoo train` first"
    ):
        resolve("zoo:nope")
    with pytest.raises(
        ZooError, match="run `sparsescope zoo train --preset micro --only relu-l2-d32`"
    ):
        resolve("zoo:relu-l2-d32")
    result = CliRunner().invoke(zoo_app, ["list"])
    assert result.exit_code == 2
    assert "run `sparsescope zoo train` first" in result.output


def test_cli_list(zoo):
    out, rows = zoo
    runner = CliRunner()
    result = runner.invoke(zoo_app, ["list", "--out", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == rows
    result = runner.invoke(zoo_app, ["list", "--preset", "micro"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert all(spec.name in result.output for spec in MICRO.models)
    result = runner.invoke(zoo_app, ["train", "--preset", "huge"])
    assert result.exit_code == 2 and "unknown zoo preset 'huge'" in result.output


def test_early_stopping_keeps_only_the_best_selected_step(tmp_path, monkeypatch):
    scores = iter([0.0, 0.0, 0.5, 0.9, 0.9])  # metrics calls at steps 0, 1, then 2, 4, 6
    metrics = lambda model, tok: {"score": next(scores)}  # noqa: E731
    monkeypatch.setitem(MIXERS, "scripted", Mixer(lambda seed: repeat("Ann met Bo."), metrics))
    preset = dataclasses.replace(
        MICRO, name="select", models=MICRO.models[:1], mix="scripted", mix_share=0.1,
        select="score", select_every=2, select_from=2,
    )  # fmt: skip
    monkeypatch.setitem(PRESETS, "select", preset)
    rows = train_zoo("select", out=tmp_path)
    assert [row["step"] for row in rows] == [0, 1, 4]  # 4 is the first of the best, 2 and 6 lose
    assert rows[-1]["score"] == 0.9
    folder = tmp_path / MICRO.models[0].name
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-0", "step-1", "step-4"]
    args = ["list", "--preset", "select", "--out", str(tmp_path)]
    table = CliRunner().invoke(zoo_app, args, env={"COLUMNS": "250"}).output
    header, values = (line for line in table.splitlines() if "score" in line or "0.900" in line)
    assert header.split("┃")[-2].strip() == "score" and values.split("│")[-2].strip() == "0.900"
    assert values.split("│")[8].strip() == "4"  # the final (selected) step
