"""The hash-encoder study reproduced on scikit-learn's digits: ReLU MLPs as hash encoders.

For each width × depth, one MLP (plain torch, Adam, mini-batches of 32) is trained for
the largest number of epochs and probed at every epoch count of the grid (0 =
untrained). Its code is the concatenation of every hidden layer's firing bits
(``probes.activity``); the metrics are METHODS.md §4's, on a stratified 70/30 split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits
from torch import nn

from sparsescope.analysis.hash_codes import (
    TEST_SIZE,
    kmeans_accuracy,
    knn_accuracy,
    logreg_accuracy,
    redundancy_ratio,
)
from sparsescope.probes.activity import firing, pack_codes
from sparsescope.store.writer import RunWriter

BATCH = 32
LR = 1e-3


@contextmanager
def one_thread() -> Iterator[None]:
    """torch and BLAS/OpenMP on one thread: tiny models on a shared CPU run faster so."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Grid:
    widths: tuple[int, ...] = (3, 10, 30, 100)
    depths: tuple[int, ...] = (1, 3)
    epochs: tuple[int, ...] = (0, 1, 3, 10, 30, 100)

    @property
    def size(self) -> int:
        return len(self.widths) * len(self.depths) * len(self.epochs)


FULL = Grid()
QUICK = Grid(widths=(3, 30), depths=(1, 2), epochs=(0, 2))


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: np.ndarray
    x_test: torch.Tensor
    y_test: np.ndarray


def digits(seed: int) -> Digits:
    """Digits (8×8 images, 10 classes) scaled to [0, 1], stratified 70/30 split."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x / 16.0, y, test_size=TEST_SIZE, random_state=seed, stratify=y
    )
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return Digits(as_t(x_tr), y_tr, as_t(x_te), y_te)


def mlp(width: int, depth: int, n_in: int = 64, n_out: int = 10) -> nn.Sequential:
    """``depth`` hidden Linear+ReLU layers of ``width`` units, then a linear read-out."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(n_in if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, n_out))


def snapshots(
    width: int, depth: int, epochs: tuple[int, ...], data: Digits, seed: int
) -> Iterator[tuple[int, nn.Sequential]]:
    """Train one MLP; yield it after each epoch count in ``epochs`` (0 = at init)."""
    torch.manual_seed(seed)
    model = mlp(width, depth)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed)
    y = torch.tensor(data.y_train)
    done = 0
    for target in sorted(epochs):
        for _ in range(target - done):
            for idx in torch.randperm(len(y), generator=gen).split(BATCH):
                opt.zero_grad()
                nn.functional.cross_entropy(model(data.x_train[idx]), y[idx]).backward()
                opt.step()
        done = target
        yield target, model


@torch.no_grad()
def codes(model: nn.Sequential, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(firing bits of all hidden layers concatenated [N, Σ width], logits)."""
    bits, h = [], x
    for module in model:
        h = module(h)
        if isinstance(module, nn.ReLU):
            bits.append(firing(h))
    return torch.cat(bits, 1).numpy(), h.numpy()


def evaluate(model: nn.Sequential, data: Digits, seed: int) -> dict[str, float]:
    """The grid point's metrics for one trained (or untrained) model."""
    bits_tr, _ = codes(model, data.x_train)
    bits_te, logits = codes(model, data.x_test)
    parts = (bits_tr, data.y_train, bits_te, data.y_test)
    return {
        "redundancy_train": redundancy_ratio(pack_codes(bits_tr)),
        "redundancy_test": redundancy_ratio(pack_codes(bits_te)),
        "knn_acc": knn_accuracy(*parts),
        "kmeans_acc": kmeans_accuracy(*parts, seed=seed),
        "logreg_acc": logreg_accuracy(*parts),
        "model_acc": float((logits.argmax(1) == data.y_test).mean()),
    }


def run_grid(
    grid: Grid, seed: int = 0, on_point: Callable[[dict], None] | None = None
) -> list[dict]:
    """Every grid point's row of ``hash_encoder_grid``."""
    data = digits(seed)
    rows = []
    with one_thread():
        for depth in grid.depths:
            for width in grid.widths:
                for epochs, model in snapshots(width, depth, grid.epochs, data, seed):
                    row = {"width": width, "depth": depth, "epochs": epochs, "seed": seed}
                    row |= evaluate(model, data, seed)
                    rows.append(row)
                    if on_point:
                        on_point(row)
    return rows


def run_experiment(
    store, grid: Grid, seed: int = 0, on_point: Callable[[dict], None] | None = None
) -> str:
    """Run the grid and store it as one run of kind 'experiment'; returns the run id."""
    config = {"grid": vars(grid), "seed": seed, "batch": BATCH, "lr": LR, "test_size": TEST_SIZE}
    with RunWriter(store, "experiment", None, "sklearn-digits", config, "hash-encoder") as w:
        rows = run_grid(grid, seed, on_point)
        w.write("hash_encoder_grid", {k: [r[k] for r in rows] for k in rows[0]})
        return w.commit()
