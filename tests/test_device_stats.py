"""The device (torch) statistics path of MlpProbe, run on CPU tensors, against the host
(numba) path and numpy on the same activations."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from sparsescope.probes.codes import CodePolicy
from sparsescope.probes.device_stats import merge_top_k, pack_bits
from sparsescope.probes.mlp_probe import STATE, MlpProbe
from sparsescope.probes.mlp_stats import SAMPLES, WINDOW, token_hash


def _feed(probe: MlpProbe, batches: list) -> dict[str, pa.Table]:
    """Run ``batches`` [(seq_ids, gate | None, post)] per layer through the probe's hooks."""
    hooks = dict(probe.hooks())
    rows = {"layer_token_stats": [], "hash_codes": []}
    for seq_ids, layers in batches:
        probe.start_batch(seq_ids, layers[0][1].shape[1])
        for layer, (gate, post) in enumerate(layers):
            if gate is not None:
                hooks[f"blocks.{layer}.mlp.hook_pre"](gate, None)
            hooks[f"blocks.{layer}.mlp.hook_post"](post, None)
        for name, batch_rows in probe.take_rows().items():
            rows[name] += batch_rows
    probe.final_tables()
    return {name: pa.Table.from_batches(r) if r else None for name, r in rows.items()}


EXACT = (
    "n_active",
    "max",
    "top_val",
    "top_key",
    "density",
    "sample_hash",
    "sample_key",
    "sample_val",
)
# magnitudes edges of the regular density bins, built here as METHODS.md §1 states them
MAGNITUDE_EDGES = [m * 2.0**e for e in range(-10, 6) for m in (1.0, 1.5)] + [2.0**6]


def numpy_density(x: np.ndarray) -> np.ndarray:
    """Counts of the 70 density bins of ``x`` (1-D) with numpy.histogram: magnitudes of each
    sign in [0, 2^-10), the half-octaves, [2^6, inf]; then exact zeros and NaNs apart."""
    edges = [0.0, *MAGNITUDE_EDGES, np.inf]
    positive = np.histogram(x[x > 0], bins=edges)[0]
    negative = np.histogram(-x[x < 0], bins=edges)[0]
    return np.concatenate([negative[::-1], [np.sum(x == 0)], positive, [np.isnan(x).sum()]])


def numpy_bins(x: np.ndarray) -> np.ndarray:
    """The density bin of each value, by numpy searchsorted on the same edges."""
    k = np.searchsorted(MAGNITUDE_EDGES, np.abs(x), side="right")  # 0: under, 33: over
    bins = np.where(x > 0, 35 + k, 33 - k)
    return np.where(np.isnan(x), 69, np.where(x == 0, 34, bins))


def sequences(batches, layer: int) -> dict[int, np.ndarray]:
    """seq_id -> the post activations [seq_len, d] of one layer, from ``_batches``-style input."""
    out = {}
    for seq_ids, layers in batches:
        post = layers[layer][1].numpy()
        out |= {seq: post[i] for i, seq in enumerate(seq_ids)}
    return out


def check_page_state(probe: MlpProbe, batches) -> None:
    """The probe's density, top-k windows and bin samples against numpy over the inputs."""
    n_layers, d = probe.n_layers, probe.d_mlp
    for layer in range(n_layers):
        seqs = sequences(batches, layer)
        keys = np.concatenate([(seq << 24) | np.arange(len(a)) for seq, a in seqs.items()])
        acts = np.concatenate(list(seqs.values()))  # [tokens, d], rows in key order
        hashes = token_hash(keys)
        for j in range(d):
            np.testing.assert_array_equal(probe.density[layer, j], numpy_density(acts[:, j]))
            bins = numpy_bins(acts[:, j])
            for b in np.unique(bins):  # the SAMPLES smallest hashes, earlier token first
                mine = np.flatnonzero(bins == b)
                chosen = mine[np.argsort(hashes[mine], kind="stable")[:SAMPLES]]
                got = probe.sample_key[layer, j, b]
                np.testing.assert_array_equal(got[got >= 0], keys[chosen])
                np.testing.assert_array_equal(probe.sample_val[layer, j, b][: len(chosen)],
                                              acts[chosen, j])  # fmt: skip
            assert (probe.sample_key[layer, j, np.setdiff1d(np.arange(70), bins)] == -1).all()
        for j, r in zip(*np.nonzero(probe.top_key[layer] >= 0), strict=True):
            key = probe.top_key[layer, j, r]
            seq = seqs[int(key >> 24)][:, j]
            at = int(key & 0xFFFFFF) + np.arange(-WINDOW, WINDOW + 1)
            inside = (at >= 0) & (at < len(seq))
            expected = np.where(inside, seq[np.clip(at, 0, len(seq) - 1)], np.nan)
            np.testing.assert_array_equal(
                probe.top_window[layer, j, r].astype(np.float16), expected.astype(np.float16)
            )


def _batches(gated: bool, relu: bool, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out, seq = [], 0
    for b, (n_seq, seq_len) in enumerate([(4, 9), (4, 9), (3, 9), (2, 5)]):
        layers = []
        for layer in range(2):
            post = torch.randn(n_seq, seq_len, d, generator=gen) * (1 + (b + layer) % 3)
            if relu:  # many exact zeros: ties everywhere in the top-k lists
                post = (post - 1.5 * (torch.arange(d) % 3 == 0)).relu()
            gate = torch.randn(n_seq, seq_len, d, generator=gen) if gated else None
            layers.append((gate, post))
        out.append((list(range(seq, seq + n_seq)), layers))
        seq += n_seq
    return out


@pytest.mark.parametrize("codes", [CodePolicy(), CodePolicy(every=3), CodePolicy(layers=(1,))])
@pytest.mark.parametrize(("gated", "relu", "d"), [(False, True, 37), (True, False, 40)])
def test_device_path_equals_host_path(gated, relu, d, codes):
    batches = _batches(gated, relu, d)
    host = MlpProbe(2, d, gated, top_k=5, codes=codes)
    device = MlpProbe(2, d, gated, top_k=5, codes=codes, stats_device="cpu")
    host_rows, device_rows = _feed(host, batches), _feed(device, batches)
    for name in EXACT:  # exact, top-k and sample order included
        np.testing.assert_array_equal(getattr(device, name), getattr(host, name), err_msg=name)
    np.testing.assert_array_equal(device.top_window, host.top_window.astype(np.float16))
    check_page_state(host, batches)
    posts = np.stack(  # [layer, token, neuron] in float64, for the sums' independent check
        [
            np.concatenate([b[1][layer][1].reshape(-1, d).numpy() for b in batches])
            for layer in (0, 1)
        ]
    ).astype(np.float64)
    for name, exact, scale in [
        ("sum", posts.sum(1), np.abs(posts).sum(1)),
        ("sum_sq", (posts**2).sum(1), (posts**2).sum(1)),
    ]:  # 1e-6 of the summed magnitudes: the host path sums blocks of tokens in float32
        assert (np.abs(getattr(host, name) - getattr(device, name)) <= 1e-6 * scale).all()
        assert (np.abs(getattr(device, name) - exact) <= 1e-12 * scale).all()
    assert all(isinstance(getattr(device, name), np.ndarray) for name in STATE)
    h, g = host_rows["layer_token_stats"], device_rows["layer_token_stats"]
    for column in ("seq_id", "pos", "layer", "n_active", "max_abs"):
        assert g[column].equals(h[column]), column
    np.testing.assert_allclose(g["l1"].to_numpy(), h["l1"].to_numpy(), rtol=1e-6)
    assert device_rows["hash_codes"].equals(host_rows["hash_codes"])
    # and the codes kept are the policy's, with the bits numpy packs
    codes_t = host_rows["hash_codes"]
    seq = codes_t["seq_id"].to_numpy()
    assert set(codes_t["layer"].to_numpy()) == ({1} if codes.layers else {0, 1})
    assert (seq % codes.every == 0).all() and len(set(seq)) == len(range(0, 13, codes.every))
    last_seq, layers = batches[-1][0], batches[-1][1][1]
    src = (layers[0] if gated else layers[1]).reshape(-1, d).numpy() > 0
    codes_df = codes_t.to_pandas()
    mine = codes_df[(codes_df["layer"] == 1) & (codes_df["seq_id"] >= last_seq[0])]
    kept = np.repeat(np.asarray(last_seq) % codes.every == 0, 5)
    expected = np.packbits(src[kept], axis=1, bitorder="big")
    got = np.stack([np.frombuffer(c, np.uint8) for c in mine["code"]])
    np.testing.assert_array_equal(got, expected)


def test_no_codes_kept():
    probe = MlpProbe(2, 16, False, top_k=3, codes=CodePolicy(every=0), stats_device="cpu")
    rows = _feed(probe, _batches(False, True, 16))
    assert rows["hash_codes"] is None and rows["layer_token_stats"].num_rows == 2 * 109


def test_pack_bits_equals_numpy_packbits():
    rng = np.random.default_rng(3)
    for d in (1, 7, 8, 9, 64, 100):
        fires = rng.random((11, d)) < 0.4
        np.testing.assert_array_equal(
            pack_bits(torch.from_numpy(fires)).numpy(), np.packbits(fires, 1, bitorder="big")
        )


def test_merge_top_k_orders_signed_values_and_ties_like_a_stable_sort():
    rng = np.random.default_rng(4)
    k, d = 4, 6
    top_val = torch.full((d, k), float("-inf"))
    top_key = torch.full((d, k), -1, dtype=torch.int64)
    seen = []
    for b in range(5):  # values from a few levels, negative zero and infinities included
        levels = np.array([-3.5, -1.0, -0.0, 0.0, 0.25, 2.0, np.inf, -np.inf], np.float32)
        values = levels[rng.integers(0, len(levels), (7, d))]
        seen.append(values)
        keys = torch.arange(b * 7, b * 7 + 7)
        merge_top_k(top_val, top_key, torch.from_numpy(values), keys)
    every = np.concatenate(seen) + np.float32(0.0)  # -0.0 ranks as 0.0
    every[np.isneginf(every)] = np.nan  # -inf never enters a list (nor on the host path)
    order = np.argsort(-np.where(np.isnan(every), -np.inf, every), axis=0, kind="stable")[:k]
    expected_val = np.take_along_axis(every, order, 0).T
    expected_key = np.where(np.isnan(expected_val), -1, order.T)
    np.testing.assert_array_equal(top_key.numpy(), expected_key)
    np.testing.assert_array_equal(
        top_val.numpy(), np.where(np.isnan(expected_val), -np.inf, expected_val)
    )


def test_sparse_gated_firing_counts_only_computed_neurons_on_both_paths():
    """A sparsified gated MLP: a neuron fires where its gate fires and the sparse mask kept
    its activation (a ≠ 0 at hook_post)."""
    batches = _batches(gated=True, relu=False, d=24, seed=5)
    gen = torch.Generator().manual_seed(6)
    for _, layers in batches:
        for _gate, post in layers:
            post[torch.rand(post.shape, generator=gen) < 0.5] = 0.0  # the sparse mask
    host = MlpProbe(2, 24, True, top_k=3, sparse=True)
    device = MlpProbe(2, 24, True, top_k=3, sparse=True, stats_device="cpu")
    host_rows, device_rows = _feed(host, batches), _feed(device, batches)
    gates = np.concatenate([b[1][1][0].reshape(-1, 24).numpy() for b in batches])
    posts = np.concatenate([b[1][1][1].reshape(-1, 24).numpy() for b in batches])
    fires = (gates > 0) & (posts != 0)
    for probe in (host, device):
        np.testing.assert_array_equal(probe.n_active[1], fires.sum(0))
    for rows in (host_rows, device_rows):
        layer1 = rows["layer_token_stats"].filter(
            pa.compute.equal(rows["layer_token_stats"]["layer"], 1)
        )
        np.testing.assert_array_equal(layer1["n_active"].to_numpy(), fires.sum(1))


def test_density_bins_at_their_edges_on_both_paths():
    """Every bin edge, the floats either side of it, ±0, subnormals, ±inf and NaN."""
    edges = np.array(MAGNITUDE_EDGES, np.float32)
    near = np.concatenate([edges, np.nextafter(edges, 0), np.nextafter(edges, np.inf)])
    special = [0.0, -0.0, 1e-45, 1e-40, 3e38, np.inf, np.nan, 1e30, 100.0, 1e-20]
    column = np.concatenate([near, -near, special, -np.array(special)]).astype(np.float32)
    values = np.tile(column[:, None], (1, 3))  # 3 neurons, one sequence per 6 values
    values[:, 1] = values[::-1, 1]
    n_seq = len(values) // 6
    post = torch.from_numpy(values[: n_seq * 6].reshape(n_seq, 6, 3).copy())
    probes = [MlpProbe(1, 3, False, top_k=2), MlpProbe(1, 3, False, top_k=2, stats_device="cpu")]
    for probe in probes:
        _feed(probe, [(list(range(n_seq)), [(None, post)])])
    host, device = probes
    flat = post.reshape(-1, 3).numpy()
    for j in range(3):
        np.testing.assert_array_equal(host.density[0, j], numpy_density(flat[:, j]))
        np.testing.assert_array_equal(np.bincount(numpy_bins(flat[:, j]), minlength=70),
                                      numpy_density(flat[:, j]))  # fmt: skip
    for name in ("density", "sample_hash", "sample_key", "sample_val"):
        np.testing.assert_array_equal(getattr(device, name), getattr(host, name), err_msg=name)
