"""The SAE feature probe: encode the activation at a SAE's hook, record the active features.

Per batch it emits ``sae_feature_acts`` rows (one per token and nonzero feature; at most k
per token for a TopK SAE) sorted by feature, then seq_id, pos; over the run it accumulates
mergeable ``sae_feature_stats``. Position 0 (BOS/CLS) is skipped by default, as in SAE
training.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch

from sparsescope.probes.sae import SAE


class SaeProbe:
    """Streaming feature activations of one SAE (same interface as ``MlpProbe``)."""

    def __init__(
        self,
        sae: SAE,
        sae_id: str,
        device: str | torch.device = "cpu",
        skip_first: bool = True,
    ):
        self.sae = sae.to(device).eval()
        self.sae_id, self.skip_first = sae_id, skip_first
        self.n_tokens = 0
        self.n_active = torch.zeros(sae.d_sae, dtype=torch.int64, device=device)
        self.sum = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
        self.max = torch.zeros(sae.d_sae, device=device)
        self._seq = self._pos = np.zeros(0)
        self.rows: list[pa.RecordBatch] = []

    def hooks(self) -> list[tuple[str, Callable]]:
        """(hook name, callback) pairs for ``HookPoint.add_hook``; the callback changes nothing."""

        def hook(tensor, hook):
            self._observe(tensor.detach())

        return [(self.sae.hook_name, hook)]

    def start_batch(self, seq_ids: list[int], seq_len: int) -> None:
        self._seq = np.repeat(np.asarray(seq_ids, dtype=np.int64), seq_len)
        self._pos = np.tile(np.arange(seq_len, dtype=np.int32), len(seq_ids))
        keep = self._pos >= (1 if self.skip_first else 0)
        self._seq, self._pos = self._seq[keep], self._pos[keep]
        self.n_tokens += int(keep.sum())

    @torch.no_grad()
    def _observe(self, acts: torch.Tensor) -> None:
        if self.skip_first:
            acts = acts[:, 1:]
        z = self.sae.encode(acts.reshape(-1, self.sae.d_in).float())
        fired = z > 0
        self.n_active += fired.sum(0)
        self.sum += z.sum(0).double()
        self.max = torch.maximum(self.max, z.amax(0))
        tok, feature = fired.nonzero(as_tuple=True)
        values = z[tok, feature]
        # order by feature, then token (nonzero() returns token-major order; a stable sort keeps it)
        order = feature.argsort(stable=True)
        tok, feature, values = (t[order].cpu().numpy() for t in (tok, feature, values))
        self.rows.append(
            pa.record_batch(
                {
                    "sae_id": pa.array([self.sae_id] * len(tok), pa.string()),
                    "seq_id": self._seq[tok],
                    "pos": self._pos[tok],
                    "feature": feature.astype(np.int32),
                    "value": values.astype(np.float32),
                }
            )
        )

    def take_rows(self) -> dict[str, list[pa.RecordBatch]]:
        """The per-token rows gathered since the last call."""
        rows, self.rows = self.rows, []
        return {"sae_feature_acts": rows}

    def final_tables(self) -> dict[str, pa.Table]:
        return {"sae_feature_stats": self.feature_stats()}

    def feature_stats(self) -> pa.Table:
        """One row per feature: n_tokens, n_active, sum and max over the run."""
        return pa.table(
            {
                "sae_id": pa.array([self.sae_id] * self.sae.d_sae, pa.string()),
                "feature": np.arange(self.sae.d_sae, dtype=np.int32),
                "n_tokens": np.full(self.sae.d_sae, self.n_tokens, dtype=np.int64),
                "n_active": self.n_active.cpu().numpy(),
                "sum": self.sum.cpu().numpy(),
                "max": self.max.cpu().numpy(),
            }
        )
