"""Real browser: Playwright drives Debian's Chromium against `sparsescope app`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGES = {
    "": "SparseScope",
    "sparsity": "Sparsity",
    "sparsity_laws": "Sparsity laws",
    "dead_neurons": "Dead neurons",
    "neuron_browser?layer=2&neuron=7": "Neuron browser",
    "hash_codes": "Hash codes",
    "sae_features": "SAE features",
    "kernels": "Kernels",
    "circuits": "Circuits",
    "sql_console": "SQL",
}

if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        raise RuntimeError("CI needs Debian's chromium for the browser test (.ci/run installs it)")
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(minilm_store):
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sparsescope.app.cli",
            "app",
            "--store",
            str(minilm_store),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the dashboard did not start: " + proc.stdout.read().decode()[-2000:])
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def test_every_page_in_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        for path, title in PAGES.items():
            page.goto(f"{server}/{path}", wait_until="domcontentloaded")
            page.get_by_role("heading", name=title).first.wait_for(timeout=90_000)
            page.wait_for_timeout(1500)  # let charts draw before the screenshot
            if path == "sparsity":
                page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
            if path == "sql_console":
                page.get_by_role("button", name="Run").click()
                page.locator("[data-testid='stDataFrame']").first.wait_for(timeout=60_000)
            name = path.split("?")[0] or "overview"
            page.screenshot(path=tmp_path / f"page-{name}.png", full_page=True)
            assert page.locator("[data-testid='stException']").count() == 0, path
        browser.close()
    print(f"screenshots in {tmp_path}")
