"""SAE features: compare SAEs (trained or loaded), feature frequencies, and one feature's page.

Arrive with ``?run=<run_id>&sae=<sae_id>&feature=<n>`` (the Search page's links); the URL
follows the widgets. Everything but the output direction is computed from the store.
"""

import re

import pandas as pd
import streamlit as st

from sparsescope.analysis import feature_page as fp
from sparsescope.analysis import sae_metrics as sm
from sparsescope.app import charts_features as charts
from sparsescope.app import links
from sparsescope.app.charts_neurons import frequency_histograms
from sparsescope.app.output import readable_token
from sparsescope.app.state import (
    demo_note,
    empty_hint,
    follow_url,
    literal,
    new_query,
    reader,
    run_name,
    store_path,
)
from sparsescope.probes.models import ModelError, load_model
from sparsescope.probes.sae import SaeError, load_sae

PARAMS = ("run", "sae", "feature")
TOP = 20  # top activations shown


@st.cache_resource(show_spinner="Loading the model ...")
def _model(spec: str):
    return load_model(spec)


@st.cache_resource(show_spinner=False)
def _sae(path: str):
    return load_sae(path)


def _empty(message: str, *commands: str, **paths) -> None:
    """The demo's note on its SAE step when there is one, else ``message`` and commands
    (``state.empty_hint``); stops the page."""
    if not demo_note("SAE features"):
        empty_hint(message, *commands, **paths)
    st.stop()


def _apply_query_params(options: list[tuple[str, str]], d_sae: dict[str, int]) -> None:
    """Copy a new ?run=&sae=&feature= into the widgets (once per distinct URL); a value that
    names nothing here gets a warning naming it."""
    query = new_query("sae_applied", PARAMS)
    matches, where = options, "this store"
    if "run" in query:
        in_run = [o for o in options if o[0] == query["run"]]
        if in_run:
            matches, where = in_run, f"run {literal(query['run'])}"
        else:
            st.warning(
                f"The link asks for run {literal(query['run'])}, which holds no SAE feature "
                "activations in this store: pick a run below."
            )
    if "sae" in query:
        with_sae = [o for o in matches if o[1] == query["sae"]]
        if with_sae:
            matches = with_sae
        else:
            st.warning(
                f"The link asks for SAE {literal(query['sae'])}, which has no feature "
                f"activations in {where}: pick an SAE below."
            )
    if matches is not options:
        st.session_state["sae_choice"] = matches[0]
    if "feature" in query:
        sae_id = st.session_state.get("sae_choice", options[0])[1]
        text, top = query["feature"], d_sae.get(sae_id, 1 << 30)
        if re.fullmatch(r"[0-9]+", text) and int(text) < top:
            st.session_state["sae_feature"] = int(text)
        else:
            st.warning(
                f"The link asks for feature {literal(text)}, which is not a feature of SAE "
                f"{literal(sae_id)} (0 to {top - 1:,}): pick a feature below."
            )


def _readable(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(token=df["token"].map(readable_token))


st.title("SAE features")
r = reader()
saes = sm.sae_table(r)
if saes.empty:
    _empty(
        "No SAEs in this store yet: train one on MiniLM, then probe MiniLM with it:",
        "sparsescope sae train --model minilm --hook blocks.3.hook_resid_post --store {store}"
        " --out {sae}",
        "sparsescope probe --model minilm --store {store} --sae {sae}",
        sae=store_path() / "saes" / "minilm-l3",
    )

st.subheader("SAEs")
st.caption(
    "Trained and probed SAEs, grouped by model, hook, k and size, so TopK and g-SAE at equal k "
    "sit together; k is empty for the architectures without TopK (standard, jumprelu, gated). "
    "Metrics (of trained SAEs) on held-out tokens: L0, FVU, CE loss recovered when x̂ is "
    "spliced in, dead latents (no activation over `dead_over_tokens` tokens), dense latents "
    f"(f > {sm.DENSE})."
)
st.dataframe(saes.drop(columns="path"), hide_index=True, width="stretch")

freqs = sm.feature_frequencies(r)
if not freqs.empty:
    st.plotly_chart(
        frequency_histograms(freqs, "sae_id", "Feature frequency (log10(f + 1e-10))"),
        width="stretch",
    )

st.subheader("Feature")
runs = sm.feature_runs(r)
if runs.empty:
    _empty(
        "No feature activations yet: probe a model with one of these SAEs, e.g.:",
        "sparsescope probe --model {model_id} --store {store} --sae {sae}",
        model_id=saes["model_id"].iloc[0],
        sae=saes["path"].iloc[0],
    )

options = list(zip(runs["run_id"], runs["sae_id"], strict=True))
names = {
    (row.run_id, row.sae_id): " · ".join(
        [row.sae_id, run_name(row.name, row.run_id), f"{row.n_tokens:,} tokens"]
    )
    for row in runs.itertuples()
}
d_sae = dict(zip(saes["sae_id"], saes["d_sae"].astype(int), strict=True))
if st.session_state.get("sae_choice") not in names:
    st.session_state.pop("sae_choice", None)
_apply_query_params(options, d_sae)
run_id, sae_id = st.selectbox("SAE and probe run", options, format_func=names.get, key="sae_choice")
top = d_sae.get(sae_id, 1 << 30)
if st.session_state.get("sae_feature", 0) >= top:
    st.session_state["sae_feature"] = 0
feature = int(st.number_input("Feature", 0, top - 1, step=1, key="sae_feature"))
follow_url("sae_applied", {"run": run_id, "sae": sae_id, "feature": str(feature)})

summary = fp.feature_summary(r, run_id, sae_id, feature)
values = sm.feature_values(r, run_id, sae_id, feature)
n_tokens = int(summary["n_tokens"])
cols = st.columns(3)
cols[0].metric("Active on tokens", f"{len(values):,} of {n_tokens:,}")
cols[1].metric("Density", f"{len(values) / max(n_tokens, 1):.3%}")
cols[2].metric("Max activation", f"{values['value'].max():.3f}" if len(values) else "—")
if values.empty:
    st.info("This feature never fires on the probed tokens.")
else:
    vmax = float(values["value"].max())
    st.caption(
        f"Contexts show ±{fp.WINDOW} tokens around the activating token (outlined), each shaded "
        f"by the feature's activation on it (full colour = its max, {vmax:.3f}); hover a token "
        "for its value (position 0, BOS/CLS, is not probed: 0). ␣ is a space, ↵ a newline, "
        "⇥ a tab, `<0xNN>` a byte, ∅ an empty token."
    )
    st.markdown(f"**Top {min(TOP, len(values))} activations**")
    best = values.head(TOP).reset_index(drop=True)
    windows = fp.context_windows(r, run_id, sae_id, feature, best)
    labels = [
        f"#{i + 1} · {row.value:.3f} · seq {row.seq_id} pos {row.pos}"
        for i, row in enumerate(best.itertuples())
    ]
    st.html(charts.context_heatmap(windows, labels, vmax))
    centre = windows.loc[windows["offset"] == 0].set_index("hit")["token"]
    occurrences = {
        i: f"#{i + 1} · {readable_token(centre[i])} · seq {row.seq_id} pos {row.pos}"
        for i, row in enumerate(best.itertuples())
    }
    pick = best.iloc[
        st.selectbox(
            "Features active on this token", list(occurrences), format_func=occurrences.get
        )
    ]
    active = sm.token_features(r, run_id, sae_id, pick["seq_id"], pick["pos"])
    st.dataframe(active, hide_index=True, width="stretch")

    st.markdown("**Activation density**")
    st.caption(
        f"All {n_tokens:,} probed tokens of the run: one bar for those where the feature is 0, "
        f"then {fp.DENSITY_BINS} equal-width bins from 0 to its max; counts on a log scale."
    )
    st.plotly_chart(
        charts.density_histogram(fp.density(values["value"], n_tokens)), width="stretch"
    )

    st.markdown("**Examples across activation quantiles**")
    st.caption(
        f"The nonzero activations cut at their quantiles into {fp.INTERVALS} intervals of equal "
        f"count; up to {fp.PER_INTERVAL} examples from each, evenly spread by value."
    )
    examples = fp.quantile_examples(values)
    windows = fp.context_windows(r, run_id, sae_id, feature, examples)
    for interval, part in examples.groupby("interval", sort=False):
        first = part.iloc[0]
        st.caption(
            f"Interval {interval + 1} of {fp.INTERVALS}: {first['lo']:.3f} to {first['hi']:.3f}, "
            f"{int(first['n']):,} activations"
        )
        hits = windows[windows["hit"].isin(part.index)]
        labels = [f"{row.value:.3f} · seq {row.seq_id} pos {row.pos}" for row in part.itertuples()]
        st.html(charts.context_heatmap(hits.assign(hit=hits["hit"] - part.index[0]), labels, vmax))

    st.markdown("**Tokens that raise its firing**")
    least = int(st.number_input("Minimum count", 1, value=fp.MIN_COUNT, key="sae_min_count"))
    st.caption(
        "lift = P(active | token) / P(active) over the run's probed tokens, for tokens seen at "
        f"least {least} times; count = occurrences, n_active = those where it fires."
    )
    lift = fp.token_lift(r, run_id, sae_id, feature, least)
    lift["search"] = [links.token_search(run_id, t) for t in lift["token"]]
    shown = _readable(lift)
    st.dataframe(shown, hide_index=True, width="stretch", column_config=links.SEARCH_COLUMN)

with st.expander("Output direction: tokens it promotes and suppresses"):
    st.caption("W_dec[feature] times the unembedding (direct path). This loads the model once.")
    sae_row = saes[saes["sae_id"] == sae_id]
    if sae_row.empty:
        st.info("This SAE is not in the catalog: its folder is unknown.")
    elif st.button("Load the model and compute", key="sae_logits"):
        try:
            model = _model(sae_row["model_id"].iloc[0])
            logits = sm.decoder_logits(model, _sae(sae_row["path"].iloc[0]), feature)
        except (ModelError, SaeError, ValueError) as err:
            st.error(str(err))
        else:
            logits["token"] = [
                readable_token(t, fp.token_bytes(model.tokenizer, i) if "\ufffd" in t else None)
                for t, i in zip(logits["token"], logits["token_id"], strict=True)
            ]
            c1, c2 = st.columns(2)
            for col, side in ((c1, "top"), (c2, "bottom")):
                col.markdown(f"**{side}**")
                part = logits[logits["side"] == side].drop(columns="side")
                col.dataframe(part, hide_index=True, width="stretch")
