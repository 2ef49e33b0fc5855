"""HTML and Plotly figures of one SAE feature's page (pure functions).

Token text is made readable (``output.readable_token``) and HTML-escaped here, never read as
markup."""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go

from sparsescope.app.output import readable_token

SHADE = "255,127,14"  # RGB of the activation shading; opacity = value / the feature's max


def _span(token: str, value: float, centre: bool, vmax: float) -> str:
    text = readable_token(token)
    alpha = min(max(value / vmax, 0.0), 1.0) if vmax > 0 else 0.0
    style = f"background:rgba({SHADE},{alpha:.2f});display:inline-block;padding:0 1px;margin:0 1px"
    if centre:
        style += ";outline:1.5px solid #d62728;font-weight:bold"
    tip = html.escape(f"{text} · {value:.3f}", quote=True)
    return f'<span title="{tip}" style="{style}">{html.escape(text)}</span>'


def context_heatmap(windows: pd.DataFrame, labels: list[str], vmax: float) -> str:
    """One line per context (``feature_page.context_windows`` rows; hit i labelled
    ``labels[i]``): each token shaded by the feature's activation on it, the value on hover,
    the activating token (offset 0) outlined."""
    by_hit = {hit: rows for hit, rows in windows.groupby("hit")}
    lines = []
    for hit, label in enumerate(labels):
        rows = by_hit.get(hit, windows.iloc[:0])
        spans = "".join(
            _span(r.token, float(r.value), r.offset == 0, vmax) for r in rows.itertuples()
        )
        lines.append(
            '<div style="display:flex;gap:0.5em">'
            f'<div style="color:#888;flex:0 0 17em;white-space:nowrap">{html.escape(label)}</div>'
            f"<div>{spans}</div></div>"
        )
    style = "line-height:2;font-family:monospace;font-size:0.9em"
    return f'<div style="{style}">' + "".join(lines) + "</div>"


def density_histogram(bins: pd.DataFrame) -> go.Figure:
    """``feature_page.density``: the zero bar (left of 0), then the nonzero bins; log counts."""
    zero, rest = bins.iloc[:1], bins.iloc[1:]
    width = float(rest["hi"].iloc[0] - rest["lo"].iloc[0]) if len(rest) else 1.0
    fig = go.Figure()
    fig.add_bar(
        x=[-width],
        y=zero["count"],
        width=width,
        name="= 0 (not active)",
        marker_color="#444444",
        hovertemplate="activation 0: %{y:,} tokens<extra></extra>",
    )
    fig.add_bar(
        x=(rest["lo"] + rest["hi"]) / 2,
        y=rest["count"],
        width=width,
        name="> 0",
        marker_color=f"rgb({SHADE})",
        customdata=rest[["lo", "hi"]].to_numpy(),
        hovertemplate="%{customdata[0]:.4f} to %{customdata[1]:.4f}: %{y:,} tokens<extra></extra>",
    )
    fig.update_yaxes(type="log", dtick=1, title="tokens (log scale)")
    fig.update_xaxes(title="activation")
    fig.update_layout(title="Activation density over all probed tokens", bargap=0)
    return fig
