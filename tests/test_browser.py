"""Real browser: Playwright drives Debian's Chromium against `sparsescope app` on a store
with data for every page (MiniLM, a checkpoint series with its laws, a SAE, kernel rows,
a sparsify evaluation, IOI circuits of a tiny model). Screenshots are kept under
``test-artefacts/browser/`` (or ``$SPARSESCOPE_ARTEFACTS``)."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

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
ROOT = Path(__file__).parents[1]
ARTEFACTS = Path(os.environ.get("SPARSESCOPE_ARTEFACTS", ROOT / "test-artefacts")) / "browser"
PAGES = {
    "": "SparseScope",
    "search": "Search",
    "sparsity": "Sparsity",
    "compare": "Compare",
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


def _series(folder: Path) -> str:
    """Three tiny random Llama checkpoints with trainer states; returns their series spec."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparsescope.probes.models import minilm_path

    config = AutoConfig.for_model(
        "llama", vocab_size=30528, hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
    )  # fmt: skip
    for step in (10, 100, 1000):
        torch.manual_seed(step)
        out = folder / f"checkpoint-{step}"
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
            shutil.copy(minilm_path() / name, out / name)
        state = {"global_step": step, "num_input_tokens_seen": step * 4096}
        (out / "trainer_state.json").write_text(json.dumps(state))
    return f"series:{folder}/checkpoint-*"


def _ioi_model(folder: Path) -> Path:
    """A random 2-layer GPT-2 with a tokenizer trained on IOI sentences (fast, offline)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from sparsescope.analysis import tasks
    from sparsescope.probes.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(list(itertools.islice(tasks.ioi_training_docs(0), 4000)), 2048, 64)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2,
                        n_head=2, n_inner=64, initializer_range=0.3)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def full_store(minilm_store, tmp_path_factory) -> Path:
    """The MiniLM store plus what every other page shows, each made by the real code."""
    from typer.testing import CliRunner

    import sparsescope as ss
    from sparsescope.analysis.zoo_laws import analyze_series
    from sparsescope.app.cli import app

    root = tmp_path_factory.mktemp("full")
    store = root / "store"
    shutil.copytree(minilm_store, store)
    analyze_series(store, _series(root / "my-run"), tokens=1024, ppl_tokens=512)
    sae = ss.TrainConfig("minilm", "blocks.3.hook_resid_post", tokens=4096, k=8, expansion=2,
                         heldout_tokens=1024, buffer_tokens=2048, batch_size=256)  # fmt: skip
    path = ss.train_sae(sae, store, quiet=True)["path"]
    ss.probe("minilm", "stdlib-docs", store, max_tokens=1024, saes=[path], name="sae", quiet=True)
    model = _ioi_model(root / "ioi-model")
    ss.circuits(str(model), ss.make_task("ioi", ss.load_model(str(model)).tokenizer, n=8), store)
    shipped = ROOT / "benchmarks" / "results" / "kernel_bench_h100.json"
    for args in (
        ["bench", "kernels", "--store", str(store), "--from-json", str(shipped)],
        ["sparsify-eval", "--model", "minilm", "--methods", "threshold", "--targets", "0.5",
         "--tokens", "256", "--calib-tokens", "256", "--store", str(store)],
    ):  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (args, result.output, result.exception)
    return store


@pytest.fixture
def server(full_store):
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sparsescope.app.cli",
            "app",
            "--store",
            str(full_store),
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


# Opened at a page's URL, Streamlit's client first looks for its server under that path
# (``/<page>/_stcore/health``, ``.../host-config``), gets 404 and falls back to the root.
_PROBES = ("/_stcore/health", "/_stcore/host-config")


def _bad(response) -> bool:
    """An HTTP error other than Streamlit's base-path probes."""
    return response.status >= 400 and not response.url.endswith(_PROBES)


def _bad_console(message) -> bool:
    """A console error; the browser's own line for each HTTP error is checked by ``_bad``."""
    return message.type == "error" and not message.text.startswith("Failed to load resource")


def test_every_page_in_chromium(server):
    from playwright.sync_api import sync_playwright

    shutil.rmtree(ARTEFACTS, ignore_errors=True)
    ARTEFACTS.mkdir(parents=True)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.on("console", lambda m: errors.append(m.text) if _bad_console(m) else None)
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if _bad(r) else None)

        def visit(path: str, title: str) -> None:
            page.goto(f"{server}/{path}", wait_until="domcontentloaded")
            page.get_by_role("heading", name=title).first.wait_for(timeout=90_000)
            page.wait_for_timeout(1500)  # let charts draw before the screenshot

        def shot(name: str) -> None:
            page.screenshot(path=ARTEFACTS / f"{name}.png", full_page=True)
            assert page.locator("[data-testid='stException']").count() == 0, name

        for path, title in PAGES.items():
            visit(path, title)
            if path == "sql_console":
                page.get_by_role("button", name="Run").click()
            data = page.locator(".js-plotly-plot, [data-testid='stDataFrame']").first
            data.wait_for(timeout=60_000)  # every page has data in this store
            shot("page-" + (path.split("?")[0] or "overview"))

        visit("dead_neurons", "Dead neurons")  # a neuron of the table, opened by its link
        page.get_by_role("link", name="Open in the neuron browser").first.click()
        page.get_by_role("heading", name="Neuron browser").first.wait_for(timeout=90_000)
        page.wait_for_timeout(1500)
        assert "neuron_browser?run=" in page.url and "neuron=" in page.url
        shot("link-dead-to-neuron")

        visit("neuron_browser?layer=2&neuron=7", "Neuron browser")  # the page's components
        for heading in ("Top-activating contexts", "Activation density", "Tokens that raise"):
            page.get_by_role("heading", name=heading).first.wait_for(timeout=60_000)
        page.locator(".js-plotly-plot").nth(1).wait_for(timeout=60_000)  # heatmap, density
        assert page.locator(".js-plotly-plot .heatmaplayer").count() == 1
        page.get_by_text("Examples by quantile interval").wait_for(timeout=60_000)
        assert page.get_by_text(re.compile(r"^quantiles \d")).count() >= 2
        assert page.locator("[data-testid='stDataFrame']").count() >= 1  # the lift table
        assert "&quot;" not in page.locator(".js-plotly-plot").first.inner_text()
        shot("neuron-page")

        link = page.locator("a[href^='hash_codes?']:visible").first  # an example's place
        seq = re.search(r"seq=(\d+)", link.get_attribute("href")).group(1)
        link.click()
        page.get_by_role("heading", name="Nearest codes").wait_for(timeout=90_000)
        page.wait_for_timeout(1500)
        assert f"seq={seq}" in page.url
        assert page.get_by_label("Sequence").input_value() == seq
        shot("link-context-to-codes")

        visit("search", "Search")  # a text search
        box = page.get_by_label("Token or text")
        box.fill("the")
        box.press("Enter")
        page.get_by_text("neurons peak on a matching token").first.wait_for(timeout=60_000)
        shot("search-the")
        browser.close()
    (ARTEFACTS / "console-errors.txt").write_text("\n".join(errors))
    assert not errors, errors
    print(f"screenshots in {ARTEFACTS}")
