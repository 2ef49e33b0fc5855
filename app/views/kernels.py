"""Kernels: sparse-MLP speedup against the 1/(1−s) ceiling, bandwidth, and quality vs sparsity."""

from pathlib import Path

import numpy as np
import plotly.express as px
import streamlit as st

from sparsescope.app.state import demo_note, empty_hint, reader

#: Assumed peak memory bandwidth: H100 SXM (HBM3), about 3.35 TB/s.
H100_SXM_PEAK_GBS = 3350.0
BENCH = "sparsescope bench kernels --store {store}"
SHIPPED = Path(__file__).parents[2] / "benchmarks" / "results" / "kernel_bench_h100.json"
BENCH_JSON = "sparsescope bench kernels --from-json {shipped} --store {store}"
SPARSIFY_EVAL = "sparsescope sparsify-eval --model {model} --store {store}"
BENCHES = [BENCH, BENCH_JSON] if SHIPPED.is_file() else [BENCH]

st.title("Kernels")
r = reader()
bench = r.sql("SELECT * FROM kernel_bench")
quality = r.sql("SELECT * FROM sparsify_eval ORDER BY method, achieved_sparsity")
if bench.empty and quality.empty:
    if demo_note("Kernels"):
        st.stop()
    empty_hint(
        "No kernel benchmarks or sparsify evaluations yet. Time the kernels on this machine "
        "(or load the H100 results shipped with SparseScope) and evaluate sparsified MLPs:",
        *BENCHES,
        SPARSIFY_EVAL,
        shipped=SHIPPED,
    )
    st.stop()

st.header("Speed")
if bench.empty:
    empty_hint("No kernel benchmarks yet:", *BENCHES, shipped=SHIPPED)
else:
    bench["shape"] = bench["d_model"].astype(str) + "x" + bench["d_mlp"].astype(str)
    cols = st.columns(5)
    picks = {
        key: cols[i].selectbox(key, sorted(bench[key].unique()), key=f"bench_{key}")
        for i, key in enumerate(("device", "kernel", "method", "dtype", "shape"))
    }
    sel = bench
    for key, value in picks.items():
        sel = sel[sel[key] == value]
    sel = sel.assign(speedup=sel["ms_dense"] / sel["ms_sparse"], batch=sel["batch"].astype(str))
    sel = sel.sort_values(["batch", "sparsity"])
    fig = px.line(sel, x="sparsity", y="speedup", color="batch", markers=True,
                  title="Speedup over dense vs sparsity of the kept set")  # fmt: skip
    s = np.linspace(0.0, float(sel["sparsity"].max()), 50)
    fig.add_scatter(x=s, y=1.0 / (1.0 - s), name="ceiling 1/(1−s)", mode="lines",
                    line={"dash": "dash", "color": "black"})  # fmt: skip
    st.plotly_chart(fig, width="stretch")
    st.caption(
        "Batch-1 decoding is memory-bound: skipping a share s of the weight rows can speed a "
        "projection up by at most 1/(1−s). Below the measured crossover the dense fallback runs."
    )
    peak = st.number_input(
        "Peak memory bandwidth of the device (GB/s)", value=H100_SXM_PEAK_GBS, min_value=1.0
    )
    st.caption(
        f"Assumed peak: H100 SXM (HBM3) ≈ {H100_SXM_PEAK_GBS / 1000:.2f} TB/s; change it for "
        "other devices. Bytes counted: weight rows read, activations and thresholds."
    )
    fig = px.line(sel, x="sparsity", y="gbytes_per_s", color="batch", markers=True,
                  title="Achieved bandwidth vs the device's peak")  # fmt: skip
    fig.add_hline(y=peak, line_dash="dash", annotation_text=f"peak {peak:,.0f} GB/s")
    st.plotly_chart(fig, width="stretch")

st.header("Quality")
if quality.empty:
    empty_hint("No sparsify evaluations yet:", SPARSIFY_EVAL)
else:
    model = st.selectbox("Model", sorted(quality["model_id"].unique()))
    q = quality[quality["model_id"] == model]
    metric = q["metric"].iloc[0]
    label = "perplexity increase" if metric == "ppl" else "relative change of embeddings"
    fig = px.line(q, x="achieved_sparsity", y="relative_increase", color="method", markers=True,
                  hover_data=["target", "dense_value", "sparse_value"],
                  labels={"relative_increase": label, "achieved_sparsity": "achieved sparsity"},
                  title=f"Quality vs sparsity ({metric}, held-out text)")  # fmt: skip
    fig.update_layout(yaxis_tickformat=".1%", xaxis_tickformat=".0%")
    st.plotly_chart(fig, width="stretch")
    if "model_ceiling" in q and q["model_ceiling"].notna().any():
        fig = px.line(q, x="model_ceiling", y="relative_increase", color="method", markers=True,
                      hover_data=["target", "achieved_sparsity"],
                      labels={"relative_increase": label,
                              "model_ceiling": "model speed ceiling 1/ρ (batch 1)"},
                      title="What the sparsity could buy, and what it costs")  # fmt: skip
        fig.update_layout(yaxis_tickformat=".1%")
        st.plotly_chart(fig, width="stretch")
        st.caption(
            "1/ρ with ρ = [Σ_m (1 − s_m)|W_m| + dense weights] / all weights: the most a "
            "memory-bound batch-1 decoding step could speed up when each sparsified matrix m "
            "skips the share s_m of its weight rows it skipped on the held-out text."
        )
    st.dataframe(q.drop(columns=["run_id"]), hide_index=True, width="stretch")
