"""Relative URLs of dashboard pages opened at one run, neuron, feature, token or code.

Each page named here reads its query parameters back (``?run=`` and the rest) and warns
about a value that names nothing in the store."""

from __future__ import annotations

from urllib.parse import urlencode

import streamlit as st


def _url(path: str, **query) -> str:
    return f"{path}?{urlencode(query)}"


def neuron(run_id: str, layer: int, neuron: int) -> str:
    """The neuron browser at one neuron."""
    return _url("neuron_browser", run=run_id, layer=int(layer), neuron=int(neuron))


def feature(run_id: str, sae_id: str, feature: int) -> str:
    """The SAE features page at one feature."""
    return _url("sae_features", run=run_id, sae=sae_id, feature=int(feature))


def codes_from(run_id: str, seq_id: int, pos: int) -> str:
    """The hash codes page, its Hamming search starting from one token."""
    return _url("hash_codes", run=run_id, seq=int(seq_id), pos=int(pos))


#: A dataframe column of ``token_search`` links.
SEARCH_COLUMN = {"search": st.column_config.LinkColumn(display_text="who else fires on it")}


def token_search(run_id: str, token: str) -> str:
    """The search page for neurons and features that fire on exactly this token."""
    return _url("search", run=run_id, token=token, exact=1)


def run_page(path: str, run_id: str) -> str:
    """A page (its URL path) showing one run."""
    return _url(path, run=run_id)
