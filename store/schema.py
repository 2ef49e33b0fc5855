"""Schema of the activation store: catalog tables, data tables and migrations.

This module owns the shape of every table. Data tables are Parquet shards under
``data/<table>/run_id=<id>/``; their ``run_id`` column comes from the folder
name (hive partitioning), so the Arrow schemas below leave it out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa

SCHEMA_VERSION = 2

CATALOG_DDL = {
    "runs": """
        CREATE TABLE runs (
            run_id VARCHAR PRIMARY KEY, name VARCHAR, kind VARCHAR, status VARCHAR,
            model_id VARCHAR, dataset VARCHAR, config JSON, started_at TIMESTAMP,
            finished_at TIMESTAMP, n_tokens BIGINT, error VARCHAR)""",
    "models": """
        CREATE TABLE models (
            model_id VARCHAR PRIMARY KEY, source VARCHAR, family VARCHAR, act_fn VARCHAR,
            n_layers INTEGER, d_model INTEGER, d_mlp INTEGER, n_params BIGINT,
            step BIGINT, tokens_seen BIGINT, train_loss DOUBLE, val_loss DOUBLE, path VARCHAR)""",
    "saes": """
        CREATE TABLE saes (
            sae_id VARCHAR PRIMARY KEY, model_id VARCHAR, hook VARCHAR, arch VARCHAR,
            d_in INTEGER, d_sae INTEGER, k INTEGER, metrics JSON, path VARCHAR)""",
}

DATA_TABLES: dict[str, pa.Schema] = {
    "tokens": pa.schema(
        [
            ("seq_id", pa.int64()),
            ("pos", pa.int32()),
            ("token_id", pa.int32()),
            ("token", pa.string()),
        ]
    ),
    "layer_token_stats": pa.schema(
        [
            ("seq_id", pa.int64()),
            ("pos", pa.int32()),
            ("layer", pa.int16()),
            ("n_active", pa.int32()),
            ("l1", pa.float32()),
            ("max_abs", pa.float32()),
        ]
    ),
    "layer_summary": pa.schema(  # per run and layer, written at commit (store.summaries)
        [
            ("layer", pa.int16()),
            ("n_tokens", pa.int64()),
            ("n_active", pa.int64()),
            ("n_active_sq", pa.float64()),
            ("l1", pa.float64()),
            ("max_abs", pa.float32()),
        ]
    ),
    "neuron_stats": pa.schema(
        [
            ("layer", pa.int16()),
            ("neuron", pa.int32()),
            ("n_tokens", pa.int64()),
            ("n_active", pa.int64()),
            ("sum", pa.float64()),
            ("sum_sq", pa.float64()),
            ("max", pa.float32()),
        ]
    ),
    "neuron_top": pa.schema(
        [
            ("layer", pa.int16()),
            ("neuron", pa.int32()),
            ("rank", pa.int16()),
            ("seq_id", pa.int64()),
            ("pos", pa.int32()),
            ("value", pa.float32()),
        ]
    ),
    # the neuron page's data (probes.mlp_probe; bins: probes.mlp_stats.bin_bounds). Runs
    # written before these tables existed have no rows in them: no migration is needed
    "neuron_top_window": pa.schema(  # per neuron_top row: activations at pos - 6 .. pos + 6
        [
            ("layer", pa.int16()),
            ("neuron", pa.int32()),
            ("rank", pa.int16()),
            ("window", pa.list_(pa.float32())),  # float16 precision; NaN outside the sequence
        ]
    ),
    "neuron_density": pa.schema(  # nonzero counts of fixed bins over all probed tokens
        [
            ("layer", pa.int16()),
            ("neuron", pa.int32()),
            ("bin", pa.int16()),
            ("count", pa.int64()),
        ]
    ),
    "neuron_samples": pa.schema(  # per bin, the tokens of smallest token_hash(seq_id, pos)
        [
            ("layer", pa.int16()),
            ("neuron", pa.int32()),
            ("bin", pa.int16()),
            ("seq_id", pa.int64()),
            ("pos", pa.int32()),
            ("value", pa.float32()),
        ]
    ),
    "hash_codes": pa.schema(
        [
            ("seq_id", pa.int64()),
            ("pos", pa.int32()),
            ("layer", pa.int16()),
            ("code", pa.binary()),
            ("code64", pa.uint64()),
            ("n_active", pa.int32()),
        ]
    ),
    "thresholds": pa.schema(
        [
            ("method", pa.string()),
            ("p", pa.float64()),
            ("layer", pa.int16()),
            ("threshold", pa.float64()),
            ("cett", pa.float64()),
            ("activation_ratio", pa.float64()),
            ("ppl", pa.float64()),
            ("ppl_dense", pa.float64()),
        ]
    ),
    "sae_feature_acts": pa.schema(
        [
            ("sae_id", pa.string()),
            ("seq_id", pa.int64()),
            ("pos", pa.int32()),
            ("feature", pa.int32()),
            ("value", pa.float32()),
        ]
    ),
    "sae_feature_stats": pa.schema(
        [
            ("sae_id", pa.string()),
            ("feature", pa.int32()),
            ("n_tokens", pa.int64()),
            ("n_active", pa.int64()),
            ("sum", pa.float64()),
            ("max", pa.float32()),
        ]
    ),
    "patching_scores": pa.schema(
        [
            ("task", pa.string()),
            ("method", pa.string()),
            ("site", pa.string()),
            ("layer", pa.int16()),
            ("pos", pa.int32()),
            ("head", pa.int32()),
            ("neuron", pa.int32()),
            ("score", pa.float64()),
        ]
    ),
    "kernel_bench": pa.schema(
        [
            ("device", pa.string()),
            ("kernel", pa.string()),
            ("method", pa.string()),
            ("sparsity", pa.float64()),
            ("batch", pa.int32()),
            ("d_model", pa.int32()),
            ("d_mlp", pa.int32()),
            ("dtype", pa.string()),
            ("ms_dense", pa.float64()),
            ("ms_sparse", pa.float64()),
            ("gbytes_per_s", pa.float64()),
        ]
    ),
    "hash_encoder_grid": pa.schema(
        [
            ("width", pa.int32()),
            ("depth", pa.int16()),
            ("epochs", pa.int32()),
            ("seed", pa.int32()),
            ("redundancy_train", pa.float64()),
            ("redundancy_test", pa.float64()),
            ("knn_acc", pa.float64()),
            ("kmeans_acc", pa.float64()),
            ("logreg_acc", pa.float64()),
            ("model_acc", pa.float64()),
        ]
    ),
    "cett_curves": pa.schema(
        [
            ("layer", pa.int16()),
            ("threshold", pa.float64()),
            ("cett", pa.float64()),
            ("activation_ratio", pa.float64()),
        ]
    ),
    "law_fits": pa.schema(
        [
            ("model", pa.string()),
            ("act_fn", pa.string()),
            ("n_layers", pa.int16()),
            ("d_model", pa.int32()),
            ("d_mlp", pa.int32()),
            ("layer", pa.int16()),  # -1: the mean over layers
            ("form", pa.string()),
            ("c", pa.float64()),
            ("alpha", pa.float64()),
            ("b", pa.float64()),
            ("a0", pa.float64()),
            ("r2", pa.float64()),
            ("n_points", pa.int32()),
        ]
    ),
    "sparsify_eval": pa.schema(
        [
            ("model_id", pa.string()),
            ("method", pa.string()),
            ("target", pa.float64()),
            ("achieved_sparsity", pa.float64()),
            ("model_ceiling", pa.float64()),  # 1/ρ of batch-1 decoding (METHODS.md §7)
            ("metric", pa.string()),
            ("dense_value", pa.float64()),
            ("sparse_value", pa.float64()),
            ("relative_increase", pa.float64()),
        ]
    ),
}


# tables with rows per probed token (their bytes grow with a run's length); the others hold
# a fixed amount per run, layer and neuron
PER_TOKEN_TABLES = ("tokens", "layer_token_stats", "hash_codes", "sae_feature_acts")

# tables whose Parquet parts are sorted, so that DuckDB can skip row groups on lookups
SORT_KEYS: dict[str, list[tuple[str, str]]] = {
    "sae_feature_acts": [("sae_id", "ascending"), ("feature", "ascending")],
}


def _v1(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    for ddl in CATALOG_DDL.values():
        con.execute(ddl)


def _v2(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    """Per-run summaries (``layer_summary``) for the runs published before they existed."""
    from sparsescope.store.summaries import backfill

    complete = con.execute("SELECT run_id FROM runs WHERE status = 'complete'").fetchall()
    backfill(root, [r[0] for r in complete])


# version -> function that brings a store from version-1 to version (catalog connection,
# store root). A later schema change adds an entry here; old runs are never rewritten.
MIGRATIONS: dict[int, Callable[[duckdb.DuckDBPyConnection, Path], None]] = {1: _v1, 2: _v2}
