"""Owner of METHODS.md §5 metrics: L0, FVU, dead and dense latents, CE loss recovered.

Also the store look-ups of the "SAE features" page (SAE table, feature frequencies, a
feature's values, features of one token, decoder logits; the rest of a feature's page is in
``feature_page``). Activations at position 0 (BOS/CLS) are
left out of every metric and left untouched when x̂ is spliced in, as in training.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F

from sparsescope.analysis.dead_neurons import unembedding
from sparsescope.probes.hooks import hooked
from sparsescope.probes.models import LoadedModel
from sparsescope.probes.sae import SAE
from sparsescope.store.reader import Reader

DENSE = 0.1  # a latent firing on more than this share of tokens is dense
FIRST = 1  # positions before this one (BOS/CLS) are left out


def ce_recovered(ce_clean: float, ce_zero_abl: float, ce_spliced: float) -> float:
    """``(CE_zero_abl − CE_spliced) / (CE_zero_abl − CE_clean)``."""
    return (ce_zero_abl - ce_spliced) / (ce_zero_abl - ce_clean)


def fvu(sq_err: float, sum_x: np.ndarray, sum_sq: float, n: int) -> float:
    """``Σ||x − x̂||² / Σ||x − mean(x)||²`` from sums over n tokens (Σx per dim, Σ||x||²)."""
    return sq_err / (sum_sq - float(sum_x @ sum_x) / n)


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of a batch (mean: divide by ``B·(T−1)``)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
    )


def lm_loss(
    model: LoadedModel,
    ids: torch.Tensor,
    hook: str,
    replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token CE, activations at ``hook`` from FIRST on) of one forward.

    ``replace`` maps those activations to what the model continues with.
    """
    seen = {}

    def fn(tensor, hook):
        seen["x"] = tensor[:, FIRST:]
        if replace is None:
            return None
        out = tensor.clone()
        out[:, FIRST:] = replace(tensor[:, FIRST:]).to(tensor.dtype)
        return out

    with hooked(model.bridge, [(hook, fn)]), model.fast_attention():
        logits = model.bridge.original_model(input_ids=ids).logits
    return next_token_ce(logits, ids), seen["x"]


@torch.no_grad()
def evaluate(
    model: LoadedModel, sae: SAE, id_batches: Iterable[torch.Tensor], device: str = "cpu"
) -> tuple[dict, dict[str, np.ndarray]]:
    """Metrics of ``sae`` on token batches, and per-latent n_active, sum and max.

    CE metrics are None for models without a next-token head.
    """
    causal = model.is_causal_lm
    sq_err = sum_sq = 0.0
    sum_x = np.zeros(sae.d_in)
    n = l0 = n_pred = 0
    ce = {"clean": 0.0, "zero_abl": 0.0, "spliced": 0.0}
    n_active = torch.zeros(sae.d_sae, dtype=torch.int64)
    total = torch.zeros(sae.d_sae, dtype=torch.float64)
    top = torch.zeros(sae.d_sae)

    def recon(x):
        return sae(x.float())

    for ids in id_batches:
        ids = ids.to(device)
        loss, x = lm_loss(model, ids, sae.hook_name)
        x = x.reshape(-1, sae.d_in).double()
        z = sae.encode(x.float())
        x_hat = sae.decode(z).double()
        sq_err += float(((x - x_hat) ** 2).sum())
        sum_x += x.sum(0).cpu().numpy()
        sum_sq += float((x**2).sum())
        n += x.shape[0]
        fired = z > 0
        l0 += int(fired.sum())
        n_active += fired.sum(0).cpu()
        total += z.sum(0).double().cpu()
        top = torch.maximum(top, z.amax(0).cpu())
        if causal:
            ce["clean"] += float(loss)
            ce["zero_abl"] += float(lm_loss(model, ids, sae.hook_name, torch.zeros_like)[0])
            ce["spliced"] += float(lm_loss(model, ids, sae.hook_name, recon)[0])
            n_pred += ids.shape[0] * (ids.shape[1] - 1)
    if n == 0:
        raise ValueError("no tokens to evaluate the SAE on")
    freq = n_active.numpy() / n
    metrics = {
        "l0": l0 / n,
        "fvu": fvu(sq_err, sum_x, sum_sq, n),
        "dead": int((freq == 0).sum()),
        "dead_over_tokens": n,
        "dense": int((freq > DENSE).sum()),
        **{f"ce_{name}": (value / n_pred if causal else None) for name, value in ce.items()},
    }
    metrics["ce_recovered"] = (
        ce_recovered(metrics["ce_clean"], metrics["ce_zero_abl"], metrics["ce_spliced"])
        if causal
        else None
    )
    stats = {"n_active": n_active.numpy(), "sum": total.numpy(), "max": top.numpy()}
    return metrics, stats


def stats_table(sae_id: str, n_tokens: int, stats: dict[str, np.ndarray]) -> pa.Table:
    """Rows of ``sae_feature_stats`` from ``evaluate``'s per-latent sums."""
    d_sae = len(stats["n_active"])
    return pa.table(
        {
            "sae_id": [sae_id] * d_sae,
            "feature": np.arange(d_sae, dtype=np.int32),
            "n_tokens": np.full(d_sae, n_tokens, dtype=np.int64),
            **stats,
        }
    )


# --- look-ups for the dashboard -------------------------------------------------------------

METRIC_COLUMNS = ("l0", "fvu", "ce_recovered", "dead", "dead_over_tokens", "dense", "train_seconds")


def sae_table(reader: Reader) -> pd.DataFrame:
    """The catalog's SAEs with their metrics as columns, grouped for like-for-like comparison."""
    df = reader.sql("SELECT * FROM saes ORDER BY model_id, hook, k, d_sae, arch, sae_id")
    metrics = pd.DataFrame([json.loads(m or "{}") for m in df["metrics"]], index=df.index)
    metrics = metrics.reindex(columns=list(METRIC_COLUMNS))
    return pd.concat([df.drop(columns="metrics"), metrics], axis=1)


def feature_frequencies(reader: Reader) -> pd.DataFrame:
    """Per SAE and feature, from the SAE's newest run with stats: freq and log10(f + 1e-10)."""
    df = reader.sql(
        "WITH latest AS (SELECT s.sae_id, arg_max(s.run_id, r.finished_at) AS run_id"
        " FROM sae_feature_stats s JOIN runs r USING (run_id) GROUP BY s.sae_id)"
        " SELECT s.sae_id, s.feature, s.n_tokens, s.n_active, s.run_id"
        " FROM sae_feature_stats s JOIN latest USING (sae_id, run_id) ORDER BY s.sae_id, feature"
    )
    df["freq"] = df["n_active"] / df["n_tokens"].clip(lower=1)
    df["log10_freq"] = np.log10(df["freq"] + 1e-10)
    return df


def feature_runs(reader: Reader) -> pd.DataFrame:
    """Complete runs holding feature activations: run_id, sae_id, name, n_tokens."""
    return reader.sql(
        "SELECT DISTINCT a.run_id, a.sae_id, r.name, r.n_tokens, r.finished_at"
        " FROM (SELECT DISTINCT run_id, sae_id FROM sae_feature_acts) a JOIN runs r USING (run_id)"
        " ORDER BY r.finished_at DESC, a.sae_id"
    )


def feature_values(reader: Reader, run_id: str, sae_id: str, feature: int) -> pd.DataFrame:
    """Every nonzero activation of the feature in the run (seq_id, pos, value), strongest
    first (ties by seq_id, pos)."""
    return reader.sql(
        "SELECT seq_id, pos, value FROM sae_feature_acts"
        " WHERE run_id = ? AND sae_id = ? AND feature = ? ORDER BY value DESC, seq_id, pos",
        [run_id, sae_id, int(feature)],
    )


def token_features(reader: Reader, run_id: str, sae_id: str, seq_id: int, pos: int) -> pd.DataFrame:
    """The features active on one token occurrence, strongest first."""
    return reader.sql(
        "SELECT feature, value FROM sae_feature_acts"
        " WHERE run_id = ? AND sae_id = ? AND seq_id = ? AND pos = ? ORDER BY value DESC",
        [run_id, sae_id, int(seq_id), int(pos)],
    )


@torch.no_grad()
def decoder_logits(model: LoadedModel, sae: SAE, feature: int, k: int = 10) -> pd.DataFrame:
    """Tokens whose logit the feature's decoder direction raises/lowers most (direct path).

    A SAE on ``blocks.L.mlp.hook_post`` is mapped through that layer's ``W_out`` first; the
    final LayerNorm is ignored. Rows: side, rank, token_id, token, logit.
    """
    direction = sae.W_dec[feature].float()
    parts = sae.hook_name.split(".")
    if sae.hook_name.endswith("mlp.hook_post") and parts[0] == "blocks":
        direction = direction @ model.bridge.blocks[int(parts[1])].mlp.W_out.float()
    matrix, _ = unembedding(model.bridge.original_model)
    if matrix.shape[1] != direction.shape[0]:
        raise ValueError(f"hook {sae.hook_name} is not in the residual stream: no logit lens")
    logits = matrix.float() @ direction
    rows = [
        {"side": side, "rank": r, "token_id": int(i), "token": model.tokenizer.decode([int(i)])}
        | {"logit": float(v)}
        for side, (vals, ids) in (
            ("top", logits.topk(k)),
            ("bottom", logits.topk(k, largest=False)),
        )
        for r, (v, i) in enumerate(zip(vals, ids, strict=True))
    ]
    return pd.DataFrame(rows)
