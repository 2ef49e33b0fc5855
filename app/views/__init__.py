"""Dashboard pages (Streamlit scripts run by st.navigation)."""
