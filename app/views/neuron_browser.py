"""Neuron browser: one neuron's top contexts with its activation over them, its activation
density and examples from each quantile interval, the tokens that raise its firing, its
frequency over training and its output direction.

Arrive with ``?run=<run_id>&layer=<l>&neuron=<i>``; the URL follows the widgets.
"""

import re

import streamlit as st

from sparsescope.analysis import neuron_page as page
from sparsescope.analysis.dead_neurons import (
    checkpoint_frequencies,
    checkpoint_runs,
    dead_over,
    neuron_summary,
    output_logits,
    top_contexts,
)
from sparsescope.analysis.runs import kept_codes, probe_runs
from sparsescope.app import charts_neurons as charts
from sparsescope.app import links
from sparsescope.app.state import follow_url, literal, new_query, pick_run, reader
from sparsescope.probes.models import ModelError, load_model

KEYS = {"run": "nb_run", "layer": "nb_layer", "neuron": "nb_neuron"}
LIFT_ROWS = 15


@st.cache_resource(show_spinner="Loading the model ...")
def _model(spec: str):
    return load_model(spec)


@st.cache_resource(show_spinner=False)
def _tokenizer(_r, root: str, run_id: str):
    return page.run_tokenizer(_r, run_id)


def _apply_query_params(runs) -> None:
    """Copy new ?run=&layer=&neuron= values into the widgets (once per distinct URL); warn
    about values that name no run or are no index."""
    query = new_query("nb_applied", tuple(KEYS))
    if "run" in query:
        if query["run"] in set(runs["run_id"]):
            st.session_state[KEYS["run"]] = query["run"]
        else:
            st.warning(
                f"The link asks for run {literal(query['run'])}, which is not a complete probe"
                " run of this store: pick one below."
            )
    for name in ("layer", "neuron"):
        if name not in query:
            continue
        if re.fullmatch(r"[0-9]+", query[name]):
            st.session_state[KEYS[name]] = int(query[name])
        else:
            shown = st.session_state.get(KEYS[name], 0)
            st.warning(
                f"The link asks for {name} {literal(query[name])}, which is not a {name} index:"
                f" showing {name} {shown}."
            )


def _check_range(name: str, top: int) -> None:
    """Warn (never silently) when the chosen layer or neuron is past the run's model."""
    value = st.session_state.get(KEYS[name], 0)
    if value >= top:
        st.warning(f"This run's model has no {name} {value} (0–{top - 1}): showing {name} 0.")
        st.session_state[KEYS[name]] = 0


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
_check_range("layer", n_layers)
_check_range("neuron", d_mlp)
c1, c2 = st.columns(2)
layer = c1.selectbox("Layer", range(n_layers), key=KEYS["layer"])
neuron = c2.number_input("Neuron", 0, d_mlp - 1, step=1, key=KEYS["neuron"])
follow_url("nb_applied", {"run": run_id, "layer": str(layer), "neuron": str(neuron)})
tokenizer = _tokenizer(r, str(r.root), run_id)

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
windows = page.top_windows(r, run_id, layer, neuron)
contexts = top_contexts(r, run_id, layer, neuron)
contexts = contexts[contexts["value"] > 0]
if contexts.empty:
    st.info("The neuron never fires on this run's tokens: no context to show.")
else:
    if windows is None:
        st.caption(f"The activation around each top token: {page.NOT_RECORDED}.")
    else:
        windows = windows[windows["value"] > 0]
        windows = windows.assign(
            labels=[
                page.labels(texts, ids, tokenizer)
                for texts, ids in zip(windows["tokens"], windows["token_ids"], strict=True)
            ]
        )
        st.plotly_chart(charts.context_heatmap(windows), width="stretch")
    with st.expander("The contexts as text", expanded=windows is None):
        shown = contexts.assign(
            token=[page.token_label(t) for t in contexts["token"]],
            before=[page.labels(b) for b in contexts["before"]],
            after=[page.labels(a) for a in contexts["after"]],
        )
        st.html(charts.context_html(run_id, shown))

st.subheader("Activation density")
density = page.density(r, run_id, layer, neuron)
if density is None:
    st.caption(f"The activation density over all tokens: {page.NOT_RECORDED}.")
else:
    st.plotly_chart(charts.density_bars(density), width="stretch")
    st.caption(
        f"Every probed token's activation ({int(density['count'].sum()):,} tokens) in fixed "
        "bins: exactly 0; 0 < |a| < 2^-10; half-octaves of |a| (edges 2^e and 1.5·2^e) up to "
        "2^6; |a| ≥ 2^6; each for both signs (blue: negative)."
    )
    st.markdown("**Examples by quantile interval**")
    intervals = page.quantile_intervals(density)
    examples = page.interval_examples(r, run_id, layer, neuron, intervals)
    if examples is None:
        st.caption(f"Sample tokens per bin: {page.NOT_RECORDED}.")
    else:
        examples = examples.assign(
            token=[
                page.labels([t], [i], tokenizer)[0]
                for t, i in zip(examples["token"], examples["token_id"], strict=True)
            ],
            before=[
                page.labels(t, i, tokenizer)
                for t, i in zip(examples["before"], examples["before_ids"], strict=True)
            ],
            after=[
                page.labels(t, i, tokenizer)
                for t, i in zip(examples["after"], examples["after_ids"], strict=True)
            ],
        )
        st.html(charts.examples_html(run_id, examples, intervals))
        st.caption(
            "Intervals of the density's cumulative distribution (a bin joins the interval of "
            "its midpoint). Each bin keeps the 2 tokens of smallest hash of (seq_id, pos): "
            "the first 2 examples of an interval are a uniform sample of its tokens."
        )

st.subheader("Tokens that raise its firing")
lift = page.token_lift(r, run_id, layer, neuron)
if lift is None:
    st.info(
        f"This run kept no hash codes for layer {layer} (`--codes {kept_codes(r, run_id)}`): "
        "the lift needs the firing bits of its tokens. Probe with `--codes all` to see it."
    )
else:
    rows, sample = lift
    if sample["n_fire"] == 0:
        st.info(f"The neuron never fires on the {sample['n_tokens']:,} tokens with codes.")
    else:
        table = rows.head(LIFT_ROWS).assign(
            search=lambda d: [links.token_search(run_id, t) for t in d["token"]],
            token=lambda d: page.labels(d["token"].tolist(), d["token_id"].tolist(), tokenizer),
        )
        st.dataframe(table, hide_index=True, width="stretch", column_config=links.SEARCH_COLUMN)
        st.caption(
            f"lift = P(fire | token) / P(fire), over the {sample['n_tokens']:,} tokens whose codes "
            f"the run kept (the first sequences, up to {page.LIFT_TOKENS:,} tokens); "
            f"P(fire) = {sample['p_fire']:.4f}; tokens seen at least {page.LIFT_MIN_COUNT} "
            "times."
        )

ckpts = checkpoint_runs(r, run_id)
if len(ckpts) > 1:
    st.subheader("Across checkpoints")
    freqs = checkpoint_frequencies(r, ckpts)
    mine = freqs[(freqs["layer"] == layer) & (freqs["neuron"] == neuron)]
    st.plotly_chart(charts.frequency_over_checkpoints(mine), width="stretch")

with st.expander("Output direction: tokens it promotes and suppresses"):
    st.caption(
        "The tokens whose logits the neuron's output direction W_out[:, i] raises and lowers "
        "most: the direct path, final LayerNorm ignored. This loads the model once."
    )
    if st.toggle("Load the model and compute", key="nb_logits"):
        try:
            model = _model(run["model_id"])
            logits, unembed = output_logits(model.bridge, layer, neuron)
        except ModelError as err:
            st.error(str(err))
        else:
            if "lm_head" in unembed:
                st.caption(f"Logits through {run['model_id']}'s unembedding (lm_head).")
            else:
                st.caption(
                    f"{run['model_id']} has no trained unembedding here (an encoder whose MLM "
                    "head the bridge initialises at random): its word-embedding matrix, which "
                    "the MLM decoder ties to, stands in."
                )
            logits["token"] = page.labels(
                logits["token"].tolist(), logits["token_id"].tolist(), model.tokenizer
            )
            c1, c2 = st.columns(2)
            for col, side in ((c1, "top"), (c2, "bottom")):
                col.markdown(f"**{side}**")
                part = logits[logits["side"] == side].drop(columns="side")
                col.dataframe(part, hide_index=True, width="stretch")
