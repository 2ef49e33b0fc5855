"""The streaming top-k of MlpProbe, merged batch by batch, against a brute-force top-k."""

import numpy as np
import pytest
import torch

from sparsescope.probes.mlp_probe import MlpProbe


@pytest.mark.parametrize("batch", [(8, 16), (2, 5), (5, 13)])  # 128, 10 and 65 tokens
def test_streaming_top_k_equals_brute_force(batch):
    n_seq, seq_len = batch
    gen = torch.Generator().manual_seed(0)
    probe = MlpProbe(n_layers=1, d_mlp=37, gated=False, top_k=6)
    seen = []
    for b in range(12):
        probe.start_batch(list(range(b * n_seq, (b + 1) * n_seq)), seq_len)
        values = torch.randn(n_seq, seq_len, 37, generator=gen) * (1 + b % 3)
        probe._post_hook(0)(values, None)
        probe.take_rows()
        seen.append(values.reshape(-1, 37))
    everything = torch.cat(seen)  # token t of the run has seq t // seq_len, pos t % seq_len
    expected_val, expected_tok = everything.topk(6, dim=0)
    keys = probe.top_key[0]
    np.testing.assert_array_equal(probe.top_val[0], expected_val.numpy())
    tokens = (keys >> 24) * seq_len + (keys & ((1 << 24) - 1))
    np.testing.assert_array_equal(tokens, expected_tok.numpy())
