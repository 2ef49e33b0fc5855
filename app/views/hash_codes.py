"""Hash codes: redundancy and categorization of firing patterns, Hamming neighbours, and the
hash-encoder experiment's phase chart."""

import re

import pandas as pd
import streamlit as st

from sparsescope.analysis import hash_codes as hc
from sparsescope.analysis.runs import d_mlp, kept_codes, probe_runs
from sparsescope.app import charts_hash, links
from sparsescope.app.state import (
    browser_safe,
    empty_hint,
    follow_url,
    literal,
    new_query,
    pick_run,
    reader,
)
from sparsescope.store.hamming import nearest_codes

START_MEMO = "nn_applied"  # the ?seq=&pos= last applied or written
PAGE_TOKENS = 100_000  # the page reads the codes of the first sequences up to this many tokens


# Cached per (store root, run id); the reader argument ``_r`` is left out of the key.
@st.cache_data(show_spinner=False)
def _last_seq(_r, root: str, run_id: str) -> int:
    return hc.last_sample_seq(_r, run_id, PAGE_TOKENS)


@st.cache_data(show_spinner="Reading codes…")
def _summary(_r, root: str, run_id: str) -> pd.DataFrame:
    _, per_layer = hc.run_codes(_r, run_id, _last_seq(_r, root, run_id))
    return hc.summary(per_layer, d_mlp(_r, run_id))


@st.cache_data(show_spinner="Fitting k-NN, k-means and logistic regression on codes…")
def _categorization(_r, root: str, run_id: str) -> pd.DataFrame:
    keys, per_layer = hc.run_codes(_r, run_id, _last_seq(_r, root, run_id))
    return hc.categorize_run(keys, per_layer, d_mlp(_r, run_id))


def probed_model(r) -> None:
    runs = probe_runs(r)
    if runs.empty:
        empty_hint(
            "No complete probe runs yet: probe a model first, then reload.",
            "sparsescope probe --model {model} --data stdlib-docs --store {store}",
        )
        return
    run_id = pick_run(r, runs, url_param="run")
    kept = kept_codes(r, run_id)
    if kept == "none":
        st.info(
            "This run kept no hash codes (`--codes none`). Probe again with `--codes all`,"
            " `--codes every:K` or `--codes layers:L1,L2` to see them here."
        )
        return
    if kept != "all":
        st.caption(
            f"This run kept the codes of {literal(kept)} (`--codes`): the numbers below are over"
            " those tokens and layers only; `--codes all` keeps every code."
        )
    root = str(r.root)
    last_seq = _last_seq(r, root, run_id)
    summary = _summary(r, root, run_id)
    whole = summary[summary["layer"] == hc.ALL_LAYERS].iloc[0]
    c = st.columns(3)
    c[0].metric("Tokens", f"{int(whole['n_codes']):,}")
    c[1].metric("Distinct whole-model codes", f"{int(whole['n_unique']):,}")
    c[2].metric("Whole-model redundancy", f"{whole['redundancy']:.4f}")
    n_seq = int(r.sql("SELECT max(seq_id) FROM tokens WHERE run_id = ?", [run_id]).iloc[0, 0])
    if last_seq < n_seq:
        st.caption(
            f"This page reads the codes of sequences 0–{last_seq} ({int(whole['n_codes']):,}"
            " tokens with codes), frequent codes and nearest codes included; SQL on"
            " `hash_codes` and `sparsescope.store.hamming.nearest_codes` reach them all."
        )
    st.plotly_chart(charts_hash.redundancy_bars(summary), width="stretch")
    shown = summary.assign(layer=charts_hash.layer_labels(summary))
    st.dataframe(shown, hide_index=True, width="stretch")
    st.caption(
        "Redundancy = (N − #unique codes) / N; `redundancy_nonconst` drops bits constant "
        "over the tokens first (same value on one set: a constant bit never separates codes)."
    )
    if st.toggle("Categorization (k-NN, k-means, logistic regression)", key="categorize"):
        st.caption(
            f"Labels: current and next token, restricted to the {hc.N_CLASSES} most frequent "
            f"tokens (at most {hc.MAX_SAMPLES:,} tokens); stratified 70/30 train/test split."
        )
        st.plotly_chart(
            charts_hash.accuracy_lines(_categorization(r, root, run_id)), width="stretch"
        )

    layers = sorted(int(v) for v in summary["layer"] if v >= 0)
    st.subheader("Most frequent codes")
    layer = st.selectbox("Layer", layers, key="freq_layer")
    frequent = hc.frequent_codes(r, run_id, layer, last_seq=last_seq)
    st.dataframe(browser_safe(frequent), hide_index=True, width="stretch")

    st.subheader("Nearest codes")
    every = int(kept.partition(":")[2]) if kept.startswith("every:") else 1
    n_seq = min(n_seq, last_seq)
    top_seq = n_seq - n_seq % every
    _start_from_url(top_seq, every)
    _at_most("nn_seq", top_seq, "This page reads no sequence")
    c = st.columns(3)
    seq_id = int(c[0].number_input("Sequence", 0, top_seq, step=every, key="nn_seq"))
    n_pos = int(
        r.sql("SELECT max(pos) FROM tokens WHERE run_id = ? AND seq_id = ?", [run_id, seq_id]).iloc[
            0, 0
        ]
    )
    _at_most("nn_pos", n_pos, f"Sequence {seq_id} has no position")
    st.session_state.setdefault("nn_pos", min(1, n_pos))
    pos = int(c[1].number_input("Position", 0, n_pos, key="nn_pos"))
    follow_url(START_MEMO, {"seq": str(seq_id), "pos": str(pos)})
    choice = c[2].selectbox("Layer", ["all layers", *layers], key="nn_layer")
    query = pd.DataFrame({"seq_id": [seq_id], "pos": [pos]})
    st.markdown(f"Query: {literal(hc.token_contexts(r, run_id, query).iloc[0])}")
    chosen = None if choice == "all layers" else int(choice)
    hits = nearest_codes(r, run_id, chosen, seq_id, pos, last_seq=last_seq)
    hits["context"] = hc.token_contexts(r, run_id, hits)
    hits["from here"] = [links.codes_from(run_id, h.seq_id, h.pos) for h in hits.itertuples()]
    st.dataframe(
        hits,
        hide_index=True,
        width="stretch",
        column_config={"from here": st.column_config.LinkColumn(display_text="search from here")},
    )
    st.caption(
        "Hamming distance between the tokens' codes (all layers: the sum over layers). Every"
        " row's link starts the search again from its token; a neuron page's contexts link here."
    )


def _at_most(key: str, top: int, what: str) -> None:
    """Bring the widget value under ``key`` down to ``top`` with a warning when above it."""
    value = st.session_state.get(key, 0)
    if value > top:
        st.warning(f"{what} {value} (0–{top}): showing {top}.")
        st.session_state[key] = top


def _start_from_url(top_seq: int, every: int) -> None:
    """Start the search from a new ``?seq=&pos=`` of the URL; warn about a value that is no
    index or a sequence whose codes the page does not read."""
    query = new_query(START_MEMO, ("seq", "pos"))
    for name, key in (("seq", "nn_seq"), ("pos", "nn_pos")):
        if name not in query:
            continue
        text = query[name]
        if not re.fullmatch(r"[0-9]+", text):
            st.warning(f"The link asks for {name} {literal(text)}, which is not an index.")
        elif name == "seq" and (int(text) > top_seq or int(text) % every):
            st.warning(
                f"The link asks for sequence {int(text)}: this page reads the codes of"
                f" sequences 0–{top_seq}"
                + (f" (one in {every}: 0, {every}, {2 * every}, …)" if every > 1 else "")
                + ". Pick one below."
            )
        else:
            st.session_state[key] = int(text)


def experiment(r) -> None:
    runs = r.sql(
        "SELECT run_id, any_value(seed) AS seed, count(*) AS points FROM hash_encoder_grid"
        " GROUP BY run_id ORDER BY run_id DESC"
    )
    if runs.empty:
        empty_hint(
            "No hash-encoder experiment in this store yet (it takes about 2–4 minutes):",
            "sparsescope experiment hash-encoder --store {store}",
        )
        return
    run_id = st.selectbox("Experiment run", runs["run_id"].tolist(), key="experiment_run")
    grid = r.sql("SELECT * FROM hash_encoder_grid WHERE run_id = ? ORDER BY ALL", [run_id])
    st.caption(
        "ReLU MLPs trained on scikit-learn's digits; code = firing bits of every hidden layer. "
        "Redundancy on the training set; accuracies on the 30% test split."
    )
    for fig in charts_hash.phase_heatmaps(grid):
        st.plotly_chart(fig, width="stretch")
    st.plotly_chart(charts_hash.experiment_accuracy(grid), width="stretch")


st.title("Hash codes")
store = reader()
st.header("Probed model")
probed_model(store)
st.header("Hash-encoder experiment")
experiment(store)
