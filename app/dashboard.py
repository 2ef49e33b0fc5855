"""SparseScope dashboard entry point (``sparsescope app`` runs it with Streamlit)."""

import streamlit as st

from sparsescope.app.state import PAGES

st.set_page_config(page_title="SparseScope", layout="wide")
page = st.navigation(
    [st.Page(path, title=title, default=i == 0) for i, (path, title, _) in enumerate(PAGES)]
)
page.run()
