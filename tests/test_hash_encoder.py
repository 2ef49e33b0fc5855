"""The hash-encoder experiment: CLI, stored grid rows against an independent plain-torch
probe of the same networks (numpy + scikit-learn), and the page on an experiment store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from sparsescope.analysis import hash_encoder as he
from sparsescope.app.experiment_cli import experiment_app
from sparsescope.app.state import STORE_ENV
from sparsescope.store.reader import Reader

PAGE = str(Path(__file__).parents[1] / "app" / "views" / "hash_codes.py")


def _cli(*args: str):
    app = typer.Typer()  # mounted as in ``sparsescope experiment``
    app.add_typer(experiment_app, name="experiment")
    return CliRunner().invoke(app, ["experiment", *args])


@pytest.fixture(scope="module")
def experiment_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stores") / "experiment"
    result = _cli("hash-encoder", "--store", str(root), "--quick", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert "hash-encoder grid" in result.output
    return root


@pytest.fixture(scope="module")
def grid(experiment_store):
    reader = Reader(experiment_store)
    run = reader.sql("SELECT * FROM runs").iloc[0]
    assert (run["kind"], run["status"], run["dataset"]) == (
        "experiment",
        "complete",
        "sklearn-digits",
    )
    return reader.sql("SELECT * FROM hash_encoder_grid").set_index(["width", "depth", "epochs"])


def test_grid_covers_the_quick_grid(grid):
    q = he.QUICK
    assert len(grid) == len(q.widths) * len(q.depths) * len(q.epochs)
    assert (grid["seed"] == 1).all()
    assert grid[["redundancy_train", "knn_acc", "model_acc"]].apply(np.isfinite).all().all()


def _relu_bits(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Forward hooks on every nn.ReLU: firing bits (output > 0) concatenated, and logits."""
    outs = []
    handles = [
        m.register_forward_hook(lambda mod, inp, out: outs.append(out > 0))
        for m in model.modules()
        if isinstance(m, torch.nn.ReLU)
    ]
    with torch.no_grad():
        logits = model(x)
    for h in handles:
        h.remove()
    return torch.cat(outs, 1).numpy(), logits.numpy()


@pytest.mark.parametrize(("width", "depth"), [(30, 2), (3, 1)])
def test_stored_metrics_equal_an_independent_probe_of_the_same_networks(grid, width, depth):
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x / 16.0, y, test_size=0.3, random_state=1, stratify=y
    )
    x_tr, x_te = torch.tensor(x_tr, dtype=torch.float32), torch.tensor(x_te, dtype=torch.float32)
    with he.one_thread():  # the experiment trains on one thread: same floats
        models = he.snapshots(width, depth, he.QUICK.epochs, he.digits(1), seed=1)
        for epochs, model in models:
            row = grid.loc[(width, depth, epochs)]
            bits_tr, _ = _relu_bits(model, x_tr)
            bits_te, logits = _relu_bits(model, x_te)
            assert bits_tr.shape[1] == width * depth
            n = len(bits_tr)
            unique = len({r.tobytes() for r in bits_tr})
            assert row["redundancy_train"] == pytest.approx((n - unique) / n, abs=1e-12)
            unique_te = len({r.tobytes() for r in bits_te})
            assert row["redundancy_test"] == pytest.approx(1 - unique_te / len(bits_te), abs=1e-12)
            knn = KNeighborsClassifier(n_neighbors=9, metric="hamming", algorithm="brute").fit(
                bits_tr, y_tr
            )
            assert row["knn_acc"] == pytest.approx((knn.predict(bits_te) == y_te).mean(), abs=0.01)
            assert row["model_acc"] == pytest.approx((logits.argmax(1) == y_te).mean(), abs=1e-12)


def test_wider_networks_give_fewer_shared_codes_and_better_knn(grid):
    for depth in he.QUICK.depths:
        for epochs in he.QUICK.epochs:
            narrow, wide = grid.loc[(3, depth, epochs)], grid.loc[(30, depth, epochs)]
            assert wide["redundancy_train"] < narrow["redundancy_train"] - 0.2
            assert wide["knn_acc"] > narrow["knn_acc"] + 0.2


def test_a_file_as_store_is_a_one_line_error(tmp_path):
    bad = tmp_path / "file"
    bad.write_text("x")
    result = _cli("hash-encoder", "--store", str(bad), "--quick")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: store path {bad} is a file, not a folder"
    ]


def test_page_on_an_experiment_store(monkeypatch, experiment_store):
    monkeypatch.setenv(STORE_ENV, str(experiment_store))
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception, at.exception
    assert any("No complete probe runs" in i.value for i in at.info)
    assert len(at.get("plotly_chart")) == len(he.QUICK.depths) + 1
