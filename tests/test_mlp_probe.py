"""MlpProbe's statistics, batch by batch, against numpy over all the tokens at once."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from sparsescope.probes.mlp_probe import STATE, MlpProbe
from sparsescope.probes.mlp_stats import neuron_columns, token_hash


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
    np.testing.assert_array_equal(
        probe.top_val[0].T, np.take_along_axis(everything, expected_tok, 0)
    )
    keys = probe.top_key[0].T
    tokens = (keys >> 24) * seq_len + (keys & ((1 << 24) - 1))
    np.testing.assert_array_equal(tokens, expected_tok)


def _layer_rows(rows: list[pa.RecordBatch], layer: int) -> pa.Table:
    return pa.Table.from_batches([r for r in rows if r["layer"][0].as_py() == layer])


def test_gated_token_rows_and_neuron_stats_equal_numpy():
    """Odd width (a partial code byte); a gated MLP fires where its gate is positive."""
    rng = np.random.default_rng(1)
    d, n_seq, seq_len = 37, 3, 11
    probe = MlpProbe(n_layers=2, d_mlp=d, gated=True, top_k=4)
    hooks = dict(probe.hooks())
    posts, gates, codes, stats = [], [], [], []
    for b in range(4):
        probe.start_batch(list(range(b * n_seq, (b + 1) * n_seq)), seq_len)
        for layer in range(2):
            gate, post = torch.from_numpy(
                rng.normal(size=(2, n_seq, seq_len, d)).astype(np.float32)
            )
            hooks[f"blocks.{layer}.mlp.hook_pre"](gate, None)
            hooks[f"blocks.{layer}.mlp.hook_post"](post, None)
        gates.append(gate.reshape(-1, d).numpy())  # layer 1's
        posts.append(post.reshape(-1, d).numpy())
        rows = probe.take_rows()
        codes.append(_layer_rows(rows["hash_codes"], 1))
        stats.append(_layer_rows(rows["layer_token_stats"], 1))
    values, fires = np.concatenate(posts), np.concatenate(gates) > 0
    codes, stats = pa.concat_tables(codes), pa.concat_tables(stats)
    packed = np.stack([np.frombuffer(c, np.uint8) for c in codes["code"].to_pylist()])
    np.testing.assert_array_equal(packed, np.packbits(fires, axis=1, bitorder="big"))
    np.testing.assert_array_equal(codes["n_active"].to_numpy(), fires.sum(1))
    np.testing.assert_array_equal(stats["n_active"].to_numpy(), fires.sum(1))
    np.testing.assert_allclose(stats["l1"].to_numpy(), np.abs(values).sum(1), rtol=1e-5)
    np.testing.assert_array_equal(stats["max_abs"].to_numpy(), np.abs(values).max(1))
    assert probe.n_tokens == len(values)
    np.testing.assert_array_equal(probe.n_active[1], fires.sum(0))
    np.testing.assert_allclose(probe.sum[1], values.sum(0, dtype=np.float64), rtol=1e-5)
    np.testing.assert_allclose(probe.sum_sq[1], (values.astype(np.float64) ** 2).sum(0), rtol=1e-5)
    np.testing.assert_array_equal(probe.max[1], values.max(0))


def test_neuron_columns_do_not_depend_on_how_the_neurons_are_cut():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(600, 150)).astype(np.float32)  # past one float32 sum block
    keys = np.arange(600, dtype=np.int64)
    hashes = token_hash(keys)
    batch = (values, values, keys, hashes, np.argsort(hashes, kind="stable"), 60)

    def run(cuts: list[int]) -> list[np.ndarray]:
        probe = MlpProbe(n_layers=1, d_mlp=150, gated=False, top_k=5)
        out = [getattr(probe, name)[0] for name in STATE]
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            neuron_columns(*batch, lo, hi, *out)
        return out

    for whole, cut in zip(run([0, 150]), run([0, 7, 70, 150]), strict=True):
        np.testing.assert_array_equal(whole, cut)
