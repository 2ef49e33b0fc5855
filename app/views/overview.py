"""Overview, the dashboard's hub: what each page answers, then the store's runs grouped by
model (checkpoints in step order) with links to the pages that show each run."""

import pandas as pd
import streamlit as st

from sparsescope.app import links
from sparsescope.app.state import PAGES, empty_hint, literal, reader, run_name, store_path

#: Pages that show one probe run and honour ``?run=<run_id>`` (link column: page title).
RUN_PAGES = ["Sparsity", "Dead neurons", "Neuron browser", "Hash codes"]
#: The page that shows each other kind of run.
KIND_PAGES = {
    "laws": "Sparsity laws",
    "thresholds": "Sparsity laws",
    "circuits": "Circuits",
    "experiment": "Hash codes",
    "sae": "SAE features",
    "bench": "Kernels",
    "sparsify-eval": "Kernels",
}
URLS = {title: path.removeprefix("views/").removesuffix(".py") for path, title, _ in PAGES}
LINK = {"display_text": "open"}
RUN_LINKS = {page: st.column_config.LinkColumn(page, **LINK) for page in RUN_PAGES}
FORMATS = {
    "tokens": st.column_config.NumberColumn("tokens", format="localized"),
    "step": st.column_config.NumberColumn("step", format="localized"),
    "tokens seen": st.column_config.NumberColumn("tokens seen", format="compact"),
    "finished": st.column_config.DatetimeColumn("finished", format="YYYY-MM-DD HH:mm"),
}


def _run_link(page: str, run_id: str) -> str:
    return links.run_page(URLS[page], run_id)


def _runs_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Display columns of runs: name (or id), model or checkpoint step, size and dates; the
    id column only where some run has a name, checkpoint columns only where known."""
    names = [run_name(n, i) for n, i in zip(runs["name"], runs["run_id"], strict=True)]
    table = pd.DataFrame(
        {
            "run": names,
            "model": runs["model_id"],
            "step": runs["step"].astype("Int64"),
            "dataset": runs["dataset"],
            "tokens": runs["n_tokens"].astype("Int64"),
            "tokens seen": runs["tokens_seen"].astype("Int64"),
            "finished": runs["finished_at"],
            "status": runs["status"],
            "run_id": runs["run_id"],
        },
        index=runs.index,
    )
    drop = [c for c in ("step", "tokens seen") if table[c].isna().all()]
    drop += ["model"] if table["step"].notna().all() else []  # the model id is family@step
    drop += ["run_id"] if names == runs["run_id"].tolist() else []
    return table.drop(columns=drop)


st.title("SparseScope")
st.text(f"Store: {store_path()}")
r = reader()
runs = r.sql(
    "SELECT r.run_id, r.name, r.kind, r.status, r.model_id, r.dataset, r.n_tokens,"
    " r.started_at, r.finished_at, coalesce(m.family, r.model_id) AS family, m.step,"
    " m.tokens_seen, m.n_layers, m.d_mlp FROM runs r LEFT JOIN models m USING (model_id)"
)
n_models = int(r.sql("SELECT count(*) FROM models").iloc[0, 0])
complete = runs[runs["status"] == "complete"]
cols = st.columns(4)
cols[0].metric("Complete runs", len(complete))
cols[1].metric("Models", n_models)
cols[2].metric("Tokens probed", f"{int(complete['n_tokens'].fillna(0).sum()):,}")
cols[3].metric("Store size", f"{r.disk_bytes() / 2**20:,.1f} MiB")

st.subheader("Pages")
for path, title, question in PAGES[1:]:
    st.page_link(path, label=f"**{title}**: {question}")

if runs.empty:
    empty_hint(
        "This store has no runs yet: probe a model, then reload.",
        "sparsescope probe --model {model} --data stdlib-docs --store {store}",
    )
    st.stop()

probes = runs[runs["kind"] == "probe"].sort_values(
    ["family", "step", "finished_at"], na_position="first"
)
if not probes.empty:
    st.subheader("Probe runs by model")
    st.caption(
        "One table per model (checkpoint series), checkpoints in training-step order. The "
        "links open a page on that run (complete runs only)."
    )
families = list(dict.fromkeys(probes["family"]))
for family in families:
    part = probes[probes["family"] == family]
    done = part["status"] == "complete"
    label = f"{literal(family)} · {len(part)} run{'s' * (len(part) != 1)}"
    shapes = part[["n_layers", "d_mlp"]].dropna().drop_duplicates()
    if len(shapes) == 1:
        label += f" · {int(shapes.iloc[0, 0])} layers × {int(shapes.iloc[0, 1]):,} neurons"
    with st.expander(label, expanded=len(families) <= 3):
        table = _runs_frame(part)
        for page in RUN_PAGES:
            table[page] = [
                _run_link(page, i) if ok else None
                for i, ok in zip(part["run_id"], done, strict=True)
            ]
        st.dataframe(
            table,
            hide_index=True,
            width="stretch",
            column_config=FORMATS | RUN_LINKS,
        )

others = runs[runs["kind"] != "probe"].sort_values("finished_at", ascending=False)
if not others.empty:
    st.subheader("Other runs")
    table = _runs_frame(others)
    table.insert(0, "kind", others["kind"])
    table["page"] = [URLS[KIND_PAGES[k]] if k in KIND_PAGES else None for k in others["kind"]]
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        column_config=FORMATS | {"page": st.column_config.LinkColumn("page", **LINK)},
    )
