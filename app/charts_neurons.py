"""Plotly figures and HTML for the dead-neuron and neuron-browser pages (pure functions)."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from sparsescope.analysis.dead_neurons import CATEGORIES
from sparsescope.app import links

COLORS = {"dead": "#444444", "nearly dead": "#9467bd", "normal": "#9ecae1", "dense": "#d62728"}


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


def _line(run_id: str, label: str, row) -> str:
    """One context as a line: ``label`` then a link to the Hamming search from its token
    (seq_id, pos), the tokens before, the token highlighted, the tokens after; escaped."""

    def span(tokens: list[str]) -> str:
        return "".join(f"<span>{html.escape(t)}</span> " for t in tokens)

    url = html.escape(links.codes_from(run_id, row.seq_id, row.pos))
    return (
        f'<div><span style="color:#888">{html.escape(label)} · <a href="{url}"'
        f' title="nearest hash codes to this token">seq {row.seq_id} pos {row.pos}</a></span>'
        f"&nbsp;&nbsp;{span(row.before)}"
        f'<mark style="background:#fdae61;font-weight:bold">{html.escape(row.token)}</mark> '
        f"{span(row.after)}</div>"
    )


def context_html(run_id: str, contexts: pd.DataFrame) -> str:
    """One line per top context (``_line``), ranked."""
    lines = [_line(run_id, f"#{c.rank + 1} · {c.value:.3f}", c) for c in contexts.itertuples()]
    return '<div style="line-height:1.9;font-family:monospace">' + "".join(lines) + "</div>"


def context_heatmap(windows: pd.DataFrame) -> go.Figure:
    """The neuron's activation over each top context (rows: rank; columns: offset from the
    top token), its token labels in the cells. Rows need ``rank``, ``value``, ``window``
    and ``labels`` (a label or None per offset); labels are escaped (plotly reads tags)."""
    z = np.stack(windows["window"].to_numpy())
    width = z.shape[1]
    offsets = np.arange(width) - width // 2
    text = [
        [html.escape(t, quote=False) if t is not None else "" for t in row]
        for row in windows["labels"]
    ]
    rows = [f"#{r.rank + 1} · {r.value:.3f}" for r in windows.itertuples()]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=offsets,
            y=rows,
            text=text,
            texttemplate="%{text}",
            hovertemplate="%{text}<br>offset %{x}<br>activation %{z:.4f}<extra></extra>",
            colorscale="RdBu",
            reversescale=True,
            zmid=0,
            colorbar={"title": "activation"},
        )
    )
    fig.update_layout(
        title="Activation over the top contexts (float16; blank: outside the sequence)",
        xaxis={"title": "offset from the top token", "dtick": 1},
        yaxis={"autorange": "reversed", "type": "category"},
        height=max(300, 28 * len(rows) + 120),
    )
    return fig


def bin_label(lower: float, upper: float) -> str:
    """A density bin as text: its value range, 0 or NaN."""
    if np.isnan(lower):
        return "NaN"
    if lower == upper:
        return "0"
    return f"{lower:.3g} … {upper:.3g}"


def density_bars(density: pd.DataFrame) -> go.Figure:
    """Counts per density bin in value order, on a log axis."""
    labels = [bin_label(lo, hi) for lo, hi in zip(density["lower"], density["upper"], strict=True)]
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=density["count"],
            hovertemplate="%{x}<br>%{y:,} tokens<extra></extra>",
            marker_color=np.where(density["lower"] >= 0, "#d6604d", "#4393c3"),
        )
    )
    fig.update_layout(
        title="Activation density over all probed tokens",
        xaxis={"title": "activation (bins: sign × half-octaves of |a|)", "type": "category"},
        yaxis={"title": "tokens", "type": "log", "dtick": 1},
    )
    return fig


def examples_html(run_id: str, examples: pd.DataFrame, intervals: pd.DataFrame) -> str:
    """Per quantile interval (highest first) a header and its example contexts (``_line``);
    ``before``/``token``/``after`` hold labels."""
    parts = []
    for row in intervals.itertuples():
        head = (
            f"quantiles {100 * row.q_from:.3g}–{100 * row.q_to:.3g}% · "
            f"{html.escape(bin_label(row.lower, row.upper))} · {row.count:,} tokens"
        )
        parts.append(f'<div style="margin-top:0.6em;font-weight:bold">{head}</div>')
        for ex in examples[examples["interval"] == row.interval].itertuples():
            parts.append(_line(run_id, f"{ex.value:.3f}", ex))
    return '<div style="line-height:1.9;font-family:monospace">' + "".join(parts) + "</div>"


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
