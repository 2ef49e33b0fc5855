"""Compare: two runs side by side, and one neuron across a model's checkpoints."""

import plotly.express as px
import streamlit as st

from sparsescope.analysis.compare import compare_layers, neuron_over_checkpoints
from sparsescope.analysis.dead_neurons import CATEGORIES, checkpoint_runs
from sparsescope.analysis.runs import probe_runs
from sparsescope.app.state import pick_run, reader

COLORS = {"A": "#1f77b4", "B": "#ff7f0e"}

st.title("Compare")
st.caption(
    "Two probe runs (two models, two checkpoints, dense vs sparsified, two corpora) side by"
    " side, from their per-run summaries; then one neuron over every checkpoint of a model."
)
r = reader()
runs = probe_runs(r)
if len(runs) < 2:
    st.info("Comparisons need two complete probe runs in this store.")
    st.stop()
c1, c2 = st.columns(2)
with c1:
    run_a = pick_run(r, runs, key="run_a")
with c2:
    run_b = pick_run(r, runs.iloc[1:].reset_index(drop=True), key="run_b")
both = compare_layers(r, run_a, run_b)
labels = {"A": f"A · {run_a}", "B": f"B · {run_b}"}
ratio = px.bar(
    both, x="layer", y="activation_ratio", color="run", barmode="group",
    color_discrete_map=COLORS, hover_data={"run_id": True, "n_tokens": ":,"},
    labels={"activation_ratio": "activation ratio (firing)"},
    title="Activation ratio per layer (mean share of neurons firing per token)",
)  # fmt: skip
ratio.update_layout(yaxis_tickformat=".1%", xaxis_type="category")
st.plotly_chart(ratio, width="stretch")

long = both.melt(["run", "layer"], list(CATEGORIES), "category", "neurons")
cats = px.bar(
    long, x="layer", y="neurons", color="run", barmode="group", facet_col="category",
    color_discrete_map=COLORS, category_orders={"category": list(CATEGORIES)},
    title="Neurons per category and layer (dead: f = 0; nearly dead: f < 1e-5; dense: f > 0.1)",
)  # fmt: skip
cats.update_xaxes(type="category")
cats.update_yaxes(matches=None, showticklabels=True)
st.plotly_chart(cats, width="stretch")
table = both.pivot(index="layer", columns="run", values=["activation_ratio", *CATEGORIES])
table.columns = [f"{value} {run}" for value, run in table.columns]
st.dataframe(
    table.reset_index(), hide_index=True, width="stretch",
    column_config={f"activation_ratio {x}": st.column_config.NumberColumn(format="%.4f")
                   for x in "AB"},
)  # fmt: skip

st.subheader("One neuron across checkpoints")
series = checkpoint_runs(r, run_a)
if len(series) < 2:
    st.info(
        f"Run A's model ({series['model_id'].iloc[0]}) has no other checkpoints in this store:"
        " pick a run of a checkpoint series (e.g. the zoo's) as A."
    )
    st.stop()
n_layers, width = (int(runs.set_index("run_id").loc[run_a, c]) for c in ("n_layers", "d_mlp"))
c1, c2 = st.columns(2)
layer = c1.number_input("Layer", 0, n_layers - 1, 0, key="cmp_layer")
neuron = c2.number_input("Neuron", 0, width - 1, 0, key="cmp_neuron")
path = neuron_over_checkpoints(r, run_a, int(layer), int(neuron))
x = "step" if path["step"].notna().all() else "run_id"
fig = px.line(
    path, x=x, y="freq", markers=True, log_x=x == "step",
    hover_data={"n_active": ":,", "n_tokens": ":,", "run_id": True},
    labels={"freq": "firing frequency f", "step": "training step"},
    title=f"Layer {layer}, neuron {neuron}: firing frequency per checkpoint",
)  # fmt: skip
st.plotly_chart(fig, width="stretch")
last = path[path["last_fired"]]
if not last.empty:
    row = last.iloc[0]
    at = f"step {int(row['step']):,}" if x == "step" else f"run {row['run_id']}"
    st.text(
        f"Dead at the final checkpoint; it last fired at {at}"
        f" ({int(row['n_active']):,} of {int(row['n_tokens']):,} tokens)."
    )
    st.page_link(
        "views/neuron_browser.py",
        label="Open that checkpoint in the neuron browser",
        query_params={"run": row["run_id"], "layer": int(layer), "neuron": int(neuron)},
    )
