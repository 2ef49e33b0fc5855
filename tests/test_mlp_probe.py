"""The streaming top-k of MlpProbe, merged batch by batch, against a brute-force top-k."""

import numpy as np
import pytest
import torch

from sparsescope.probes.mlp_probe import MlpProbe


@pytest.mark.parametrize("relu", [False, True])  # ReLU: many equal values (zeros)
@pytest.mark.parametrize("batch", [(8, 16), (2, 5), (5, 13)])  # 128, 10 and 65 tokens
def test_streaming_top_k_equals_brute_force(batch, relu):
    n_seq, seq_len = batch
    gen = torch.Generator().manual_seed(0)
    probe = MlpProbe(n_layers=1, d_mlp=37, gated=False, top_k=6)
    seen = []
    for b in range(12):
        probe.start_batch(list(range(b * n_seq, (b + 1) * n_seq)), seq_len)
        values = torch.randn(n_seq, seq_len, 37, generator=gen) * (1 + b % 3)
        if relu:  # and a quarter of the neurons fire on at most a few tokens
            values = (values - 2.5 * (torch.arange(37) % 4 == 0)).relu()
        probe._post_hook(0)(values, None)
        probe.take_rows()
        seen.append(values.reshape(-1, 37).numpy())
    everything = np.concatenate(seen)  # token t of the run has seq t // seq_len, pos t % seq_len
    # ties go to the earlier token, as in a stable sort
    expected_tok = np.argsort(-everything, axis=0, kind="stable")[:6]
    np.testing.assert_array_equal(probe.top_val[0], np.take_along_axis(everything, expected_tok, 0))
    keys = probe.top_key[0]
    tokens = (keys >> 24) * seq_len + (keys & ((1 << 24) - 1))
    np.testing.assert_array_equal(tokens, expected_tok)
