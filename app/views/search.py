"""Search: neurons and SAE features by the token they fire on, by frequency and category.

Arrive with ``?run=<run_id>&token=<text>&exact=1`` (a lift table's link); the URL follows
the widgets."""

import streamlit as st

from sparsescope.analysis import search
from sparsescope.analysis.dead_neurons import CATEGORIES
from sparsescope.analysis.runs import probe_runs
from sparsescope.app import links
from sparsescope.app.state import empty_hint, follow_url, new_query, pick_run, reader

LINK = st.column_config.LinkColumn("open", display_text="open")
TOKEN_MEMO = "search_applied"  # the ?token=&exact= last applied or written

st.title("Search")
st.caption(
    "Find the neurons whose top contexts peak on a token (e.g. ` block`, with its leading"
    " space, or `block` anywhere in the token), the SAE features active on it, or the neurons"
    " in a firing-frequency range. Every row opens its page."
)
r = reader()
runs = probe_runs(r)
if runs.empty:
    empty_hint(
        "No complete probe runs yet: probe a model first, then reload.",
        "sparsescope probe --model {model} --data stdlib-docs --store {store}",
    )
    st.stop()
run_id = pick_run(r, runs, url_param="run")

st.subheader("Fires on a token")
query = new_query(TOKEN_MEMO, ("token", "exact"))
if "token" in query:
    st.session_state["search_text"] = query["token"]
if "exact" in query:
    st.session_state["search_exact"] = query["exact"] == "1"
c1, c2 = st.columns([3, 1])
text = c1.text_input("Token or text", key="search_text")
exact = c2.checkbox("Exact token", key="search_exact", help="Match the whole token string.")
follow_url(TOKEN_MEMO, {"token": text or None, "exact": ("1" if exact else "0") if text else None})
if text:
    found = search.neurons_by_token(r, run_id, text, exact)
    many = "the first " if len(found) == search.LIMIT else ""
    st.caption(f"{many}{len(found):,} neurons peak on a matching token in their top contexts.")
    found["open"] = [links.neuron(run_id, x.layer, x.neuron) for x in found.itertuples()]
    st.dataframe(found, hide_index=True, width="stretch", column_config={"open": LINK})
    saes = r.sql("SELECT DISTINCT sae_id FROM sae_feature_stats WHERE run_id = ?", [run_id])
    for sae_id in saes["sae_id"]:
        feats = search.features_by_token(r, run_id, sae_id, text, exact)
        many = "the first " if len(feats) == search.LIMIT else ""
        st.caption(f"SAE {sae_id}: {many}{len(feats):,} features active on matching tokens.")
        feats["open"] = [links.feature(run_id, sae_id, f) for f in feats["feature"]]
        st.dataframe(feats, hide_index=True, width="stretch", column_config={"open": LINK})

st.subheader("By firing frequency")
c1, c2, c3 = st.columns(3)
lo_exp, hi_exp = c1.slider("log10 f between", -10.0, 0.0, (-10.0, -4.0), 0.5, key="freq")
cats = c2.multiselect("Categories", list(CATEGORIES), list(CATEGORIES), key="cats")
n_layers = int(runs.set_index("run_id").loc[run_id, "n_layers"])
layers = c3.multiselect("Layers", list(range(n_layers)), list(range(n_layers)), key="layers")
lo, hi = search.log10_bounds(lo_exp, hi_exp)
rows = search.neurons_by_frequency(r, run_id, lo, hi, tuple(cats), layers)
st.caption(f"{len(rows):,} neurons with f in [{lo:.1e}, {hi:.1e}] (f = 0 included at -10).")
rows = rows.head(search.LIMIT)
rows["open"] = [links.neuron(run_id, x.layer, x.neuron) for x in rows.itertuples()]
st.dataframe(
    rows, hide_index=True, width="stretch",
    column_config={"open": LINK, "freq": st.column_config.NumberColumn(format="%.2e")},
)  # fmt: skip
