"""Plotly figures and small HTML renderings for the dashboard (pure functions)."""

from __future__ import annotations

import html

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go


def activation_ratio_bars(df: pd.DataFrame) -> go.Figure:
    fig = px.bar(
        df,
        x="layer",
        y="activation_ratio",
        hover_data={"sparsity": ":.4f", "n_tokens": True, "activation_ratio": ":.4f"},
        labels={"activation_ratio": "activation ratio (firing)", "layer": "layer"},
        title="Activation ratio per layer",
    )
    fig.update_layout(yaxis_tickformat=".1%", xaxis_dtick=1)
    return fig


def frequency_histogram(df: pd.DataFrame) -> go.Figure:
    fig = px.histogram(
        df,
        x="log10_freq",
        color=df["layer"].astype(str),
        barmode="overlay",
        nbins=80,
        opacity=0.55,
        labels={"log10_freq": "log10 firing frequency", "color": "layer"},
        title="Firing frequency of neurons (log10(f + 1e-10))",
    )
    fig.add_vline(x=-5, line_dash="dot", annotation_text="nearly dead")
    fig.add_vline(x=-1, line_dash="dot", annotation_text="dense")
    return fig


def _color(ratio: float, vmin: float, vmax: float) -> str:
    t = (ratio - vmin) / (vmax - vmin) if vmax > vmin else 0.0
    return f"rgba(214, 39, 40, {0.05 + 0.85 * t:.3f})"


def sequence_html(df: pd.DataFrame) -> str:
    """Tokens as spans shaded from the sequence's lowest to highest activation ratio."""
    vmin = float(df["activation_ratio"].min()) if len(df) else 0.0
    vmax = float(df["activation_ratio"].max()) if len(df) else 1.0
    spans = []
    for row in df.itertuples():
        tip = (
            f"pos {row.pos}: n_active {row.n_active} ({row.activation_ratio:.2%}), l1 {row.l1:.1f}"
        )
        spans.append(
            f'<span title="{html.escape(tip)}"'
            f' style="background:{_color(row.activation_ratio, vmin, vmax)};'
            f'padding:1px 2px;margin:1px;border-radius:3px;display:inline-block">'
            f"{html.escape(row.token) or '&nbsp;'}</span>"
        )
    return '<div style="line-height:1.9;font-family:monospace">' + "".join(spans) + "</div>"
