"""SAE features: compare SAEs (trained or loaded), feature frequencies, and a feature browser."""

import plotly.express as px
import streamlit as st

from sparsescope.analysis import sae_metrics as sm
from sparsescope.app import charts_neurons as charts
from sparsescope.app.state import reader
from sparsescope.probes.models import ModelError, load_model
from sparsescope.probes.sae import SaeError, load_sae


@st.cache_resource(show_spinner="Loading the model ...")
def _model(spec: str):
    return load_model(spec)


@st.cache_resource(show_spinner=False)
def _sae(path: str):
    return load_sae(path)


st.title("SAE features")
r = reader()
saes = sm.sae_table(r)
if saes.empty:
    st.info(
        "No SAEs in this store yet: train one with `sparsescope sae train --model M --hook "
        "blocks.1.hook_resid_post --store STORE`, then probe it with `--sae PATH`."
    )
    st.stop()

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
        charts.frequency_histograms(freqs, "sae_id", "Feature frequency (log10(f + 1e-10))"),
        width="stretch",
    )

st.subheader("Feature browser")
runs = sm.feature_runs(r)
if runs.empty:
    st.info("No feature activations yet: probe a model with `sparsescope probe ... --sae PATH`.")
    st.stop()
labels = {
    i: f"{row.sae_id} · {row.name or row.run_id} · {row.n_tokens:,} tokens"
    for i, row in enumerate(runs.itertuples())
}
choice = runs.iloc[st.selectbox("SAE and probe run", list(labels), format_func=labels.get)]
sae_row = saes[saes["sae_id"] == choice["sae_id"]]
d_sae = int(sae_row["d_sae"].iloc[0]) if not sae_row.empty else 1 << 30
feature = int(st.number_input("Feature", 0, d_sae - 1, step=1, key="sae_feature"))
values = sm.feature_values(r, choice["run_id"], choice["sae_id"], feature)
st.metric("Active on tokens", f"{len(values):,} of {int(choice['n_tokens']):,}")
if values.empty:
    st.info("This feature never fires on the probed tokens.")
else:
    contexts = sm.feature_contexts(r, choice["run_id"], choice["sae_id"], feature)
    st.html(charts.context_html(contexts))
    st.plotly_chart(
        px.histogram(values, x="value", nbins=40, title="Activation values (nonzero)"),
        width="stretch",
    )
    occurrences = {
        i: f"#{row.rank + 1} · '{row.token}' · seq {row.seq_id} pos {row.pos}"
        for i, row in enumerate(contexts.itertuples())
    }
    pick = contexts.iloc[
        st.selectbox(
            "Features active on this token", list(occurrences), format_func=occurrences.get
        )
    ]
    active = sm.token_features(r, choice["run_id"], choice["sae_id"], pick["seq_id"], pick["pos"])
    st.dataframe(active, hide_index=True, width="stretch")

with st.expander("Decoder direction: tokens it promotes and suppresses"):
    st.caption("W_dec[feature] times the unembedding (direct path). This loads the model once.")
    if sae_row.empty:
        st.info("This SAE is not in the catalog: its folder is unknown.")
    elif st.button("Load the model and compute", key="sae_logits"):
        try:
            model = _model(sae_row["model_id"].iloc[0])
            logits = sm.decoder_logits(model, _sae(sae_row["path"].iloc[0]), feature)
        except (ModelError, SaeError, ValueError) as err:
            st.error(str(err))
        else:
            c1, c2 = st.columns(2)
            for col, side in ((c1, "top"), (c2, "bottom")):
                col.markdown(f"**{side}**")
                part = logits[logits["side"] == side].drop(columns="side")
                col.dataframe(part, hide_index=True, width="stretch")
