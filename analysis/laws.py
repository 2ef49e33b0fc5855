"""Owner of METHODS.md §2 laws over training: fits of activation ratio vs tokens seen.

Two forms are fitted on every model (never assumed):
- ``decreasing``: A(D) = exp(−c·D^α + b) + A0 (ReLU-like, log-space power law);
- ``increasing``: A(D) = −c·D^(−α) + A0 (convergent power law, SiLU/GELU-like).
Fits use scipy ``curve_fit`` with bounds and several starts; D is scaled to
millions of tokens for conditioning.

A fit is *degenerate* (``is_degenerate``) when it says nothing about the law: fewer than two
points more than it has parameters, no fit at all, R² below ``MIN_R2`` (no better than the
mean), or a parameter pinned at a bound of its search range (within ``BOUND_TOL`` × the
range's width: the optimum lies at or beyond the edge of the range searched).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import curve_fit

SCALE = 1e6  # tokens per unit of D inside the fits
MIN_R2 = 0.1  # below this a fit explains (almost) none of the variance around the mean
BOUND_TOL = 1e-6  # a parameter this close to a bound (share of the bound's range) sits on it


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
        return evaluate({"form": self.form, **self.params}, tokens)


def evaluate(fit, tokens) -> np.ndarray:
    """The law of ``fit`` (a ``law_fits`` row: form and parameters) at ``tokens`` seen."""
    fn, names, _ = FORMS[fit["form"]]
    return fn(np.asarray(tokens, float) / SCALE, *[fit[n] for n in names])


def is_degenerate(fit) -> str:
    """Why the fit (a ``law_fits`` row) is degenerate, or "" when it is not (see above)."""
    _, names, (low, high) = FORMS[fit["form"]]
    if not fit["n_points"] >= len(names) + 2:
        return f"too few points ({fit['n_points']} for {len(names)} parameters)"
    r2 = fit["r2"]
    if r2 is None or not np.isfinite(r2):
        return "no fit"
    if r2 < MIN_R2:
        return f"R² {r2:.2g} < {MIN_R2:g}"
    for name, lo, hi in zip(names, low, high, strict=True):
        tol = BOUND_TOL * (hi - lo)
        for side, bound in (("lower", lo), ("upper", hi)):
            if abs(fit[name] - bound) <= tol:
                return f"{name} at its {side} bound {bound:g}"
    return ""


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
