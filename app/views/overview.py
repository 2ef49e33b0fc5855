"""Overview: runs, models, tokens probed and the store's size on disk."""

import streamlit as st

from sparsescope.app.state import reader, store_path

st.title("SparseScope")
st.caption(f"Store: `{store_path()}`")
r = reader()
runs = r.sql("SELECT * FROM runs ORDER BY started_at DESC")
models = r.sql("SELECT * FROM models ORDER BY model_id")
complete = runs[runs["status"] == "complete"]
cols = st.columns(4)
cols[0].metric("Complete runs", len(complete))
cols[1].metric("Models", len(models))
cols[2].metric("Tokens probed", f"{int(complete['n_tokens'].fillna(0).sum()):,}")
cols[3].metric("Store size", f"{r.disk_bytes() / 2**20:,.1f} MiB")
if runs.empty:
    st.info(
        "This store has no runs yet. Run `sparsescope probe --model minilm --data stdlib-docs "
        f"--store {store_path()}` and reload."
    )
else:
    st.subheader("Runs")
    st.dataframe(runs.drop(columns=["config"]), hide_index=True, width="stretch")
    st.subheader("Models")
    st.dataframe(models, hide_index=True, width="stretch")
