"""The sparsity-laws pipeline on the micro zoo (``analyze_zoo``), against plain HF forwards:
activation ratios per checkpoint, the law fits' R², PPL-p% perplexities, the dashboard page."""

from __future__ import annotations

import math
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


def test_sparsity_laws_page_draws_the_fits(laws_store, monkeypatch):
    monkeypatch.setenv(STORE_ENV, str(laws_store[0]))
    at = AppTest.from_file(DASHBOARD, default_timeout=120).run()
    at.switch_page("views/sparsity_laws.py").run()
    assert not at.exception, at.exception
    assert not at.info, [i.value for i in at.info]
    assert len(at.get("plotly_chart")) >= 3  # ratios with fits, residuals, and more
    # residual RMS agrees with R² (SS_res = (1 − R²)·SS_tot over the fitted points)
    ratios = ratio_over_training(Reader(laws_store[0]))
    mean = ratios.groupby(["model", "tokens_seen"])["activation_ratio"].mean().reset_index()
    table = at.dataframe[0].value
    for row in table[table["r2"].notna()].itertuples():
        a = mean[(mean["model"] == row.model) & (mean["tokens_seen"] > 0)]["activation_ratio"]
        ss_tot = ((a - a.mean()) ** 2).sum()
        assert row.rms_residual**2 * len(a) == pytest.approx((1 - row.r2) * ss_tot, rel=1e-3)
