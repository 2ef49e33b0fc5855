"""Sparsity laws: activation ratio over training with fitted laws and their residuals, PPL-p%,
CLS, width/depth."""

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from sparsescope.analysis.chunks import cls_curve
from sparsescope.analysis.laws import FORMS, SCALE
from sparsescope.analysis.zoo_laws import ratio_over_training
from sparsescope.app.state import reader

st.title("Sparsity laws")
r = reader()
ratios = ratio_over_training(r)
if ratios.empty:
    st.info(
        "No checkpoint series probed yet. Run `sparsescope laws --store <store>` (or "
        "`make demo`): it trains the tiny zoo (cached), probes every checkpoint on the "
        "held-out split and fits the laws; `--model 'series:GLOB'` does the same for your "
        "own checkpoints."
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
models = sorted(ratios["model"].unique())
chosen = st.multiselect("Models", models, default=models)
layer_opts = ["mean over layers", *sorted(ratios["layer"].unique().tolist())]
layer = st.selectbox("Layer", layer_opts)
sel = ratios[ratios["model"].isin(chosen)]
if layer == "mean over layers":
    sel = sel.groupby(["model", "act_fn", "step", "tokens_seen"], as_index=False)[
        "activation_ratio"
    ].mean()
    layer_id = -1
else:
    sel = sel[sel["layer"] == layer]
    layer_id = int(layer)
sel = sel.assign(tokens=sel["tokens_seen"].clip(lower=1))

fig = go.Figure()
residuals = []
palette = px.colors.qualitative.Plotly
for i, (model, group) in enumerate(sel.groupby("model")):
    color = palette[i % len(palette)]
    fig.add_scatter(
        x=group["tokens"],
        y=group["activation_ratio"],
        mode="markers",
        name=model,
        marker_color=color,
        hovertemplate="%{x:,} tokens: %{y:.4f}",
    )
    grid = np.geomspace(max(group["tokens"].min(), 1e3), group["tokens"].max(), 100)
    model_fits = fits[(fits["model"] == model) & (fits["layer"] == layer_id)]
    for fit in model_fits.itertuples():
        if fit.r2 is None or np.isnan(fit.r2):
            continue
        fn, names, _ = FORMS[fit.form]
        params = [getattr(fit, n) for n in names]
        y = fn(grid / SCALE, *params)
        seen = group[group["tokens_seen"] > 0]  # the points the law was fitted on
        residuals.append(seen.assign(
            fit=f"{model} {fit.form}", form=fit.form, color=color,
            residual=seen["activation_ratio"] - fn(seen["tokens_seen"] / SCALE, *params),
        ))  # fmt: skip
        fig.add_scatter(
            x=grid,
            y=y,
            mode="lines",
            name=f"{model} {fit.form} (R² {fit.r2:.3f})",
            line={"color": color, "dash": "dash" if fit.form == "decreasing" else "dot"},
        )
fig.update_layout(
    title="Activation ratio (firing) vs tokens seen",
    xaxis_type="log",
    xaxis_title="tokens seen (step 0 drawn at 1)",
    yaxis_title="activation ratio",
)
st.plotly_chart(fig, width="stretch")
st.caption(
    "Dashed: decreasing form exp(−c·D^α + b) + A0; dotted: increasing form −c·D^(−α) + A0 "
    "(D in millions of tokens). Both are fitted on every model."
)
if residuals:
    res = pd.concat(residuals)
    res_fig = px.line(
        res, x="tokens_seen", y="residual", color="model", line_dash="form", markers=True,
        log_x=True, line_dash_map={"decreasing": "dash", "increasing": "dot"},
        color_discrete_map=dict(zip(res["model"], res["color"], strict=True)),
        labels={"tokens_seen": "tokens seen", "residual": "observed − fitted ratio"},
        title="Residuals of the fits (colours and dashes as above)",
    )  # fmt: skip
    res_fig.add_hline(y=0, line_color="grey")
    st.plotly_chart(res_fig, width="stretch")
    rms = res.groupby("fit")["residual"].apply(lambda r: float(np.sqrt((r**2).mean())))
else:
    rms = pd.Series(dtype=float)
shown = fits[(fits["layer"] == layer_id) & fits["model"].isin(chosen)]
st.dataframe(
    shown.assign(rms_residual=(shown["model"] + " " + shown["form"]).map(rms)).drop(
        columns=["run_id", "layer"]
    ),
    hide_index=True,
    width="stretch",
)

st.subheader("PPL-p% activation ratio (final checkpoints)")
thr = r.sql(
    "SELECT m.family AS model, m.act_fn, t.p, avg(t.activation_ratio) AS activation_ratio,"
    " any_value(t.ppl) / any_value(t.ppl_dense) AS ppl_ratio, any_value(t.cett) AS cett"
    " FROM thresholds t JOIN runs r USING (run_id) JOIN models m USING (model_id)"
    " WHERE t.method = 'ppl-p' GROUP BY ALL ORDER BY model, p"
)
if thr.empty:
    st.info("No PPL-p% thresholds yet.")
else:
    st.plotly_chart(
        px.line(
            thr,
            x="p",
            y="activation_ratio",
            color="model",
            markers=True,
            hover_data=["ppl_ratio", "cett"],
            labels={"p": "p (% perplexity increase)", "activation_ratio": "CETT-active ratio"},
        ),
        width="stretch",
    )

st.subheader("Chunk-level sparsity (final checkpoints)")
finals = r.sql(
    "SELECT r.run_id, m.family AS model FROM runs r JOIN models m USING (model_id)"
    " WHERE r.kind = 'probe' AND r.status = 'complete' AND m.step IS NOT NULL"
    " QUALIFY m.step = max(m.step) OVER (PARTITION BY m.family)"
)
finals = finals[finals["model"].isin(chosen)]


@st.cache_data(show_spinner="Computing CLS from stored codes")
def _cls(run_id: str):
    return cls_curve(r, run_id)


if not finals.empty:
    curves = pd.concat([_cls(row.run_id).assign(model=row.model) for row in finals.itertuples()])
    mean = curves.groupby(["model", "chunk"], as_index=False)["cls"].mean()
    st.plotly_chart(
        px.line(
            mean,
            x="chunk",
            y="cls",
            color="model",
            markers=True,
            log_x=True,
            labels={"chunk": "chunk size (tokens)", "cls": "CLS (mean over layers)"},
        ),
        width="stretch",
    )

st.subheader("Width / depth")
best = fits[fits["layer"] == -1].sort_values("r2", ascending=False).drop_duplicates("model")
if not best.empty:
    best = best.assign(shape=best["n_layers"].astype(str) + " × " + best["d_model"].astype(str))
    st.plotly_chart(
        px.bar(
            best,
            x="shape",
            y="a0",
            color="act_fn",
            barmode="group",
            hover_data=["model", "form", "r2"],
            labels={"a0": "limit A0 of the better fit", "shape": "layers × d_model"},
        ),
        width="stretch",
    )
