"""The sparsity-laws pipeline on the micro zoo (``analyze_zoo``), against plain HF forwards:
activation ratios per checkpoint, the law fits' R², PPL-p% perplexities, the dashboard page."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest
from transformers import AutoModelForCausalLM

from sparsescope.analysis import laws
from sparsescope.analysis.zoo_laws import analyze_zoo, heldout_batches, ratio_over_training
from sparsescope.app.state import STORE_ENV
from sparsescope.probes.models import load_model
from sparsescope.store.reader import Reader

pytestmark = pytest.mark.slow  # trains the micro zoo and runs the laws pipeline

DASHBOARD = str(Path(__file__).parents[1] / "app" / "dashboard.py")


@pytest.fixture(scope="module")
def laws_store(micro_zoo, tmp_path_factory):
    root, rows = micro_zoo
    store = tmp_path_factory.mktemp("laws") / "s"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSESCOPE_ZOO", str(root))
        fits = analyze_zoo(store, "micro", tokens=512, ppl_tokens=512)
        yield store, rows, fits


def _down_proj(hf, layer: int) -> torch.nn.Module:
    """The MLP's output projection (its input is the hidden activation a)."""
    if hasattr(hf, "transformer"):
        return hf.transformer.h[layer].mlp.c_proj  # GPT-2 Conv1D, weight [d_mlp, d_model]
    return hf.model.layers[layer].mlp.down_proj  # Llama Linear, weight [d_model, d_mlp]


def _firing_module(hf, layer: int) -> torch.nn.Module:
    """Its output's sign is the firing indicator: the activation, or for SwiGLU the gate's."""
    if hasattr(hf, "transformer"):
        return hf.transformer.h[layer].mlp.act
    return hf.model.layers[layer].mlp.act_fn


def _hf_ratios(row: dict, tokens) -> list[float]:
    """Per-layer activation ratio of the stored tokens re-run through plain HF."""
    hf = AutoModelForCausalLM.from_pretrained(row["path"]).eval()
    fired: dict[int, list[torch.Tensor]] = {}
    hooks = [
        _firing_module(hf, i).register_forward_hook(
            lambda m, args, out, i=i: fired.setdefault(i, []).append((out > 0).float().mean(-1))
        )
        for i in range(row["n_layers"])
    ]
    with torch.no_grad():
        for _, seq in tokens.groupby("seq_id", sort=True):
            hf(torch.tensor(seq["token_id"].to_numpy())[None])
    for h in hooks:
        h.remove()
    return [float(torch.cat([f.flatten() for f in fired[i]]).mean()) for i in sorted(fired)]


def _loss(hf, batches, thresholds=None) -> float:
    """Mean next-token loss; with per-layer thresholds t_l, neurons with
    |a_i|·||W_out[:, i]|| ≤ t_l are zeroed by pre-hooks on the output projections."""
    hooks = []
    for layer, t in enumerate(thresholds or []):
        proj = _down_proj(hf, layer)
        w = proj.weight.detach()
        norms = w.norm(dim=1) if hasattr(hf, "transformer") else w.norm(dim=0)
        hooks.append(
            proj.register_forward_pre_hook(
                lambda m, args, n=norms, t=t: args[0] * ((args[0].abs() * n) > t)
            )
        )
    with torch.no_grad():
        out = [(float(hf(b, labels=b).loss), b[:, 1:].numel()) for b in batches]
    for h in hooks:
        h.remove()
    return sum(x * n for x, n in out) / sum(n for _, n in out)


def test_ratios_and_law_fits_equal_plain_hf(laws_store):
    store, rows, fits = laws_store
    reader = Reader(store)
    runs = reader.sql("SELECT run_id, model_id FROM runs WHERE kind = 'probe'")
    assert len(runs) == len(rows) == 28
    hf = {}
    for row in rows:
        run_id = runs.set_index("model_id").loc[f"zoo:{row['name']}@{row['step']}", "run_id"]
        tokens = reader.sql(
            "SELECT seq_id, pos, token_id FROM tokens WHERE run_id = ? ORDER BY seq_id, pos",
            [run_id],
        )
        assert len(tokens) == 512
        stored = reader.sql(
            "SELECT layer, avg(n_active) / any_value(m.d_mlp) AS r FROM layer_token_stats"
            " JOIN runs USING (run_id) JOIN models m USING (model_id) WHERE run_id = ?"
            " GROUP BY layer ORDER BY layer",
            [run_id],
        )["r"]
        ratios = _hf_ratios(row, tokens)
        np.testing.assert_allclose(stored, ratios, atol=2e-3)  # a bit may sit ~1e-7 from 0
        hf[(row["name"], row["step"])] = (row["tokens_seen"], float(np.mean(ratios)))
    stored_fits = reader.sql("SELECT * FROM law_fits")
    assert len(stored_fits) == len(fits) == 4 * 3 * 2  # 4 models × (2 layers + mean) × 2 forms
    for fit in stored_fits[stored_fits["layer"] == -1].itertuples():
        if math.isnan(fit.r2):
            continue
        d, a = np.array(sorted(v for (name, _), v in hf.items() if name == fit.model)).T
        d, a = d[d > 0] / laws.SCALE, a[d > 0]  # the fits leave step 0 (D = 0) out
        fn, names = laws.FORMS[fit.form][0], laws.FORMS[fit.form][1]
        assert fit.n_points == len(d)
        predicted = fn(d, *[getattr(fit, n) for n in names])
        r2 = 1 - ((a - predicted) ** 2).sum() / ((a - a.mean()) ** 2).sum()
        assert fit.r2 == pytest.approx(r2, abs=0.02), (fit.model, fit.form)


def test_ppl_p_thresholds_give_the_stored_perplexity_in_plain_hf(laws_store, micro_zoo):
    store, rows, _ = laws_store
    reader = Reader(store)
    finals = {row["name"]: row for row in rows}  # rows are in step order: the last wins
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSESCOPE_ZOO", str(micro_zoo[0]))
        for name, row in finals.items():
            spec = f"zoo:{name}@{row['step']}"
            got = reader.sql(
                "SELECT layer, threshold, ppl, ppl_dense FROM thresholds t JOIN runs r"
                " USING (run_id) WHERE r.model_id = ? AND t.p = 1 ORDER BY layer",
                [spec],
            )
            batches = heldout_batches(load_model(spec), 512)
            hf = AutoModelForCausalLM.from_pretrained(row["path"]).eval()
            ratio = math.exp(_loss(hf, batches, got["threshold"].tolist()) - _loss(hf, batches))
            assert ratio == pytest.approx(got["ppl"][0] / got["ppl_dense"][0], rel=1e-4), name


BOUNDS = {  # METHODS.md §2's two forms, with the search ranges of analysis/laws.py's docstring
    "decreasing": {"c": (0, 1e3), "alpha": (0.01, 3), "b": (-20, 5), "a0": (0, 1)},
    "increasing": {"c": (0, 1e3), "alpha": (0.01, 3), "a0": (0, 1)},
}


def _degenerate(fit) -> bool:
    """The rule, restated: < 2 points more than parameters, no fit, R² < 0.1, or a parameter
    within 1e-6 of its range's width from a bound."""
    bounds = BOUNDS[fit["form"]]
    if fit["n_points"] < len(bounds) + 2 or not fit["r2"] >= 0.1:  # NaN: no fit
        return True
    return any(min(abs(fit[n] - lo), abs(fit[n] - hi)) <= 1e-6 * (hi - lo)
               for n, (lo, hi) in bounds.items())  # fmt: skip


def _array(values) -> np.ndarray:
    """A plotly JSON array (a list, or base64 ``bdata`` of a dtype)."""
    if isinstance(values, dict):
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
    return np.asarray(values)


def _figures(at) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def _color(trace: dict) -> str:
    return (trace.get("line") or {}).get("color") or trace["marker"]["color"]


def test_sparsity_laws_page_draws_the_fits(laws_store, monkeypatch):
    monkeypatch.setenv(STORE_ENV, str(laws_store[0]))
    at = AppTest.from_file(DASHBOARD, default_timeout=120).run()
    at.switch_page("views/sparsity_laws.py").run()
    assert not at.exception, at.exception
    assert not at.info, [i.value for i in at.info]
    assert len(at.get("plotly_chart")) >= 3  # ratios with fits, PPL-p%, CETT, CLS
    captions = " ".join(c.value for c in at.caption)
    for needle in ("CETT, the cumulative error of tail truncation (METHODS.md §2)",
                   "PPL-p% (METHODS.md §2)", "CLS, chunk-level sparsity (METHODS.md §2)",
                   "Laws over training (METHODS.md §2)"):  # fmt: skip
        assert needle in captions, needle

    # degenerate fits: hidden unless asked for, counted, drawn dashed and faded when shown
    stored = Reader(laws_store[0]).sql("SELECT * FROM law_fits")
    stored["degenerate"] = [_degenerate(row) for _, row in stored.iterrows()]
    assert 0 < stored["degenerate"].sum() < len(stored)  # the micro zoo has both kinds
    for option, layer in [("mean over layers", -1), (0, 0), (1, 1)]:
        at.selectbox[0].set_value(option).run()
        here = stored[stored["layer"] == layer]
        for show in (False, True):
            at.checkbox[0].set_value(show).run()
            assert not at.exception, at.exception
            fits = [t for t in _figures(at)[0]["data"] if t["mode"] == "lines"]
            expected = here if show else here[~here["degenerate"]]
            assert len(fits) == expected["a0"].notna().sum(), (layer, show)
            marked = ["degenerate" in t["name"] for t in fits]
            assert sorted(marked) == sorted(expected.loc[expected["a0"].notna(), "degenerate"])
            assert all((t.get("opacity", 1) < 1) == m for t, m in zip(fits, marked, strict=True))
            n = here["degenerate"].sum()
            assert f"{n} of {len(here)} fits are degenerate" in " ".join(
                c.value for c in at.caption
            )
            assert len(at.dataframe[0].value) == len(expected)

    # one colour per model on every figure; each trace's legend group is its model
    at.selectbox[0].set_value(0).run()
    models = sorted(stored["model"].unique())
    colors = {}
    figures = _figures(at)
    assert len(figures) == 6  # ratios, residuals, PPL-p%, CETT, CLS, width/depth
    for figure in figures:
        assert {t["legendgroup"] for t in figure["data"]} == set(models)
        for trace in figure["data"]:
            assert colors.setdefault(trace["legendgroup"], _color(trace)) == _color(trace)
    assert len(set(colors.values())) == len(models)

    # the Models control drives every figure and the table
    at.multiselect[0].set_value(models[1:3]).run()
    assert not at.exception, at.exception
    for figure in _figures(at):
        assert {t["legendgroup"] for t in figure["data"]} == set(models[1:3])
        assert all(_color(t) == colors[t["legendgroup"]] for t in figure["data"])
    assert set(at.dataframe[0].value["model"]) == set(models[1:3])
    at.multiselect[0].set_value(models).run()

    # the Layer control drives every figure: PPL-p% ratios as stored for that layer
    ppl = Reader(laws_store[0]).sql(
        "SELECT m.family AS model, t.p, t.activation_ratio FROM thresholds t JOIN runs r"
        " USING (run_id) JOIN models m USING (model_id) WHERE t.layer = 1 ORDER BY p"
    )
    before = _figures(at)
    at.selectbox[0].set_value(1).run()
    after = _figures(at)
    for old, new in zip(before, after, strict=True):
        pairs = zip(old["data"], new["data"], strict=True)  # same traces, other values
        assert any(not np.allclose(_array(a["y"]), _array(b["y"])) for a, b in pairs)
    for trace in after[2]["data"]:
        want = ppl[ppl["model"] == trace["legendgroup"]]["activation_ratio"]
        np.testing.assert_allclose(_array(trace["y"]), want, rtol=1e-12)

    # every number in the table is formatted: short, no long runs of zeros (layer 0 has
    # c = 2e-8 and R² = 1e-16)
    for option in (0, "mean over layers"):
        at.selectbox[0].set_value(option).run()
        table = at.dataframe[0].value
        config = json.loads(at.dataframe[0].proto.columns)
        floats = [c for c in table.columns if table[c].dtype.kind == "f"]
        assert {"r2", "a0", "c", "alpha", "b", "rms_residual"} <= set(floats)
        for column in floats:
            fmt = config[column]["type_config"]["format"]
            cells = [fmt % v for v in table[column].dropna()]
            assert cells and all(len(c) <= 10 and not re.search(r"0\.0{5}", c) for c in cells)

    # residual RMS agrees with R² (SS_res = (1 − R²)·SS_tot over the fitted points)
    ratios = ratio_over_training(Reader(laws_store[0]))
    mean = ratios.groupby(["model", "tokens_seen"])["activation_ratio"].mean().reset_index()
    for row in table[table["r2"].notna()].itertuples():
        a = mean[(mean["model"] == row.model) & (mean["tokens_seen"] > 0)]["activation_ratio"]
        ss_tot = ((a - a.mean()) ** 2).sum()
        assert row.rms_residual**2 * len(a) == pytest.approx((1 - row.r2) * ss_tot, rel=1e-3)
