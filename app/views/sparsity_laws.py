"""Sparsity laws: activation ratio over training with fitted laws and their residuals, PPL-p%,
CETT, CLS, width/depth. The Models, Layer and degenerate-fit controls apply to everything."""

import numpy as np
import pandas as pd
import streamlit as st

from sparsescope.analysis.chunks import cls_curve
from sparsescope.analysis.laws import MIN_R2, evaluate, is_degenerate
from sparsescope.analysis.zoo_laws import ratio_over_training
from sparsescope.app import charts_laws as charts
from sparsescope.app.state import demo_note, empty_hint, reader

MEAN = "mean over layers"
# per family, the thresholds run (PPL-p% and CETT curves) of its last checkpoint
FINAL_THRESHOLDS = (
    "WITH pick AS (SELECT m.family AS model, r.run_id FROM runs r JOIN models m USING (model_id)"
    " WHERE r.kind = 'thresholds' AND r.status = 'complete' QUALIFY row_number() OVER"
    " (PARTITION BY m.family ORDER BY m.step DESC NULLS LAST, r.finished_at DESC) = 1) "
)
DEGENERATE_RULE = (
    "A fit is degenerate when it has fewer than two points more than parameters, did not "
    f"converge, has R² < {MIN_R2:g}, or has a parameter at a bound of its search range."
)

st.title("Sparsity laws")
r = reader()
ratios = ratio_over_training(r)
if ratios.empty:
    if not demo_note("Sparsity laws"):
        empty_hint(
            "No checkpoint series probed yet. `sparsescope laws` trains the tiny zoo (cached), "
            "probes every checkpoint on the held-out split and fits the laws; "
            "`--model 'series:GLOB'` does the same for your own checkpoints:",
            "sparsescope laws --store {store}",
        )
    st.stop()
if no_tokens := sorted(ratios.loc[ratios["tokens_seen"].isna(), "model"].unique()):
    st.caption(f"Not drawn: checkpoints that record no tokens seen ({', '.join(no_tokens)}).")
    ratios = ratios[ratios["tokens_seen"].notna()]
fits = r.sql(  # per model, the fits of the newest laws run that fitted it
    "SELECT f.* FROM law_fits f JOIN runs r USING (run_id)"
    " WHERE r.kind = 'laws' AND r.status = 'complete'"
    " QUALIFY r.finished_at = max(r.finished_at) OVER (PARTITION BY f.model)"
)
fits["degenerate"] = [is_degenerate(row) for _, row in fits.iterrows()]
thresholds = r.sql(
    FINAL_THRESHOLDS + "SELECT pick.model, t.p, t.layer, t.activation_ratio, t.cett,"
    " t.ppl / t.ppl_dense AS ppl_ratio FROM thresholds t JOIN pick USING (run_id)"
    " WHERE t.method = 'ppl-p'"
)
cett = r.sql(
    FINAL_THRESHOLDS + "SELECT pick.model, c.layer, c.threshold, c.cett, c.activation_ratio"
    " FROM cett_curves c JOIN pick USING (run_id) ORDER BY model, layer, threshold"
)
finals = r.sql(
    "SELECT r.run_id, m.family AS model FROM runs r JOIN models m USING (model_id)"
    " WHERE r.kind = 'probe' AND r.status = 'complete' AND m.step IS NOT NULL"
    " QUALIFY row_number() OVER (PARTITION BY m.family ORDER BY m.step DESC,"
    " r.finished_at DESC) = 1"
)

models = sorted(ratios["model"].unique())
colors = charts.model_colors(models)
chosen = st.multiselect("Models", models, default=models)
c1, c2 = st.columns(2)
layer = c1.selectbox("Layer", [MEAN, *sorted(ratios["layer"].unique().tolist())])
show_degenerate = c2.checkbox("Show degenerate fits", help=DEGENERATE_RULE)
if not chosen:
    st.warning("Pick at least one model.")
    st.stop()
layer_id = -1 if layer == MEAN else int(layer)


def _at_layer(df: pd.DataFrame, keys: list[str], values: list[str]) -> pd.DataFrame:
    """Rows of the chosen models at the chosen layer, or their means over layers."""
    df = df[df["model"].isin(chosen)]
    if layer == MEAN:
        return df.groupby(keys, as_index=False)[values].mean()
    return df[df["layer"] == layer_id]


st.subheader("Activation ratio over training")
points = _at_layer(ratios, ["model", "act_fn", "step", "tokens_seen"], ["activation_ratio"])
points = points.assign(tokens=points["tokens_seen"].clip(lower=1))
here = fits[(fits["layer"] == layer_id) & fits["model"].isin(chosen)]
n_degenerate = int((here["degenerate"] != "").sum())
if show_degenerate:
    listed = here
    drawn = here[here["a0"].notna()]  # every form has A0: missing when no start converged
else:
    listed = drawn = here[here["degenerate"] == ""]
st.plotly_chart(charts.ratio_figure(points, drawn, colors), width="stretch")
st.caption(
    "Activation ratio: the mean over tokens of the share of the MLP's neurons that fire "
    "(METHODS.md §1). Laws over training (METHODS.md §2), D = tokens seen (in millions in the "
    "fits): solid, the decreasing log-space power law A(D) = exp(−c·D^α + b) + A0 (ReLU-like); "
    "dotted, the increasing convergent power law A(D) = −c·D^(−α) + A0 (SiLU/GELU-like). Both "
    "are fitted on every model. " + DEGENERATE_RULE
)
if here.empty:
    st.caption("No law fits of these models yet: `sparsescope laws` fits them.")
elif show_degenerate:
    st.caption(
        f"{n_degenerate} of {len(here)} fits are degenerate: drawn dashed and faded "
        f"({len(here) - len(drawn)} with no fitted parameters cannot be drawn)."
    )
else:
    st.caption(
        f"{n_degenerate} of {len(here)} fits are degenerate and hidden: tick "
        "'Show degenerate fits' to draw them."
    )

residuals = []
for key, fit in drawn.iterrows():
    seen = points[(points["model"] == fit["model"]) & (points["tokens_seen"] > 0)]
    fitted = evaluate(fit, seen["tokens_seen"])
    residuals.append(seen.assign(fit=key, residual=seen["activation_ratio"] - fitted))
rms = pd.Series(dtype=float)
if residuals:
    res = pd.concat(residuals)
    st.plotly_chart(charts.residual_figure(res, drawn, colors), width="stretch")
    st.caption(
        "Residuals: observed minus fitted activation ratio at each checkpoint the law was "
        "fitted on (step 0, D = 0, is left out); the table gives their root mean square."
    )
    rms = res.groupby("fit")["residual"].apply(lambda x: float(np.sqrt((x**2).mean())))
table = listed.assign(rms_residual=listed.index.map(rms)).sort_values(["model", "form"])
columns = ["model", "form", "r2", "a0", "c", "alpha", "b", "rms_residual", "n_points",
           "degenerate", "act_fn", "n_layers", "d_model", "d_mlp"]  # fmt: skip
st.dataframe(
    table[columns],
    hide_index=True,
    width="stretch",
    column_config={
        "r2": st.column_config.NumberColumn("R²", format="%.4f"),
        **{c: st.column_config.NumberColumn(c, format="%.4g") for c in ["a0", "c", "alpha", "b"]},
        "rms_residual": st.column_config.NumberColumn("RMS residual", format="%.3g"),
    },
)

st.subheader("PPL-p% activation ratio (final checkpoints)")
ppl = _at_layer(thresholds, ["model", "p"], ["activation_ratio", "cett", "ppl_ratio"])
if ppl.empty:
    st.info("No PPL-p% thresholds for these models yet (`sparsescope laws` computes them).")
else:
    fig = charts.model_lines(
        ppl.sort_values(["model", "p"]), "p", "activation_ratio", colors,
        hover_data=["ppl_ratio", "cett"],
        labels={"p": "p (% perplexity increase)", "activation_ratio": "CETT-active ratio"},
    )  # fmt: skip
    st.plotly_chart(fig, width="stretch")
    st.caption(
        "PPL-p% (METHODS.md §2): one global CETT target c is searched so that zeroing every "
        "neuron that is not CETT-active raises the held-out perplexity to (1 + p/100) × the "
        "dense perplexity; the chart shows the share of neurons still active at those "
        "per-layer thresholds (hover: the perplexity ratio reached and c)."
    )

st.subheader("CETT against activation ratio (final checkpoints)")
ranked = cett.assign(q=cett.groupby(["model", "layer"]).cumcount())  # the threshold's quantile
curve = _at_layer(ranked, ["model", "q"], ["cett", "activation_ratio"])
if not curve.empty:
    fig = charts.model_lines(
        curve.sort_values(["model", "q"]), "cett", "activation_ratio", colors,
        labels={"cett": "CETT", "activation_ratio": "CETT-active ratio"},
    )  # fmt: skip
    st.plotly_chart(fig, width="stretch")
    st.caption(
        "CETT, the cumulative error of tail truncation (METHODS.md §2), of a layer at threshold "
        "t: with norm_i = |a_i|·‖W_out[:, i]‖₂, the mean over tokens of "
        "‖Σ_{norm_i ≤ t} a_i W_out[:, i]‖₂ / ‖Σ_i a_i W_out[:, i]‖₂, the relative error of the "
        "MLP's output when the neurons at or below t are dropped; a neuron is CETT-active when "
        "norm_i > t. One point per threshold (quantiles 0 to 0.99 of norm_i)."
    )


@st.cache_data(show_spinner="Computing CLS from stored codes")
def _cls(run_id: str):
    return cls_curve(r, run_id)


st.subheader("Chunk-level sparsity (final checkpoints)")
finals = finals[finals["model"].isin(chosen)]
if not finals.empty:
    curves = pd.concat([_cls(row.run_id).assign(model=row.model) for row in finals.itertuples()])
    cls = _at_layer(curves, ["model", "chunk"], ["cls"])
    fig = charts.model_lines(
        cls.sort_values(["model", "chunk"]), "chunk", "cls", colors, log_x=True,
        labels={"chunk": "chunk size c (tokens)", "cls": "CLS"},
    )  # fmt: skip
    st.plotly_chart(fig, width="stretch")
    st.caption(
        "CLS, chunk-level sparsity (METHODS.md §2), at chunk size c: the share of neurons "
        "inactive for all c consecutive tokens, 1 − |∪ active(t)| / d_mlp, averaged over "
        "chunks; CLS(1) is the token-level sparsity and CLS never increases with c."
    )

st.subheader("Width / depth")
best = listed[listed["a0"].notna()].sort_values("r2", ascending=False).drop_duplicates("model")
if best.empty:
    hidden = "" if show_degenerate else " (degenerate fits are hidden)"
    st.caption(f"No fitted limit A0 to compare here{hidden}.")
else:
    st.plotly_chart(charts.width_depth_bars(best, colors), width="stretch")
    st.caption(
        "The limit A0 (the activation ratio the law tends to as D grows) of each model's best "
        "fit (highest R²) by shape; METHODS.md §2 asks how A0 moves with the width/depth ratio."
    )
