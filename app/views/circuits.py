"""Circuits: activation patching, AtP and RelP scores side by side, agreement, faithfulness."""

import html
import json

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from sparsescope.app.state import demo_note, empty_hint, reader

METHODS = ("activation", "attribution", "relp")
GRID_SITES = ("resid_pre", "attn_out", "mlp_out", "head", "neuron")

st.title("Circuits")
r = reader()
runs = r.sql(
    "SELECT run_id, name, model_id, dataset, config FROM runs"
    " WHERE kind = 'circuits' AND status = 'complete' ORDER BY started_at DESC"
)
if runs.empty:
    if not demo_note("Circuits"):
        empty_hint(
            "No circuits runs yet. This trains the zoo's ioi model first if needed (or pass "
            "`--task PAIRS.jsonl` with your own prompt pairs) and scores components by "
            "activation patching, attribution patching and RelP:",
            "sparsescope circuits --task ioi --store {store}",
        )
    st.stop()

labels = {row.run_id: f"{row.name or row.run_id} · {row.model_id} · {row.dataset}"
          for row in runs.itertuples()}  # fmt: skip
run_id = st.selectbox("Run", list(labels), format_func=labels.get)
config = json.loads(runs.set_index("run_id").loc[run_id, "config"])
scores = r.sql("SELECT * FROM patching_scores WHERE run_id = ?", [run_id])
if "task_file" in config:  # the user's prompt pairs; plain text, never markup
    st.text(f"Task {config['task']}: {config.get('n', '?')} prompt pairs from "
            f"{config['task_file']} (sha256 {config.get('task_sha256', '?')[:12]})")  # fmt: skip
else:
    st.text(f"Task {config.get('task', '?')}: {config.get('n', '?')} prompt pairs on "
            f"{config.get('split', '?')} names, seed {config.get('seed', '?')}")  # fmt: skip

secs = config.get("seconds", {})
cols = st.columns(5)
cols[0].metric("Prompt pairs", config.get("n", "?"))
cols[1].metric("LD clean", f"{config.get('ld_clean', float('nan')):.2f}")
cols[2].metric("LD corrupted", f"{config.get('ld_corr', float('nan')):.2f}")
for col, method in zip(cols[3:], ("activation", "relp"), strict=True):
    col.metric(f"{method} time", f"{secs.get(method, float('nan')):.2f} s")
if secs.get("relp"):
    st.caption(
        f"Activation patching took {secs['activation'] / secs['relp']:.0f}× the time of RelP "
        f"(AtP {secs.get('attribution', float('nan')):.2f} s). Scores are the change of the "
        "normalised logit difference (0 corrupted, 1 clean) when a component takes its clean "
        "value in the corrupted run."
    )

st.header("Scores by method")
sites = [s for s in GRID_SITES if s in set(scores["site"])]
site = st.selectbox("Site", sites, format_func=lambda s: s.replace("_", " "))
part = scores[scores["site"] == site].fillna({"pos": -1, "head": -1, "neuron": -1})
column = {"head": "head", "neuron": "neuron"}.get(site, "pos")
limit = float(part["score"].abs().max()) or 1.0
pos_labels = [html.escape(label) for label in config.get("pos_labels", [])]  # Plotly reads HTML
for col, method in zip(st.columns(3), METHODS, strict=True):
    grid = part[part["method"] == method].pivot(index="layer", columns=column, values="score")
    x = [f"{i} {pos_labels[i]}" if column == "pos" and i < len(pos_labels) else str(i)
         for i in grid.columns]  # fmt: skip
    fig = px.imshow(grid.to_numpy(), x=x, y=[str(i) for i in grid.index], aspect="auto",
                    color_continuous_scale="RdBu", zmin=-limit, zmax=limit,
                    labels={"x": column, "y": "layer", "color": "score"}, title=method)  # fmt: skip
    fig.update_yaxes(dtick=1)  # whole layers
    col.plotly_chart(fig, width="stretch")

st.header("Agreement with activation patching")
keys = ["layer", "pos", "head", "neuron"]
wide = part.pivot_table(index=keys, columns="method", values="score").reset_index()
agreement = config.get("agreement", {}).get(site, {})
for col, method in zip(st.columns(2), ("attribution", "relp"), strict=True):
    if method not in wide:
        continue
    r_value = agreement.get(method, float("nan"))
    fig = px.scatter(wide, x="activation", y=method, hover_data=["layer", column],
                     title=f"{method} vs activation patching (r = {r_value:.3f})")  # fmt: skip
    lo, hi = (
        float(wide[["activation", method]].min().min()),
        float(wide[["activation", method]].max().max()),
    )
    fig.add_scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                    line={"dash": "dash", "color": "grey"})  # fmt: skip
    col.plotly_chart(fig, width="stretch")
table = pd.DataFrame(config.get("agreement", {})).T
if not table.empty:
    st.dataframe(table.style.format("{:+.3f}"), width="content")

st.header("Circuits")
faith = config.get("faithfulness", {})
if faith:
    curve = pd.DataFrame([{"method": m, "k": k, "faithfulness": f}
                          for m, rows in faith.items() for k, f in rows])  # fmt: skip
    fig = px.line(curve, x="k", y="faithfulness", color="method", markers=True, log_x=True,
                  title="Faithfulness of the top-k circuit (other nodes mean-ablated)")  # fmt: skip
    fig.add_hline(y=1.0, line_dash="dash")
    fig.update_xaxes(tickvals=sorted(curve["k"].unique()))  # the measured k, not log minors
    st.plotly_chart(fig, width="stretch")

nodes = scores[scores["site"].isin(["attn_out", "mlp_out"])]
cols = st.columns(2)
method = cols[0].selectbox("Method", METHODS, index=2)
k = cols[1].slider("Top k nodes", 1, max(1, min(40, len(nodes) // 3)), min(10, len(nodes) // 3))
top = nodes[nodes["method"] == method].assign(mag=lambda d: d["score"].abs())
top = top.sort_values("mag", ascending=False).head(k).reset_index(drop=True)
top["y"] = top["layer"] + np.where(top["site"] == "mlp_out", 0.5, 0.0)
fig = go.Figure()
for a in top.itertuples():
    for b in top.itertuples():  # a can feed b: later in the model, at b's position or before
        feeds = b.y > a.y and (b.pos == a.pos or (b.site == "attn_out" and b.pos > a.pos))
        if feeds:
            fig.add_scatter(x=[a.pos, b.pos], y=[a.y, b.y], mode="lines", hoverinfo="skip",
                            line={"color": "lightgrey", "width": 1}, showlegend=False)  # fmt: skip
for site_name, symbol in (("attn_out", "circle"), ("mlp_out", "square")):
    sel = top[top["site"] == site_name]
    fig.add_scatter(
        x=sel["pos"], y=sel["y"], mode="markers+text", name=site_name.replace("_", " "),
        text=[f"{s:+.2f}" for s in sel["score"]], textposition="top center",
        marker={"symbol": symbol, "size": 12 + 30 * sel["mag"] / max(top["mag"].max(), 1e-12),
                "color": sel["score"], "colorscale": "RdBu", "cmin": -limit, "cmax": limit},
    )  # fmt: skip
ticks = list(range(len(pos_labels)))
fig.update_layout(
    title=f"Top {k} attention/MLP outputs by |{method} score| (layer × position)",
    xaxis={"tickvals": ticks, "ticktext": pos_labels, "title": "position"},
    yaxis={"title": "layer (MLP half a layer above attention)"},
)
st.plotly_chart(fig, width="stretch")
st.caption(
    "Edges are schematic: they join nodes that can feed each other (a later layer, the same "
    "position, or a later position through attention); they are not scored."
)
