"""Neuron browser: one neuron's top contexts, activations, frequency over training, logits.

Arrive with ``?run=<run_id>&layer=<l>&neuron=<i>``; the URL follows the widgets.
"""

import streamlit as st

from sparsescope.analysis.dead_neurons import (
    checkpoint_frequencies,
    checkpoint_runs,
    dead_over,
    neuron_summary,
    output_logits,
    top_contexts,
)
from sparsescope.analysis.runs import probe_runs
from sparsescope.app import charts_neurons as charts
from sparsescope.app.state import pick_run, reader
from sparsescope.probes.models import ModelError, load_model

KEYS = {"run": "nb_run", "layer": "nb_layer", "neuron": "nb_neuron"}


@st.cache_resource(show_spinner="Loading the model ...")
def _model(spec: str):
    return load_model(spec)


def _apply_query_params(runs) -> None:
    """Copy new ?run=&layer=&neuron= values into the widgets (once per distinct URL)."""
    query = {k: st.query_params[k] for k in KEYS if k in st.query_params}
    if not query or query == st.session_state.get("nb_applied"):
        return
    st.session_state["nb_applied"] = query
    if query.get("run") in set(runs["run_id"]):
        st.session_state[KEYS["run"]] = query["run"]
    for name in ("layer", "neuron"):
        if query.get(name, "").isdigit():
            st.session_state[KEYS[name]] = int(query[name])


st.title("Neuron browser")
r = reader()
runs = probe_runs(r)
if runs.empty:
    st.info("No complete probe runs yet: probe a model first (`sparsescope probe ...`).")
    st.stop()
_apply_query_params(runs)
run_id = pick_run(r, runs, key=KEYS["run"])
run = runs[runs["run_id"] == run_id].iloc[0]
n_layers, d_mlp = int(run["n_layers"]), int(run["d_mlp"])
for name, top in (("layer", n_layers), ("neuron", d_mlp)):
    if st.session_state.get(KEYS[name], 0) >= top:
        st.session_state[KEYS[name]] = 0
c1, c2 = st.columns(2)
layer = c1.selectbox("Layer", range(n_layers), key=KEYS["layer"])
neuron = c2.number_input("Neuron", 0, d_mlp - 1, step=1, key=KEYS["neuron"])
query = {"run": run_id, "layer": str(layer), "neuron": str(neuron)}
st.query_params.from_dict(query)
st.session_state["nb_applied"] = query

stats = neuron_summary(r, run_id, layer, neuron)
cols = st.columns(4)
cols[0].metric("Firing frequency", f"{stats['freq']:.3e}")
cols[1].metric("Category", stats["category"])
cols[2].metric("Mean ± std", f"{stats['mean']:.3f} ± {stats['std']:.3f}")
cols[3].metric("Max", f"{stats['max']:.3f}")
st.caption(
    f"Fires (a > 0) on {stats['n_active']:,} of {stats['n_tokens']:,} tokens"
    + (f": {dead_over(stats['n_tokens'])}." if stats["n_active"] == 0 else ".")
)

st.subheader("Top-activating contexts")
contexts = top_contexts(r, run_id, layer, neuron)
contexts = contexts[contexts["value"] > 0]
if contexts.empty:
    st.info("The neuron never fires on this run's tokens: no context to show.")
else:
    st.html(charts.context_html(contexts))
    st.plotly_chart(
        charts.top_values_histogram(contexts, stats["mean"], stats["std"]), width="stretch"
    )
    st.caption(
        f"Per-token activations are not stored: the histogram shows the {len(contexts)} largest "
        f"positive values the probe kept; mean and std are over all {stats['n_tokens']:,} tokens "
        "(from neuron_stats)."
    )

ckpts = checkpoint_runs(r, run_id)
if len(ckpts) > 1:
    st.subheader("Across checkpoints")
    freqs = checkpoint_frequencies(r, ckpts)
    mine = freqs[(freqs["layer"] == layer) & (freqs["neuron"] == neuron)]
    st.plotly_chart(charts.frequency_over_checkpoints(mine), width="stretch")

with st.expander("Output direction: tokens it promotes and suppresses"):
    st.caption(
        "W_out[:, i] times the unembedding (direct path, final LayerNorm ignored). BERT "
        "encoders have no trained unembedding here: their word-embedding matrix (which the "
        "MLM decoder ties to) stands in. This loads the model once."
    )
    if st.toggle("Load the model and compute", key="nb_logits"):
        try:
            logits, unembed = output_logits(_model(run["model_id"]).bridge, layer, neuron)
        except ModelError as err:
            st.error(str(err))
        else:
            st.caption(f"Unembedding used: {unembed}.")
            c1, c2 = st.columns(2)
            for col, side in ((c1, "top"), (c2, "bottom")):
                col.markdown(f"**{side}**")
                part = logits[logits["side"] == side].drop(columns="side")
                col.dataframe(part, hide_index=True, width="stretch")
