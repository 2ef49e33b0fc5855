"""Runs and models as the analyses see them."""

from __future__ import annotations

import pandas as pd

from sparsescope.store.reader import Reader


def probe_runs(reader: Reader) -> pd.DataFrame:
    """Complete probe runs with their model's shape, newest first."""
    return reader.sql(
        "SELECT r.run_id, r.name, r.model_id, r.dataset, r.n_tokens, r.finished_at,"
        " m.n_layers, m.d_mlp, m.act_fn FROM runs r LEFT JOIN models m USING (model_id)"
        " WHERE r.status = 'complete' AND r.kind = 'probe' ORDER BY r.finished_at DESC"
    )


def d_mlp(reader: Reader, run_id: str) -> int:
    """Width of the MLP of the run's model."""
    df = reader.sql(
        "SELECT m.d_mlp FROM runs r JOIN models m USING (model_id) WHERE r.run_id = ?", [run_id]
    )
    if df.empty:
        raise ValueError(f"run {run_id} has no model in the catalog")
    return int(df.iloc[0, 0])


def kept_codes(reader: Reader, run_id: str) -> str:
    """The run's ``--codes`` policy as resolved (``all`` for runs that predate policies)."""
    df = reader.sql("SELECT config->>'codes' FROM runs WHERE run_id = ?", [run_id])
    return (df.iloc[0, 0] if not df.empty else None) or "all"


def tokens_around(
    reader: Reader, run_id: str, seq_ids: list[int], positions: list[int], window: int
) -> pd.DataFrame:
    """The stored tokens within ``window`` of each (seq_id, position): rows seq_id, at
    (the centre position), pos, token_id, token, ordered by centre and position."""
    return reader.sql(
        "SELECT p.seq_id, p.at, t.pos, t.token_id, t.token"
        " FROM (SELECT unnest(?::BIGINT[]) AS seq_id, unnest(?::INTEGER[]) AS at) p"
        " JOIN tokens t ON t.run_id = ? AND t.seq_id = p.seq_id"
        " AND t.pos BETWEEN p.at - ? AND p.at + ? ORDER BY p.seq_id, p.at, t.pos",
        [list(seq_ids), list(positions), run_id, window, window],
    )
