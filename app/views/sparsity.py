"""Sparsity: activation ratio per layer, firing-frequency histograms, a sequence viewer."""

import streamlit as st

from sparsescope.analysis.runs import probe_runs
from sparsescope.analysis.sparsity import (
    activation_ratio,
    firing_frequency,
    mean_activation_ratio,
    sequence_activity,
)
from sparsescope.app import charts
from sparsescope.app.state import empty_hint, pick_run, reader

st.title("Sparsity")
r = reader()
runs = probe_runs(r)
if runs.empty:
    empty_hint(
        "No complete probe runs yet: probe a model first, then reload.",
        "sparsescope probe --model {model} --data stdlib-docs --store {store}",
    )
    st.stop()
run_id = pick_run(r, runs, url_param="run")
ratio = activation_ratio(r, run_id)
c1, c2 = st.columns(2)
c1.metric("Mean activation ratio (layers weighted equally)", f"{mean_activation_ratio(ratio):.2%}")
c2.metric("Mean sparsity", f"{1 - mean_activation_ratio(ratio):.2%}")
st.plotly_chart(charts.activation_ratio_bars(ratio), width="stretch")

freq = firing_frequency(r, run_id)
layers = sorted(freq["layer"].unique().tolist())
chosen = st.multiselect("Layers in the histogram", layers, default=layers)
st.plotly_chart(charts.frequency_histogram(freq[freq["layer"].isin(chosen)]), width="stretch")

st.subheader("Sequence viewer")
n_seq = int(r.sql("SELECT max(seq_id) FROM tokens WHERE run_id = ?", [run_id]).iloc[0, 0])
c1, c2 = st.columns(2)
seq_id = c1.number_input("Sequence", min_value=0, max_value=n_seq, value=0, step=1)
layer = c2.selectbox("Layer", layers, index=0)
seq = sequence_activity(r, run_id, int(seq_id), int(layer))
st.caption(
    "Each token is shaded by the share of neurons firing on it at this layer (hover for numbers)."
)
st.html(charts.sequence_html(seq))
