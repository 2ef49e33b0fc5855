"""Dead neurons: categories per layer, frequency histograms, death over training, a table."""

import streamlit as st

from sparsescope.analysis.dead_neurons import (
    CATEGORIES,
    DENSE,
    NEARLY_DEAD,
    checkpoint_frequencies,
    checkpoint_runs,
    dead_over,
    death_over_checkpoints,
    layer_summary,
    neuron_categories,
)
from sparsescope.analysis.runs import probe_runs
from sparsescope.app import charts_neurons as charts
from sparsescope.app import links
from sparsescope.app.state import demo_note, empty_hint, pick_run, reader

st.title("Dead neurons")
r = reader()
runs = probe_runs(r)
if runs.empty:
    empty_hint(
        "No complete probe runs yet: probe a model first, then reload.",
        "sparsescope probe --model {model} --data stdlib-docs --store {store}",
    )
    st.stop()
run_id = pick_run(r, runs, url_param="run")
summary = layer_summary(r, run_id)
n_tokens = int(summary["n_tokens"].max())
cols = st.columns(4)
cols[0].metric("Dead", int(summary["dead"].sum()), help=dead_over(n_tokens))
cols[1].metric("Nearly dead", int(summary["nearly dead"].sum()))
cols[2].metric("Dense", int(summary["dense"].sum()))
cols[3].metric("DNR (mean over layers)", f"{summary['dnr'].mean():.2%}")
st.caption(
    f"Firing frequency f = n_active / n_tokens over {n_tokens:,} tokens. Dead: f = 0 "
    f"({dead_over(n_tokens)}); nearly dead: 0 < f < {NEARLY_DEAD:g}; dense: f > {DENSE:g}; "
    "DNR: share of (token, neuron) pairs that do not fire."
)
if 1 / n_tokens >= NEARLY_DEAD:
    st.caption(
        f"With {n_tokens:,} tokens any neuron that fires has f ≥ {1 / n_tokens:.1e}, "
        f"so no neuron can be nearly dead: probe more than {1 / NEARLY_DEAD:,.0f} tokens to "
        "tell nearly dead neurons from rare ones."
    )
st.plotly_chart(charts.category_bars(summary), width="stretch")
st.dataframe(summary, hide_index=True, width="stretch")

ckpts = checkpoint_runs(r, run_id)
neurons = neuron_categories(r, run_id)
if len(ckpts) > 1:
    st.subheader(f"Across {len(ckpts)} checkpoints")
    freqs = checkpoint_frequencies(r, ckpts)
    layer = st.selectbox("Layer", sorted(freqs["layer"].unique().tolist()), key="hist_layer")
    title = f"Firing frequency at layer {layer} per checkpoint (step)"
    st.plotly_chart(
        charts.frequency_histograms(freqs[freqs["layer"] == layer], "step", title),
        width="stretch",
    )
    deaths = death_over_checkpoints(r, ckpts["run_id"].tolist())
    timeline = deaths.checkpoints.merge(ckpts[["run_id", "step", "tokens_seen"]], on="run_id")
    st.plotly_chart(charts.death_timeline(timeline), width="stretch")
    died = deaths.neurons[deaths.neurons["death_checkpoint"] >= 0]
    c1, c2 = st.columns(2)
    c1.metric("Dead for good by the last checkpoint", len(died))
    revived = int((deaths.neurons["revivals"] > 0).sum())
    c2.metric("Revived neurons (dead, then firing later)", revived)
    steps = ckpts["step"].tolist()
    death_step = deaths.neurons.assign(
        died_at_step=[steps[k] if k >= 0 else None for k in deaths.neurons["death_checkpoint"]]
    )
    neurons = neurons.merge(
        death_step[["layer", "neuron", "died_at_step", "revivals"]], on=["layer", "neuron"]
    )
    st.caption(
        "A neuron dies for good at the first checkpoint after which it never fires again on "
        "this data; revivals count checkpoints where a dead neuron fires again."
    )
else:
    title = "Firing frequency per layer (log10(f + 1e-10))"
    st.plotly_chart(charts.frequency_histograms(neurons, "layer", title), width="stretch")
    series = r.sql(
        "SELECT 1 FROM runs JOIN models USING (model_id) WHERE kind = 'probe'"
        " AND status = 'complete' AND step IS NOT NULL LIMIT 1"
    )
    if not series.empty:
        st.caption(
            "One checkpoint of this model: pick a run of a checkpoint series above for the "
            "death timeline."
        )
    elif not demo_note("Dead neurons"):
        empty_hint(
            "One checkpoint of this model, so no death timeline: probe a checkpoint series "
            "(`--model zoo:<name>@all`, `series:GLOB` or `org/name@REV1,REV2`), such as the "
            "tiny zoo's, which `sparsescope laws` trains and probes:",
            "sparsescope laws --store {store}",
        )

st.subheader("Dead, nearly dead and dense neurons")
order = {c: i for i, c in enumerate(CATEGORIES)}
table = neurons[neurons["category"] != "normal"].sort_values(
    ["category", "freq"], key=lambda col: col.map(order) if col.name == "category" else -col
)
table["browse"] = [links.neuron(run_id, x.layer, x.neuron) for x in table.itertuples()]
st.dataframe(
    table.drop(columns=["log10_freq"]),
    hide_index=True,
    width="stretch",
    column_config={
        "browse": st.column_config.LinkColumn("browse", display_text="open"),
        "freq": st.column_config.NumberColumn("freq", format="%.2e"),
    },
)
if not table.empty:
    labels = [f"layer {x.layer} · neuron {x.neuron} · {x.category}" for x in table.itertuples()]
    pick = st.selectbox("Neuron", range(len(table)), format_func=labels.__getitem__)
    row = table.iloc[pick]
    st.page_link(
        "views/neuron_browser.py",
        label="Open in the neuron browser",
        query_params={"run": run_id, "layer": int(row["layer"]), "neuron": int(row["neuron"])},
    )
