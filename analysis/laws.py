"""Owner of METHODS.md §2 laws over training: fits of activation ratio vs tokens seen.

Two forms are fitted on every model (never assumed):
- ``decreasing``: A(D) = exp(−c·D^α + b) + A0 (ReLU-like, log-space power law);
- ``increasing``: A(D) = −c·D^(−α) + A0 (convergent power law, SiLU/GELU-like).
Fits use scipy ``curve_fit`` with bounds and several starts; D is scaled to
millions of tokens for conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import curve_fit

SCALE = 1e6  # tokens per unit of D inside the fits


def decreasing(d, c, alpha, b, a0):
    return np.exp(-c * np.power(d, alpha) + b) + a0


def increasing(d, c, alpha, a0):
    return -c * np.power(d, -alpha) + a0


FORMS = {
    "decreasing": (decreasing, ["c", "alpha", "b", "a0"], ([0, 0.01, -20, 0], [1e3, 3, 5, 1])),
    "increasing": (increasing, ["c", "alpha", "a0"], ([0, 0.01, 0], [1e3, 3, 1])),
}
_STARTS = {
    "decreasing": [(1.0, 0.5, -1.0), (0.1, 1.0, -2.0), (5.0, 0.3, 0.0), (0.5, 0.2, -0.5)],
    "increasing": [(0.1, 0.5), (0.01, 1.0), (0.5, 0.2), (0.05, 2.0)],
}


@dataclass
class LawFit:
    form: str
    params: dict[str, float]
    r2: float
    residuals: np.ndarray

    @property
    def a0(self) -> float:
        return self.params["a0"]

    def predict(self, tokens: np.ndarray) -> np.ndarray:
        fn = FORMS[self.form][0]
        return fn(np.asarray(tokens, float) / SCALE, *self.params.values())


def fit_law(tokens: np.ndarray, ratio: np.ndarray, form: str) -> LawFit | None:
    """Best of several bounded starts; None if no start converges or there are no more
    points than parameters (an exact fit says nothing). Step-0 points (D=0) and points of
    unknown D (NaN) drop."""
    tokens, ratio = np.asarray(tokens, float), np.asarray(ratio, float)
    keep = tokens > 0
    d, y = tokens[keep] / SCALE, ratio[keep]
    fn, names, bounds = FORMS[form]
    if len(d) <= len(names):
        return None
    best = None
    for start in _STARTS[form]:
        p0 = [*start, float(y[-1])]
        p0 = np.clip(p0, np.array(bounds[0]) + 1e-9, np.array(bounds[1]) - 1e-9)
        try:
            params, _ = curve_fit(fn, d, y, p0=p0, bounds=bounds, maxfev=20_000)
        except (RuntimeError, ValueError):
            continue
        resid = y - fn(d, *params)
        sse = float(resid @ resid)
        if best is None or sse < best[0]:
            best = (sse, params, resid)
    if best is None:
        return None
    sse, params, resid = best
    sst = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - sse / sst if sst > 0 else float("nan")
    return LawFit(form, dict(zip(names, map(float, params), strict=True)), r2, resid)


def fit_both(tokens, ratio) -> dict[str, LawFit | None]:
    return {form: fit_law(tokens, ratio, form) for form in FORMS}
