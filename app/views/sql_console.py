"""SQL: the sandboxed console (one SELECT, read-only, time and row limits)."""

import streamlit as st

from sparsescope.app.output import frame
from sparsescope.app.state import browser_safe, literal, reader
from sparsescope.store.console import ROW_LIMIT, SqlRefused, run_sql

EXAMPLE = """SELECT layer, sum(n_active) / sum(n_tokens) AS mean_active
FROM layer_summary
GROUP BY layer ORDER BY layer"""

st.title("SQL")
r = reader()
st.caption(
    "Tables: runs, models, saes, tokens, layer_token_stats, layer_summary, neuron_stats, "
    "neuron_top, "
    "hash_codes, thresholds, ... (complete runs only). One SELECT; read-only; "
    f"at most {ROW_LIMIT:,} rows."
)
query = st.text_area("Query", EXAMPLE, height=160)
if st.button("Run", type="primary"):
    try:
        result = run_sql(r.root, query)
    except SqlRefused as err:
        st.error(f"Refused: {literal(err)}")
    else:
        shown = browser_safe(frame(result.table))
        if result.truncated:
            st.warning(f"Showing the first {ROW_LIMIT:,} rows.")
        st.dataframe(shown, hide_index=True, width="stretch")
        st.download_button("Download CSV", shown.to_csv(index=False), "query.csv", "text/csv")
