"""SparseScope dashboard entry point (``sparsescope app`` runs it with Streamlit)."""

import streamlit as st

st.set_page_config(page_title="SparseScope", layout="wide")
page = st.navigation(
    [
        st.Page("views/overview.py", title="Overview", default=True),
        st.Page("views/sparsity.py", title="Sparsity"),
        st.Page("views/sparsity_laws.py", title="Sparsity laws"),
        st.Page("views/dead_neurons.py", title="Dead neurons"),
        st.Page("views/neuron_browser.py", title="Neuron browser"),
        st.Page("views/hash_codes.py", title="Hash codes"),
        st.Page("views/sae_features.py", title="SAE features"),
        st.Page("views/kernels.py", title="Kernels"),
        st.Page("views/circuits.py", title="Circuits"),
        st.Page("views/sql_console.py", title="SQL"),
    ]
)
page.run()
