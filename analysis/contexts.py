"""Top-activating contexts: stored (rank, value, seq_id, pos) hits with tokens either side."""

from __future__ import annotations

import pandas as pd


def group_contexts(df: pd.DataFrame) -> pd.DataFrame:
    """Rows (rank, value, seq_id, pos, ctx_pos, token) -> one row per hit with its token,
    the tokens ``before`` and ``after`` it, in rank order."""
    rows = []
    for (rank, value, seq_id, pos), ctx in df.groupby(["rank", "value", "seq_id", "pos"]):
        rows.append(
            {
                "rank": rank,
                "value": value,
                "seq_id": seq_id,
                "pos": pos,
                "token": ctx.loc[ctx["ctx_pos"] == pos, "token"].iloc[0],
                "before": ctx.loc[ctx["ctx_pos"] < pos, "token"].tolist(),
                "after": ctx.loc[ctx["ctx_pos"] > pos, "token"].tolist(),
            }
        )
    columns = ["rank", "value", "seq_id", "pos", "token", "before", "after"]
    return pd.DataFrame(rows, columns=columns).sort_values("rank", ignore_index=True)
