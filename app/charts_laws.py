"""Plotly figures of the sparsity-laws page (pure functions). Every figure takes the page's
one ``colors`` mapping (``model_colors``), so a model has the same colour everywhere, and
every trace's ``legendgroup`` is its model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from sparsescope.analysis.laws import evaluate

DASH = {"decreasing": "solid", "increasing": "dot"}  # the law form of a fitted curve


def model_colors(models) -> dict[str, str]:
    """One colour per model, from the sorted list of models."""
    models = sorted(models)
    palette = px.colors.qualitative.Plotly
    if len(models) > len(palette):
        palette = px.colors.qualitative.Alphabet
    return {m: palette[i % len(palette)] for i, m in enumerate(models)}


def _fit_name(fit) -> str:
    label = f"{fit['model']} {fit['form']} (R² {fit['r2']:.3f})"
    return f"{label}, degenerate: {fit['degenerate']}" if fit["degenerate"] else label


def _fit_line(fit, color: str) -> dict:
    """Line style of a fitted curve: dash by form; degenerate fits dashed, thin and faded."""
    if fit["degenerate"]:
        return {"color": color, "dash": "dash", "width": 1}
    return {"color": color, "dash": DASH[fit["form"]], "width": 2}


def ratio_figure(points: pd.DataFrame, fits: pd.DataFrame, colors: dict) -> go.Figure:
    """Activation ratio per checkpoint (markers; ``tokens`` ≥ 1) and the fitted laws."""
    fig = go.Figure()
    for model, group in points.groupby("model"):
        fig.add_scatter(
            x=group["tokens"], y=group["activation_ratio"], mode="markers", name=model,
            legendgroup=model, marker_color=colors[model], hovertemplate="%{x:,} tokens: %{y:.4f}",
        )  # fmt: skip
        grid = np.geomspace(max(group["tokens"].min(), 1e3), group["tokens"].max(), 100)
        for _, fit in fits[fits["model"] == model].iterrows():
            fig.add_scatter(
                x=grid, y=evaluate(fit, grid), mode="lines", name=_fit_name(fit),
                legendgroup=model, line=_fit_line(fit, colors[model]),
                opacity=0.4 if fit["degenerate"] else 1.0,
            )  # fmt: skip
    fig.update_layout(
        title="Activation ratio (firing) vs tokens seen",
        xaxis_type="log",
        xaxis_title="tokens seen (step 0 drawn at 1)",
        yaxis_title="activation ratio",
    )
    return fig


def residual_figure(residuals: pd.DataFrame, fits: pd.DataFrame, colors: dict) -> go.Figure:
    """Observed − fitted ratio per fit (``residuals`` has a ``fit`` column: the fit's index
    in ``fits``), in the styles of ``ratio_figure``."""
    fig = go.Figure()
    for key, group in residuals.groupby("fit"):
        fit = fits.loc[key]
        fig.add_scatter(
            x=group["tokens_seen"], y=group["residual"], mode="lines+markers",
            name=_fit_name(fit), legendgroup=fit["model"],
            line=_fit_line(fit, colors[fit["model"]]), opacity=0.4 if fit["degenerate"] else 1.0,
        )  # fmt: skip
    fig.add_hline(y=0, line_color="grey")
    fig.update_layout(
        title="Residuals of the fits (colours and lines as above)",
        xaxis_type="log",
        xaxis_title="tokens seen",
        yaxis_title="observed − fitted ratio",
    )
    return fig


def model_lines(df: pd.DataFrame, x: str, y: str, colors: dict, **kwargs) -> go.Figure:
    """One line with markers per model (``px.line`` arguments in ``kwargs``)."""
    return px.line(
        df, x=x, y=y, color="model", markers=True, color_discrete_map=colors,
        category_orders={"model": sorted(df["model"].unique())}, **kwargs,
    )  # fmt: skip


def width_depth_bars(best: pd.DataFrame, colors: dict) -> go.Figure:
    """The limit A0 of each model's best fit, grouped by shape (layers × d_model)."""
    shape = best["n_layers"].astype(str) + " × " + best["d_model"].astype(str)
    return px.bar(
        best.assign(shape=shape), x="shape", y="a0", color="model", barmode="group",
        color_discrete_map=colors, category_orders={"model": sorted(best["model"].unique())},
        hover_data=["act_fn", "form", "r2"],
        labels={"a0": "limit A0 of the best fit", "shape": "layers × d_model"},
    )  # fmt: skip
