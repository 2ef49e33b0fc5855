"""SparseScope dashboard entry point (``sparsescope app`` runs it with Streamlit)."""

import streamlit as st

st.set_page_config(page_title="SparseScope", layout="wide")
page = st.navigation(
    [
        st.Page("views/overview.py", title="Overview", default=True),
        st.Page("views/sparsity.py", title="Sparsity"),
        st.Page("views/sql_console.py", title="SQL"),
    ]
)
page.run()
