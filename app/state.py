"""Dashboard state and page helpers: the pages, the store path and one cached read-only
reader per store, run pickers that follow ``?run=``, and help for empty pages.

Text from the store or the URL (run names, paths, tokens) never reaches Markdown
unescaped: pages show it in dataframes, ``st.text``/``st.code``, or through ``literal``."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pandas as pd
import streamlit as st

from sparsescope.app.output import cell_text
from sparsescope.store.catalog import is_store
from sparsescope.store.reader import Reader

STORE_ENV = "SPARSESCOPE_STORE"
HINT_MODEL = "minilm"  # the model spec empty pages suggest: MiniLM works offline

#: The dashboard's pages: script (relative to dashboard.py), title, the question it answers.
PAGES = [
    ("views/overview.py", "Overview", "What is in this store, and where is each run shown?"),
    ("views/search.py", "Search", "Which neurons or features fire on this token, or this often?"),
    ("views/sparsity.py", "Sparsity", "How many MLP neurons fire per token, layer by layer?"),
    ("views/compare.py", "Compare", "How do two runs or checkpoints differ, layer by layer?"),
    (
        "views/sparsity_laws.py",
        "Sparsity laws",
        "How does sparsity change over training, and which law fits it?",
    ),
    (
        "views/dead_neurons.py",
        "Dead neurons",
        "Which neurons never, rarely or always fire, and when did they die?",
    ),
    (
        "views/neuron_browser.py",
        "Neuron browser",
        "What makes one neuron fire, and which tokens does it promote?",
    ),
    (
        "views/hash_codes.py",
        "Hash codes",
        "How redundant are firing patterns as codes, and what do they tell apart?",
    ),
    ("views/sae_features.py", "SAE features", "What do a sparse autoencoder's features fire on?"),
    (
        "views/kernels.py",
        "Kernels",
        "How much faster is a sparse MLP, and what does sparsifying cost in quality?",
    ),
    ("views/circuits.py", "Circuits", "Which components carry a task, by patching and RelP?"),
    ("views/sql_console.py", "SQL", "Anything else: one read-only SELECT over the store."),
]

_JS_SAFE_INT = 2**53  # browsers hold numbers as doubles: integers beyond this lose digits


@st.cache_resource(show_spinner=False)
def _reader(root: str) -> Reader:
    return Reader(root)


def store_path() -> Path:
    return Path(os.environ.get(STORE_ENV, "stores/demo"))


def literal(text: str) -> str:
    """``text`` as a Markdown code span: shown as is, never read as markup."""
    text = str(text).replace("\n", " ")
    fence = "`" * (1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{fence} {text} {fence}"


def empty_hint(message: str, *commands: str, **values: str | Path) -> None:
    """Help for an empty page: ``message`` (Markdown written by us) in an info box, then each
    command ready to copy, with ``{store}`` the store's path, ``{model}`` a model spec that
    works here and ``{name}`` each of ``values`` (all but ``{model}`` shell-quoted)."""
    st.info(message)
    fills = {k: shlex.quote(str(v)) for k, v in {"store": store_path(), **values}.items()}
    for command in commands:
        st.code(command.format(model=HINT_MODEL, **fills), language="bash", wrap_lines=True)


def demo_note(page: str) -> bool:
    """Show the demo's progress for ``page`` when its data is on its way; whether it did."""
    from sparsescope.app import demo

    note = demo.note(store_path(), page)
    if note is not None:
        st.info(note)
    return note is not None


def reader() -> Reader:
    """The store's reader, refreshed when the catalog changed; stops the page if none."""
    root = store_path()
    if not is_store(root):
        st.warning("No SparseScope store at this path:")
        st.code(str(root), language=None)
        empty_hint(
            "Create one by probing a model (or run `make demo`):",
            "sparsescope probe --model {model} --data stdlib-docs --store {store}",
        )
        st.stop()
    r = _reader(str(root.resolve()))
    r.refresh(force=False)
    return r


def run_name(name, run_id: str) -> str:
    """A run's name, or its id when it has none (NULL, NaN or blank)."""
    return name.strip() if isinstance(name, str) and name.strip() else run_id


def run_label(row) -> str:
    """One line naming a run (a row of ``probe_runs``): name, model and size."""
    tokens = "" if pd.isna(row.n_tokens) else f" · {int(row.n_tokens):,} tokens"
    return f"{run_name(row.name, row.run_id)} · {row.model_id}{tokens}"


def pick_run(r: Reader, runs, key: str = "run", url_param: str | None = None) -> str:
    """A select box of probe runs; returns a run id. With ``url_param``, a new
    ``?<url_param>=<run_id>`` in the URL selects that run (a run not in ``runs`` gets a
    warning) and the URL follows the select box."""
    labels = {row.run_id: run_label(row) for row in runs.itertuples()}
    memo = f"{key}.url"  # the URL value this picker last wrote
    wanted = st.query_params.get(url_param) if url_param else None
    if wanted is not None and (key not in st.session_state or wanted != st.session_state.get(memo)):
        if wanted in labels:
            st.session_state[key] = wanted
        else:
            st.warning(
                f"The link asks for run {literal(wanted)}, which is not a complete probe run of "
                "this store: showing the newest run instead. Pick one below."
            )
            st.session_state.pop(key, None)
    run_id = st.selectbox("Run", list(labels), format_func=labels.get, key=key)
    if url_param:
        st.query_params[url_param] = run_id
        st.session_state[memo] = run_id
    return run_id


def new_query(memo: str, names: tuple[str, ...]) -> dict[str, str]:
    """The URL's values of ``names`` when they differ from those last applied or written
    under the session key ``memo`` (so a link applies once and widgets then rule); else {}."""
    query = {k: st.query_params[k] for k in names if k in st.query_params}
    if not query or query == st.session_state.get(memo):
        return {}
    st.session_state[memo] = query
    return query


def follow_url(memo: str, values: dict[str, str | None]) -> None:
    """Write the widgets' ``values`` to the URL (None removes one) and remember them under
    ``memo`` for ``new_query``; other parameters stay."""
    for name, value in values.items():
        if value is None:
            st.query_params.pop(name, None)
        else:
            st.query_params[name] = value
    st.session_state[memo] = {k: v for k, v in values.items() if v is not None}


def browser_safe(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` as a browser shows it exactly: integer columns holding values beyond 2^53 (a
    browser would round them) and object columns (blobs, lists, ...) as text."""
    out = {}
    for name, col in df.items():
        big = (
            pd.api.types.is_integer_dtype(col)
            and col.notna().any()
            and (max(abs(int(col.min())), abs(int(col.max()))) >= _JS_SAFE_INT)
        )
        if big:
            out[name] = col.map(lambda v: "" if pd.isna(v) else str(int(v)))
        elif col.dtype == object:
            out[name] = col.map(cell_text)
        else:
            out[name] = col
    return pd.DataFrame(out, index=df.index)
