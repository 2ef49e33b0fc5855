"""Streamlit AppTest of every dashboard page, on a probed store and on an empty one."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from sparsescope.app.bench_store import DASHBOARD as DASHBOARD_PATH
from sparsescope.app.bench_store import PAGES
from sparsescope.app.state import STORE_ENV

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
