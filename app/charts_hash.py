"""Plotly figures of the Hash codes page (pure functions)."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

ALL_LABEL = "all"
ACCURACIES = {
    "knn_acc": "k-NN (Hamming, k=9)",
    "kmeans_acc": "k-means + Hungarian",
    "logreg_acc": "logistic regression (1-vs-1)",
}


def layer_labels(df: pd.DataFrame) -> pd.Series:
    """The ``layer`` column as text, the whole-model code (layer −1) as "all"."""
    return df["layer"].map(lambda v: ALL_LABEL if v < 0 else str(v))


def _categorical_layers(fig: go.Figure, df: pd.DataFrame) -> go.Figure:
    """Layers as categories (plotly would read "0", "1", ... as numbers and drop "all"), in
    layer order with the whole-model code last."""
    layers = sorted(int(v) for v in df["layer"].unique() if v >= 0)
    order = [str(v) for v in layers] + ([ALL_LABEL] if (df["layer"] < 0).any() else [])
    return fig.update_xaxes(type="category", categoryorder="array", categoryarray=order)


def redundancy_bars(summary: pd.DataFrame) -> go.Figure:
    fig = px.bar(
        summary.assign(layer=layer_labels(summary)),
        x="layer",
        y="redundancy",
        hover_data=["n_codes", "n_unique", "n_constant_bits", "mean_bit_entropy"],
        labels={"redundancy": "redundancy ratio (N − #unique) / N"},
        title="Redundancy ratio per layer (all = whole-model code)",
        text_auto=".3f",  # a bar of 0 (every code unique) still shows its value
    )
    fig.update_traces(textposition="outside", cliponaxis=False)
    fig.update_layout(yaxis_rangemode="tozero")
    return _categorical_layers(fig, summary)


def accuracy_lines(acc: pd.DataFrame) -> go.Figure:
    last = acc["layer"].max() + 1  # lines run through the layers, then the whole-model code
    acc = acc.sort_values("layer", key=lambda v: v.where(v >= 0, last), kind="stable")
    long = acc.assign(layer=layer_labels(acc)).melt(
        ["label", "layer"], list(ACCURACIES), var_name="method", value_name="accuracy"
    )
    long["method"] = long["method"].map(ACCURACIES)
    fig = px.line(
        long,
        x="layer",
        y="accuracy",
        color="method",
        facet_col="label",
        markers=True,
        title="Categorization accuracy on test tokens (most frequent tokens only)",
    )
    fig.update_layout(yaxis_range=[0, 1.02])
    return _categorical_layers(fig, acc)


def phase_heatmaps(grid: pd.DataFrame) -> list[go.Figure]:
    """Width × training length, coloured by the training-set redundancy ratio, per depth."""
    figs = []
    for depth, part in grid.groupby("depth"):
        table = part.pivot_table(index="width", columns="epochs", values="redundancy_train")
        fig = px.imshow(
            table,
            text_auto=".2f",
            aspect="auto",
            zmin=0,
            zmax=1,
            color_continuous_scale="Viridis",
            labels={"x": "epochs", "y": "width", "color": "redundancy (train)"},
            title=f"Redundancy ratio (train), depth {depth}",
        )
        fig.update_xaxes(type="category")
        fig.update_yaxes(type="category")
        figs.append(fig)
    return figs


def experiment_accuracy(grid: pd.DataFrame) -> go.Figure:
    cols = {**ACCURACIES, "model_acc": "the network itself"}
    long = grid.melt(
        ["width", "depth", "epochs"], list(cols), var_name="method", value_name="accuracy"
    )
    long["method"] = long["method"].map(cols)
    long["x"] = long["epochs"].astype(str)
    fig = px.line(
        long.sort_values(["width", "epochs"]),
        x="x",
        y="accuracy",
        color="method",
        facet_col="width",
        facet_row="depth",
        markers=True,
        labels={"x": "epochs"},
        title="Test accuracy over training (columns: width, rows: depth)",
    )
    fig.update_layout(yaxis_range=[0, 1.02])
    return fig
