"""Plotly figures and HTML for the dead-neuron and neuron-browser pages (pure functions)."""

from __future__ import annotations

import html
from urllib.parse import urlencode

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from sparsescope.analysis.dead_neurons import CATEGORIES

BROWSER_PATH = "neuron_browser"
COLORS = {"dead": "#444444", "nearly dead": "#9467bd", "normal": "#9ecae1", "dense": "#d62728"}


def browser_link(run_id: str, layer: int, neuron: int) -> str:
    """Relative URL of the neuron browser at one neuron."""
    query = urlencode({"run": run_id, "layer": int(layer), "neuron": int(neuron)})
    return f"{BROWSER_PATH}?{query}"


def category_bars(summary: pd.DataFrame) -> go.Figure:
    long = summary.melt(id_vars="layer", value_vars=list(CATEGORIES), var_name="category")
    fig = px.bar(
        long,
        x="layer",
        y="value",
        color="category",
        color_discrete_map=COLORS,
        category_orders={"category": list(CATEGORIES)},
        labels={"value": "neurons"},
        title="Neurons per category and layer",
    )
    fig.update_layout(barmode="stack", xaxis_dtick=1)
    return fig


def frequency_histograms(freq: pd.DataFrame, by: str, title: str) -> go.Figure:
    """Overlaid histograms of log10(f + 1e-10), one per value of column ``by``."""
    fig = px.histogram(
        freq,
        x="log10_freq",
        color=freq[by].astype(str),
        barmode="overlay",
        nbins=80,
        opacity=0.5,
        labels={"log10_freq": "log10 firing frequency", "color": by},
        title=title,
    )
    fig.add_vline(x=-5, line_dash="dot", annotation_text="nearly dead")
    fig.add_vline(x=-1, line_dash="dot", annotation_text="dense")
    return fig


def death_timeline(per_checkpoint: pd.DataFrame) -> go.Figure:
    """Dead neurons per layer against tokens seen (log x; 0 tokens drawn at 1)."""
    df = per_checkpoint.assign(x=per_checkpoint["tokens_seen"].clip(lower=1))
    fig = px.line(
        df,
        x="x",
        y="dead",
        color=df["layer"].astype(str),
        markers=True,
        log_x=True,
        hover_data={"step": True, "tokens_seen": True, "died": True, "revived": True, "x": False},
        labels={"x": "tokens seen", "dead": "dead neurons", "color": "layer"},
        title="Dead neurons over training",
    )
    return fig


def context_html(contexts: pd.DataFrame) -> str:
    """One line per top context: the activating token highlighted, all text escaped."""

    def span(tokens: list[str]) -> str:
        return "".join(f"<span>{html.escape(t)}</span> " for t in tokens)

    lines = []
    for row in contexts.itertuples():
        lines.append(
            f'<div><span style="color:#888">#{row.rank + 1} · {row.value:.3f} · '
            f"seq {row.seq_id} pos {row.pos}</span>&nbsp;&nbsp;{span(row.before)}"
            f'<mark style="background:#fdae61;font-weight:bold">{html.escape(row.token)}</mark> '
            f"{span(row.after)}</div>"
        )
    return '<div style="line-height:1.9;font-family:monospace">' + "".join(lines) + "</div>"


def top_values_histogram(contexts: pd.DataFrame, mean: float, std: float) -> go.Figure:
    fig = px.histogram(
        contexts,
        x="value",
        nbins=20,
        labels={"value": "activation"},
        title="Stored top activations (mean ± std over all tokens marked)",
    )
    fig.add_vline(x=mean, line_dash="dash", annotation_text="mean")
    for edge in (mean - std, mean + std):
        fig.add_vline(x=edge, line_dash="dot")
    return fig


def frequency_over_checkpoints(df: pd.DataFrame) -> go.Figure:
    """Firing frequency of one neuron against tokens seen (0 tokens drawn at 1)."""
    df = df.assign(x=df["tokens_seen"].clip(lower=1))
    fig = px.line(
        df,
        x="x",
        y="freq",
        markers=True,
        log_x=True,
        hover_data={"step": True, "tokens_seen": True, "n_active": True, "x": False},
        labels={"x": "tokens seen", "freq": "firing frequency"},
        title="Firing frequency over training",
    )
    return fig
