"""Throughput of the Ray engine (1 and 2 workers) against the local engine, same data.

Every configuration probes MiniLM over stdlib-docs twice into fresh stores: a small run
(two batches) and the full run. The small run's wall time is the fixed cost of a run
(model load, and for Ray the actors' start-up and their first read of the corpus;
the driver's is warmed up by an untimed run); the difference between the two is the
steady state. Ray's cluster start-up (``ray.init``) is timed on its own.
Usage: ``python benchmarks/bench_ray.py [--tokens 16384] [--seq-len 128] [--batch-size 16]``
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray

from sparsescope.probes.job import ProbeConfig, run_probe
from sparsescope.probes.ray_engine import run_probe_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    small_tokens = 2 * args.seq_len * args.batch_size
    configs = {
        n: ProbeConfig(max_tokens=n, seq_len=args.seq_len, batch_size=args.batch_size)
        for n in (small_tokens, args.tokens)
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    engines = {"local": lambda cfg, root: run_probe("minilm", "stdlib-docs", root, cfg, quiet=True)}
    for workers in (1, 2):
        engines[f"ray x{workers}"] = lambda cfg, root, w=workers: run_probe_ray(
            "minilm", "stdlib-docs", root, cfg, quiet=True, workers=w
        )
    engines["local"](configs[small_tokens], tmp / "warm-up")  # parse the corpus, warm caches
    rows = {}
    for name, engine in engines.items():
        if name.startswith("ray") and not ray.is_initialized():
            start = time.perf_counter()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
            init_s = time.perf_counter() - start
            print(f"ray.init (local cluster, {os.cpu_count()} CPUs): {init_s:.1f}s")
        rows[name] = []
        for n, cfg in configs.items():
            start = time.perf_counter()
            engine(cfg, tmp / f"{name}-{n}".replace(" ", ""))
            rows[name].append(time.perf_counter() - start)
    ray.shutdown()
    base = args.tokens / rows["local"][1]
    steady_base = (args.tokens - small_tokens) / (rows["local"][1] - rows["local"][0])
    print(
        f"\n{args.tokens} tokens, seq_len {args.seq_len}, batch {args.batch_size};"
        f" fixed cost = wall time of a {small_tokens}-token run\n"
    )
    header = ("engine", "fixed s", "wall s", "tok/s", "ratio", "steady", "ratio")
    print("{:<8} {:>8} {:>7} {:>7} {:>6} {:>7} {:>6}".format(*header))
    for name, (small, full) in rows.items():
        rate = args.tokens / full
        steady = (args.tokens - small_tokens) / (full - small)
        print(
            f"{name:<8} {small:>8.1f} {full:>7.1f} {rate:>7.0f} {rate / base:>6.2f}"
            f" {steady:>7.0f} {steady / steady_base:>6.2f}"
        )


if __name__ == "__main__":
    main()
