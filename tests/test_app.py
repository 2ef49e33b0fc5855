"""Streamlit AppTest of every dashboard page, on a probed store and on an empty one."""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
from pathlib import Path

import duckdb
import markdown_it
import numpy as np
import pandas as pd
import pytest
import typer
from streamlit.testing.v1 import AppTest

from sparsescope.app import cli
from sparsescope.app.bench_store import DASHBOARD as DASHBOARD_PATH
from sparsescope.app.bench_store import PAGES
from sparsescope.app.state import STORE_ENV, literal
from sparsescope.store.catalog import init_store

DASHBOARD = str(DASHBOARD_PATH)


def _app(monkeypatch, store: Path) -> AppTest:
    monkeypatch.setenv(STORE_ENV, str(store))
    return AppTest.from_file(DASHBOARD, default_timeout=120)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_a_probed_store(monkeypatch, minilm_store, page):
    at = _app(monkeypatch, minilm_store).run()
    at.switch_page(page).run()
    assert not at.exception, at.exception
    assert at.title


def test_overview_numbers(monkeypatch, minilm_store):
    from tests.conftest import SMALL_TOKENS

    at = _app(monkeypatch, minilm_store).run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Complete runs"] == "1" and metrics["Models"] == "1"
    assert metrics["Tokens probed"] == f"{SMALL_TOKENS:,}"


def test_sparsity_page_charts_and_sequence_viewer(monkeypatch, minilm_store):
    at = _app(monkeypatch, minilm_store).run()
    at.switch_page("views/sparsity.py").run()
    assert len(at.get("plotly_chart")) == 2
    at.number_input[0].set_value(2).run()
    assert not at.exception
    html = [el for el in at.get("html")]
    assert html and "span" in html[0].proto.body


def test_sql_page_runs_and_refuses(monkeypatch, minilm_store):
    at = _app(monkeypatch, minilm_store).run()
    at.switch_page("views/sql_console.py").run()
    at.text_area[0].set_value("SELECT layer, count(*) AS n FROM hash_codes GROUP BY layer").run()
    at.button[0].click().run()
    assert len(at.dataframe[0].value) == 6
    at.text_area[0].set_value("DELETE FROM runs").run()
    at.button[0].click().run()
    assert "only SELECT" in at.error[0].value


@pytest.mark.parametrize("page", PAGES)
def test_every_page_helps_on_an_empty_store(monkeypatch, empty_store, page):
    at = _app(monkeypatch, empty_store).run()
    at.switch_page(page).run()
    assert not at.exception, at.exception
    if page != "views/sql_console.py":
        assert at.info, "an empty store should get a helpful message"


def test_missing_store_gets_a_warning(monkeypatch, tmp_path):
    at = _app(monkeypatch, tmp_path / "none").run()
    assert not at.exception
    assert "No SparseScope store" in at.warning[0].value


# --- Overview hub, run pickers and ?run=, hash codes, empty-page commands -----------------

STEPS = [131, 0, 11, 2, 1]  # as text they would sort 0, 1, 11, 131, 2


def _catalog(store: Path, read_only: bool = False):
    return duckdb.connect(str(store / "catalog.duckdb"), read_only=read_only)


@pytest.fixture
def hub_store(store_copy) -> Path:
    """The MiniLM store plus: its run again as ``copy-run`` (no name, older, data copied), a
    checkpoint series ``tiny`` of nameless runs (catalog rows only, older still), a failed
    probe and a benchmark run."""
    with _catalog(store_copy) as con:
        (real,) = con.execute("SELECT run_id FROM runs").fetchone()
        con.execute(
            "INSERT INTO runs SELECT 'copy-run', NULL, kind, status, model_id, dataset, config,"
            " started_at - INTERVAL 1 HOUR, finished_at - INTERVAL 1 HOUR, n_tokens, error"
            " FROM runs WHERE run_id = ?",
            [real],
        )
        for i, step in enumerate(STEPS):
            con.execute(
                "INSERT INTO models (model_id, source, family, act_fn, n_layers, d_model, d_mlp,"
                " step, tokens_seen) VALUES (?, 'zoo', 'tiny', 'relu', 2, 32, 128, ?, ?)",
                [f"zoo:tiny@{step}", step, step * 2048],
            )
            con.execute(
                "INSERT INTO runs (run_id, name, kind, status, model_id, dataset, started_at,"
                " finished_at, n_tokens) VALUES (?, ?, 'probe', 'complete', ?, 'heldout',"
                " TIMESTAMP '2020-01-01', TIMESTAMP '2020-01-01' + to_minutes(?), ?)",
                [f"ckpt-{step}", None if i % 2 else "", f"zoo:tiny@{step}", i, 1_000_000 + step],
            )
        con.execute(
            "INSERT INTO runs (run_id, name, kind, status, model_id, started_at) VALUES"
            " ('failed-run', NULL, 'probe', 'failed', 'zoo:tiny@2', TIMESTAMP '2020-01-02'),"
            " ('bench-run', 'speed', 'bench', 'complete', NULL, TIMESTAMP '2020-01-03')"
        )
    for part in (store_copy / "data").glob(f"*/run_id={real}"):
        shutil.copytree(part, part.with_name("run_id=copy-run"))
    return store_copy


def _real_run(store: Path) -> str:
    with _catalog(store, read_only=True) as con:
        return con.execute("SELECT run_id FROM runs WHERE name = 'small'").fetchone()[0]


def test_overview_is_a_hub(monkeypatch, hub_store):
    at = _app(monkeypatch, hub_store).run()
    assert not at.exception, at.exception
    links = {link.proto.page: link.proto.label for link in at.get("page_link")}
    assert set(links) == {Path(p).stem for p in PAGES if p != "views/overview.py"}
    assert all(re.fullmatch(r"\*\*[A-Z][\w ]+\*\*: \w.{20,}", x) for x in links.values())
    assert [e.label.split("·")[0].strip(" `") for e in at.expander] == ["minilm", "tiny"]

    with _catalog(hub_store, read_only=True) as con:
        tokens = dict(con.execute("SELECT run_id, n_tokens FROM runs").fetchall())
        names = dict(con.execute("SELECT run_id, name FROM runs").fetchall())
    minilm, tiny, others = (d.value for d in at.dataframe)
    steps = sorted([*STEPS, 2])  # the failed run is a checkpoint at step 2 too
    assert tiny["step"].tolist() == steps
    assert tiny["tokens seen"].tolist() == [s * 2048 for s in steps]
    assert "run_id" not in tiny  # no run of the series has a name: the run column is the id
    tiny = tiny.assign(run_id=tiny["run"])
    rows = pd.concat([minilm, tiny, others])
    assert sorted(rows["run_id"]) == sorted(tokens)
    for row in rows.itertuples():
        assert (None if pd.isna(row.tokens) else row.tokens) == tokens[row.run_id]
        assert row.run == (names[row.run_id] or row.run_id)  # NULL and '' names: the id
    for row in tiny.itertuples(index=False):
        link = f"sparsity?run={row.run_id}" if row.status == "complete" else None
        assert (None if pd.isna(row.Sparsity) else row.Sparsity) == link
    config = json.loads(at.dataframe[1].proto.columns)
    assert config["tokens"]["type_config"]["format"] == "localized"
    assert config["finished"]["type_config"]["format"] == "YYYY-MM-DD HH:mm"
    assert others[["kind", "page"]].values.tolist() == [["bench", "kernels"]]


def test_run_pickers_label_runs_without_names(monkeypatch, hub_store):
    at = _app(monkeypatch, hub_store).run()
    at.switch_page("views/sparsity.py").run()
    assert not at.exception, at.exception
    options = at.selectbox(key="run").options
    assert len(options) == 2 + len(STEPS)  # complete probe runs
    assert "copy-run · minilm · 1,536 tokens" in options
    for step in STEPS:
        assert f"ckpt-{step} · zoo:tiny@{step} · {1_000_000 + step:,} tokens" in options
    assert not any("nan" in o.lower() for o in options)


@pytest.mark.parametrize("page", ["views/sparsity.py", "views/hash_codes.py"])
def test_pages_follow_the_run_in_the_url(monkeypatch, hub_store, page):
    real = _real_run(hub_store)
    at = _app(monkeypatch, hub_store).run()
    at.switch_page(page)
    at.query_params["run"] = "copy-run"
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="run").value == "copy-run" and not at.warning
    at.selectbox(key="run").set_value(real).run()  # the picker wins over the old URL
    assert at.selectbox(key="run").value == real
    assert at.query_params["run"] == real  # and the URL follows it

    at = _app(monkeypatch, hub_store).run()
    at.switch_page(page)
    at.query_params["run"] = "no-such-run"
    at.run()
    assert not at.exception, at.exception
    assert "no-such-run" in at.warning[0].value
    assert at.selectbox(key="run").value == real  # the newest run, said so


def test_hash_codes_chart_has_all_and_codes_are_exact(monkeypatch, minilm_store):
    at = _app(monkeypatch, minilm_store).run()
    at.switch_page("views/hash_codes.py").run()
    assert not at.exception, at.exception
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert spec["layout"]["xaxis"]["type"] == "category"
    bars = spec["data"][0]
    y = np.frombuffer(base64.b64decode(bars["y"]["bdata"]), bars["y"]["dtype"])
    codes = f"read_parquet('{minilm_store}/data/hash_codes/*/*.parquet')"
    per_token = (
        f"SELECT -1 AS layer, string_agg(hex(code), '' ORDER BY layer) AS code FROM {codes}"
        f" GROUP BY seq_id, pos UNION ALL SELECT layer, hex(code) FROM {codes}"
    )
    truth = duckdb.execute(
        f"SELECT layer, 1 - count(DISTINCT code) / count(*) FROM ({per_token}) GROUP BY layer"
    ).fetchall()
    expected = {("all" if layer < 0 else str(layer)): r for layer, r in truth}
    assert bars["x"] == [*(str(i) for i in range(len(expected) - 1)), "all"]
    assert dict(zip(bars["x"], y, strict=True)) == pytest.approx(expected)

    frequent = at.dataframe[1].value  # most frequent codes of layer 0
    top = duckdb.execute(
        f"SELECT code64 FROM {codes} WHERE layer = 0 GROUP BY code64"
        " ORDER BY count(*) DESC, code64 LIMIT 10"
    ).fetchall()
    assert frequent["code64"].tolist() == [str(c) for (c,) in top]
    assert max(c for (c,) in top) > 2**53  # the case a browser would round


def test_sql_results_keep_big_integers_exact(monkeypatch, minilm_store):
    at = _app(monkeypatch, minilm_store).run()
    at.switch_page("views/sql_console.py").run()
    query = "SELECT code64 FROM hash_codes WHERE layer = 1 ORDER BY code64 DESC LIMIT 5"
    at.text_area[0].set_value(query).run()
    at.button[0].click().run()
    codes = f"read_parquet('{minilm_store}/data/hash_codes/*/*.parquet')"
    top = duckdb.execute(f"SELECT code64 FROM {codes} WHERE layer = 1 ORDER BY 1 DESC LIMIT 5")
    assert at.dataframe[0].value["code64"].tolist() == [str(c) for (c,) in top.fetchall()]


@pytest.mark.parametrize("text", ["run `x` **bold**", "``a`b``", ":red[x] $y$ <b>", "`"])
def test_literal_is_shown_as_is(text):
    html = markdown_it.MarkdownIt().renderInline(literal(text))
    assert html == f"<code>{markdown_it.common.utils.escapeHtml(text)}</code>"


def _parse_cli(argv: list[str]) -> None:
    """Parse a ``sparsescope`` command line as the CLI would, without running it."""
    cmd, args = typer.main.get_command(cli.app), argv[1:]
    while hasattr(cmd, "resolve_command"):  # a command group
        _, cmd, args = cmd.resolve_command(cmd.make_context("sparsescope", list(args)), args)
    cmd.make_context(cmd.name, list(args))


@pytest.mark.parametrize(
    "page", ["views/overview.py", "views/sparsity.py", "views/hash_codes.py", "views/kernels.py"]
)
def test_empty_pages_give_commands_that_work(monkeypatch, tmp_path, page):
    store = init_store(tmp_path / "my store's")  # a space and a quote: commands must quote it
    at = _app(monkeypatch, store).run()
    at.switch_page(page).run()
    assert not at.exception, at.exception
    commands = [c.value for c in at.code]
    assert commands
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "sparsescope" and argv[argv.index("--store") + 1] == str(store)
        if "--model" in argv:
            assert argv[argv.index("--model") + 1] == "minilm"
        if "--from-json" in argv:
            assert Path(argv[argv.index("--from-json") + 1]).is_file()
        _parse_cli(argv)
    text = " ".join([*(i.value for i in at.info), *commands])
    assert not re.search(r"\b(M|STORE|PATH|DIR)\b|<store>", text)
