"""A user's own checkpoint series: ``series:GLOB`` folders (steps from names or
trainer_state.json, numeric order) and Hub revisions ``org/name@REV1,REV2``, probed through
the CLI; firing against plain Hugging Face forward hooks, the death timeline and the laws
against numpy on those firings; bad series get one-line errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from sparsescope.analysis.dead_neurons import checkpoint_runs, death_over_checkpoints
from sparsescope.analysis.zoo_laws import DATASET, ratio_over_training
from sparsescope.app.cli import app
from sparsescope.app.state import STORE_ENV
from sparsescope.probes.models import expand, load_model, locate, minilm_path
from sparsescope.store.reader import Reader

DASHBOARD = str(Path(__file__).parents[1] / "app" / "dashboard.py")
CONFIG = {"vocab_size": 30528, "hidden_size": 64, "intermediate_size": 128,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "num_hidden_layers": 2}  # fmt: skip
STEPS = [3, 20, 100]  # folder names sort as text 100 < 20 < 3
DEAD = {3: [0, 1], 20: [1, 2], 100: [2, 3]}  # layer-0 neurons with a zero gate row
TOKENS_AT_20 = 40_960  # num_input_tokens_seen of checkpoint-20's trainer_state.json
N_TOKENS = 256


def _checkpoint(folder: Path, seed: int, dead: list[int]) -> None:
    """A tiny random Llama (MiniLM's tokenizer); ``dead`` neurons of layer 0 never fire."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **CONFIG)).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[dead] = 0.0  # gate 0: SiLU(g) > 0 fails
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt"):  # fmt: skip
        shutil.copy(minilm_path() / name, folder / name)


def _hf_firing(folder: Path, tokens) -> np.ndarray:
    """bool [layer, token, neuron]: gate_proj output > 0 in the plain HF model."""
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    seen: dict[int, list] = {0: [], 1: []}
    for layer, keep in seen.items():
        hf.model.layers[layer].mlp.gate_proj.register_forward_hook(
            lambda m, i, o, keep=keep: keep.append(o.flatten(0, -2) > 0)
        )
    with torch.inference_mode():
        for _, seq in tokens.groupby("seq_id", sort=True):
            hf(input_ids=torch.tensor(seq["token_id"].to_numpy())[None])
    return np.stack([torch.cat(seen[layer]).numpy() for layer in sorted(seen)])


def _invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0 and result.exception is None, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Three checkpoints of 'my-run' probed through the CLI on the laws' held-out split."""
    root = tmp_path_factory.mktemp("ckpts") / "my-run"
    folders = {step: root / f"checkpoint-{step}" for step in STEPS}
    for step, folder in folders.items():
        _checkpoint(folder, step, DEAD[step])
    state = {"global_step": 20, "num_input_tokens_seen": TOKENS_AT_20, "log_history": []}
    (folders[20] / "trainer_state.json").write_text(json.dumps(state))
    (root / "runs").mkdir()  # a Trainer's log folder: the glob below does not match it
    pattern = f"series:{root}/checkpoint-*"
    store = root.parent / "store"
    _invoke("probe", "--model", pattern, "--data", DATASET, "--store", str(store),
            "--max-tokens", str(N_TOKENS), "--seq-len", "32", "--batch-size", "8")  # fmt: skip
    reader = Reader(store)
    runs = reader.sql("SELECT run_id, model_id FROM runs WHERE kind = 'probe' ORDER BY started_at")
    firing = {}
    for run_id, step in zip(runs["run_id"], STEPS, strict=True):
        tokens = reader.sql(
            "SELECT seq_id, token_id FROM tokens WHERE run_id = ? ORDER BY seq_id, pos", [run_id]
        )
        firing[step] = _hf_firing(folders[step], tokens)
    return SimpleNamespace(pattern=pattern, store=store, folders=folders, runs=runs, fire=firing)


def test_series_rows_follow_the_steps(series):
    assert series.runs["model_id"].tolist() == [f"{series.pattern}@{s}" for s in STEPS]
    models = Reader(series.store).sql("SELECT * FROM models ORDER BY step")
    assert models["model_id"].tolist() == series.runs["model_id"].tolist()
    assert models["family"].unique().tolist() == ["my-run"]
    assert models["source"].unique().tolist() == ["local"]
    assert models["step"].tolist() == STEPS
    assert models["tokens_seen"].isna().tolist() == [True, False, True]
    assert models["tokens_seen"][1] == TOKENS_AT_20
    assert models["path"].tolist() == [str(series.folders[s].resolve()) for s in STEPS]


def test_n_active_equals_plain_hf_hooks(series):
    reader = Reader(series.store)
    for run_id, step in zip(series.runs["run_id"], STEPS, strict=True):
        fire = series.fire[step]  # [layer, token, neuron]
        assert fire.shape == (2, N_TOKENS, 128)
        stats = reader.sql(
            "SELECT layer, n_active FROM layer_token_stats WHERE run_id = ?"
            " ORDER BY layer, seq_id, pos",
            [run_id],
        )
        neurons = reader.sql(
            "SELECT n_active FROM neuron_stats WHERE run_id = ? ORDER BY layer, neuron", [run_id]
        )
        np.testing.assert_array_equal(stats["n_active"], fire.sum(2).ravel(), err_msg=str(step))
        np.testing.assert_array_equal(neurons["n_active"], fire.sum(1).ravel(), err_msg=str(step))


def test_death_timeline_and_laws_ratios_see_the_series(series):
    reader = Reader(series.store)
    ckpts = checkpoint_runs(reader, series.runs["run_id"][1])
    assert ckpts["run_id"].tolist() == series.runs["run_id"].tolist()
    assert ckpts["step"].tolist() == STEPS
    dead = np.stack([series.fire[s].sum(1) == 0 for s in STEPS])  # [K, L, D], from HF
    planted = [set(np.flatnonzero(dead[k, 0])) for k in range(3)]
    assert planted == [set(DEAD[s]) for s in STEPS] and not dead[:, 1].any()
    result = death_over_checkpoints(reader, ckpts["run_id"].tolist())
    per = result.checkpoints.set_index(["checkpoint", "layer"])
    np.testing.assert_array_equal(per["dead"].to_numpy(), dead.sum(2).ravel())
    neurons = result.neurons.set_index(["layer", "neuron"])
    for neuron in range(4):  # METHODS §3 by hand: dead at every later checkpoint; revivals
        history = dead[:, 0, neuron]
        death = next((k for k in range(3) if history[k:].all()), -1)
        assert neurons.loc[(0, neuron), "death_checkpoint"] == death
        assert neurons.loc[(0, neuron), "revivals"] == (history[:-1] & ~history[1:]).sum()
    assert neurons["death_checkpoint"].tolist().count(-1) == 2 * 128 - 2  # 2 and 3 die
    ratios = ratio_over_training(reader).query("model == 'my-run'")
    assert ratios["step"].tolist() == [s for s in STEPS for _ in range(2)]
    expected = [series.fire[s][layer].mean() for s in STEPS for layer in range(2)]
    np.testing.assert_allclose(ratios["activation_ratio"], expected, rtol=1e-12)


def test_laws_over_the_series_and_the_pages(series, monkeypatch):
    out = _invoke("laws", "--store", str(series.store), "--model", series.pattern,
                  "--tokens", str(N_TOKENS), "--ppl-tokens", str(N_TOKENS)).output  # fmt: skip
    assert "2 of 3 checkpoints of my-run record no tokens seen" in out.replace("\n", " ")
    reader = Reader(series.store)
    runs = reader.sql("SELECT kind, model_id, name FROM runs ORDER BY started_at")
    assert runs["kind"].tolist() == ["probe"] * 3 + ["thresholds", "laws"]  # probes reused
    assert runs["model_id"][3] == f"{series.pattern}@100"  # the last step, not the last name
    assert runs["name"][4] == "laws-my-run"
    fits = reader.sql("SELECT * FROM law_fits")
    assert set(fits["model"]) == {"my-run"}
    assert fits.loc[fits["layer"] == -1, "n_points"].tolist() == [1, 1]  # checkpoint-20 only
    assert fits["r2"].isna().all()  # one point fits no law

    monkeypatch.setenv(STORE_ENV, str(series.store))
    at = AppTest.from_file(DASHBOARD, default_timeout=120).run()
    at.switch_page("views/sparsity_laws.py").run()
    assert not at.exception, at.exception
    assert any("no tokens seen (my-run)" in c.value for c in at.caption)
    assert any("2 of 2 fits are degenerate and hidden" in c.value for c in at.caption)
    assert at.dataframe[0].value.empty  # one point each: both fits hidden
    at.checkbox[0].check().run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert len(table) == 2 and table["degenerate"].str.contains("too few points").all()
    ratio_figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert [t["mode"] for t in ratio_figure["data"]] == ["markers"]  # no fitted curve to draw
    at.switch_page("views/dead_neurons.py").run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Dead for good by the last checkpoint"] == "2"
    assert metrics["Revived neurons (dead, then firing later)"] == "2"  # neurons 0 and 1


def test_steps_from_names_and_trainer_state(tmp_path):
    names = {"global_step7": None, "step_12": None, "step1200": None, "run-5": None,
             "final": {"global_step": 500, "num_input_tokens_seen": 1_024_000},
             "checkpoint-0": {"global_step": 0, "num_input_tokens_seen": 0},
             "stage1-step140000-tokens294B": None}  # fmt: skip
    for name, state in names.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        if state is not None:
            (tmp_path / name / "trainer_state.json").write_text(json.dumps(state))
    (tmp_path / "notes.txt").write_text("not matched by the pattern")
    pattern = f"series:{tmp_path}/*[!t]"  # not notes.txt
    steps = [0, 5, 7, 12, 500, 1200, 140000]
    assert expand(pattern) == [f"{pattern}@{s}" for s in steps]
    tokens = [locate(f"{pattern}@{s}")[1]["tokens_seen"] for s in steps]
    assert tokens == [None, None, None, None, 1_024_000, None, 294 * 10**9]
    assert locate(f"{pattern}@500")[0] == str((tmp_path / "final").resolve())
    assert locate(f"{pattern}@5")[1]["family"] == tmp_path.name
    hub = "EleutherAI/pythia-70m@step3000,step1000,step143000"
    assert expand(hub) == [f"EleutherAI/pythia-70m@step{s}" for s in (1000, 3000, 143000)]
    where, extra = locate("EleutherAI/pythia-70m@step3000")
    assert where == "EleutherAI/pythia-70m"
    assert extra == {"source": "hub", "family": "pythia-70m", "step": 3000,
                     "tokens_seen": None, "revision": "step3000"}  # fmt: skip
    assert locate("org/m@v1.0")[1]["step"] is None  # a revision's step needs step<N>
    assert expand("org/m@main") == ["org/m@main"]


def test_hub_revisions_reach_the_bridge_and_hf(series, monkeypatch, tmp_path):
    """``org/name@REV`` boots the bridge with revision=REV (a fake boot loads a local
    checkpoint instead of the Hub), and the real boot hands it to HF's from_pretrained."""
    from transformer_lens.model_bridge import TransformerBridge

    real, calls = TransformerBridge.boot_transformers, []

    def boot(name, **kwargs):
        calls.append((name, kwargs.pop("revision")))
        return real(str(series.folders[20]), **kwargs)

    monkeypatch.setattr(TransformerBridge, "boot_transformers", staticmethod(boot))
    store = tmp_path / "s"
    _invoke("probe", "--model", "my-org/tiny@step20-tokens4M,step3", "--store", str(store),
            "--max-tokens", "32", "--seq-len", "16", "--batch-size", "2")  # fmt: skip
    assert calls == [("my-org/tiny", "step3"), ("my-org/tiny", "step20-tokens4M")]
    models = Reader(store).sql("SELECT * FROM models ORDER BY step")
    assert models["model_id"].tolist() == ["my-org/tiny@step3", "my-org/tiny@step20-tokens4M"]
    assert models["step"].tolist() == [3, 20] and set(models["family"]) == {"tiny"}
    assert models["tokens_seen"][1] == 4 * 10**6 and set(models["source"]) == {"hub"}
    runs = Reader(store).sql("SELECT run_id FROM runs ORDER BY started_at")["run_id"].tolist()
    assert checkpoint_runs(Reader(store), runs[0])["run_id"].tolist() == runs  # one series
    monkeypatch.setattr(TransformerBridge, "boot_transformers", real)

    seen = {}

    def from_pretrained(name, **kwargs):
        seen.update(kwargs, name=name)
        raise OSError("offline in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(AutoConfig, "from_pretrained", from_pretrained)
    with pytest.raises(Exception, match="offline in this test"):
        load_model("my-org/tiny@step3000")
    assert seen["name"] == "my-org/tiny" and seen["revision"] == "step3000"


def _cli_error(monkeypatch, capsys, *args: str) -> str:
    """Run ``sparsescope`` in-process (its real main); returns the one error line."""
    from sparsescope.app import cli

    monkeypatch.setattr(sys, "argv", ["sparsescope", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def _folders(root: Path, *names: str, config: bool = True) -> None:
    for name in names:
        (root / name).mkdir(parents=True)
        if config:
            (root / name / "config.json").write_text("{}")


@pytest.mark.parametrize(
    "case, needle",
    [
        ("nothing", "matches no folder"),
        ("no-config", "checkpoint-2 (matched by series:"),
        ("no-step", "cannot read the step of checkpoint"),
        ("bad-state", "trainer_state.json is not readable JSON"),
        ("same-step", "are both at step 5"),
        ("missing-step", "has no checkpoint at step 7: steps are 1"),
        ("hub-no-step", "revision 'main' of the series"),
        ("laws-single", "is not a checkpoint series"),
        ("laws-both", "not both"),
    ],
)
def test_bad_series_one_line_exit_2(tmp_path, monkeypatch, capsys, case, needle):
    store = tmp_path / "store"
    spec = f"series:{tmp_path}/{case}/*"
    if case == "no-config":
        _folders(tmp_path / case, "checkpoint-1")
        _folders(tmp_path / case, "checkpoint-2", config=False)
    elif case == "no-step":
        _folders(tmp_path / case, "checkpoint-1", "final")
    elif case == "bad-state":
        _folders(tmp_path / case, "checkpoint-5")
        (tmp_path / case / "checkpoint-5" / "trainer_state.json").write_text("{")
    elif case == "same-step":
        _folders(tmp_path / case, "checkpoint-5", "step_5")
    elif case == "missing-step":
        _folders(tmp_path / case, "checkpoint-1")
        spec += "@7"
    elif case == "hub-no-step":
        spec = "my-org/tiny@step10,main"
    args = ["probe", "--model", spec, "--store", str(store)]
    if case.startswith("laws"):
        args = ["laws", "--store", str(store), "--model", "minilm"]
        args += ["--preset", "micro"] if case == "laws-both" else []
    assert needle in _cli_error(monkeypatch, capsys, *args)
    assert not store.exists()
