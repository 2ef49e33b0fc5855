"""Hamming top-10 search in SQL over >= 1M stored hash codes.

Codes are sampled, bit by bit, at the per-neuron firing rates of a real MiniLM probe run
(``neuron_stats`` of a small probe; bits independent given the rates); probing 1M+
token×layer codes of real MiniLM would take minutes of a shared 2-core CPU. They are
written through RunWriter into a temporary store, then ``nearest_codes`` is timed.
Usage: ``python benchmarks/bench_hamming.py [--codes 1200000] [--layers 6]``
(``--layers 1 --codes 1000000``: one layer's search scans 1M codes).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from sparsescope.probes.activity import code64, pack_codes
from sparsescope.probes.job import ProbeConfig, run_probe
from sparsescope.store.hamming import nearest_codes
from sparsescope.store.reader import Reader
from sparsescope.store.writer import RunWriter

SEQ_LEN = 128
CHUNK_TOKENS = 16_384


def firing_rates(root: Path, tokens: int) -> np.ndarray:
    """Per (layer, neuron) firing frequency of MiniLM over ``tokens`` stdlib-docs tokens."""
    run_probe("minilm", "stdlib-docs", root, ProbeConfig(max_tokens=tokens), "rates", quiet=True)
    df = Reader(root).sql("SELECT layer, neuron, n_active / n_tokens AS f FROM neuron_stats")
    rates = np.zeros((df["layer"].max() + 1, df["neuron"].max() + 1), np.float32)
    rates[df["layer"], df["neuron"]] = df["f"]
    return rates


def write_codes(root: Path, rates: np.ndarray, n_codes: int) -> str:
    """A run of sampled codes: n_codes // n_layers tokens × every layer."""
    n_layers = rates.shape[0]
    n_tokens = -(-n_codes // n_layers)
    gen = torch.Generator().manual_seed(0)
    with RunWriter(root, "probe", "minilm-sampled", "sampled", {"n_codes": n_codes}) as w:
        for start in range(0, n_tokens, CHUNK_TOKENS):
            idx = np.arange(start, min(start + CHUNK_TOKENS, n_tokens))
            seq, pos = idx // SEQ_LEN, (idx % SEQ_LEN).astype(np.int32)
            w.write(
                "tokens", {"seq_id": seq, "pos": pos, "token_id": pos, "token": pos.astype(str)}
            )
            for layer in range(n_layers):
                draw = torch.rand(len(idx), rates.shape[1], generator=gen)
                fires = (draw < torch.from_numpy(rates[layer])).numpy()
                packed = pack_codes(fires)
                w.write(
                    "hash_codes",
                    {
                        "seq_id": seq,
                        "pos": pos,
                        "layer": np.full(len(idx), layer, np.int16),
                        "code": pa.FixedSizeBinaryArray.from_buffers(
                            pa.binary(packed.shape[1]), len(packed), [None, pa.py_buffer(packed)]
                        ).cast(pa.binary()),
                        "code64": code64(packed),
                        "n_active": fires.sum(1).astype(np.int32),
                    },
                )
        return w.commit(n_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, default=1_200_000)
    parser.add_argument("--layers", type=int, default=6, help="MiniLM layers to sample (1-6).")
    parser.add_argument("--probe-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rates = firing_rates(Path(tmp) / "rates", args.probe_tokens)[: args.layers]
        root = Path(tmp) / "bench"
        start = time.perf_counter()
        run_id = write_codes(root, rates, args.codes)
        print(f"wrote {args.codes:,} sampled MiniLM codes in {time.perf_counter() - start:.1f}s")
        reader = Reader(root)
        n = reader.sql("SELECT count(*) AS n FROM hash_codes")["n"][0]
        print(f"stored codes: {n:,} ({rates.shape[0]} layers × {rates.shape[1]} bits)")
        for layer, label in ((rates.shape[0] - 1, "one layer"), (None, "whole model")):
            scanned = n // rates.shape[0] if layer is not None else n
            times = []
            for i in range(args.repeats + 1):
                t0 = time.perf_counter()
                nearest_codes(reader, run_id, layer, seq_id=i, pos=7, k=10)
                times.append(time.perf_counter() - t0)
            print(
                f"top-10 Hamming, {label}, {scanned:,} codes scanned: first {times[0]:.3f}s,"
                f" median of {args.repeats} {statistics.median(times[1:]):.3f}s"
            )


if __name__ == "__main__":
    main()
