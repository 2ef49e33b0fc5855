"""The ``sparsescope`` command line."""

from __future__ import annotations

import atexit
import gc
import os
import socket
import sys
import time
from pathlib import Path
from typing import NoReturn

import typer

from sparsescope.app.circuits_cli import circuits
from sparsescope.app.experiment_cli import experiment_app
from sparsescope.app.kernels_cli import bench_kernels, sparsify_eval
from sparsescope.app.output import FORMATS, echo_error, emit, frame
from sparsescope.app.sae_cli import sae_app
from sparsescope.app.zoo_cli import zoo_app

app = typer.Typer(
    help="SparseScope: activation sparsity, from probes to dashboard.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
store_app = typer.Typer(help="Maintain a store.", no_args_is_help=True)
bench_app = typer.Typer(
    help="Benchmarks that print ratios measured in one run.", no_args_is_help=True
)
app.add_typer(store_app, name="store")
app.add_typer(bench_app, name="bench")
app.add_typer(zoo_app, name="zoo")
app.add_typer(sae_app, name="sae")
app.add_typer(experiment_app, name="experiment")

DEFAULT_DEMO_STORE = Path("stores/demo")
DEMO_TOKENS = 100_000  # METHODS.md §3: dead neurons over at least 10^5 tokens

StoreOpt = typer.Option(..., "--store", help="Store folder (created by the first probe).")
DeviceOpt = typer.Option("auto", "--device", help="auto (cuda when present), cpu or cuda[:N].")
DtypeOpt = typer.Option(
    "auto", "--dtype", help="auto (the checkpoint's on a GPU, float32 on a CPU), float32,"
    " bfloat16 or float16.",
)  # fmt: skip
FormatOpt = typer.Option("table", "--format", help=f"One of {', '.join(FORMATS)}.")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        echo_error(f"--format must be one of {', '.join(FORMATS)}")
        raise typer.Exit(2)


@app.command()
def probe(
    model: str = typer.Option(
        ...,
        "--model",
        help="minilm, zoo:<name>\\[@step|@all], a folder, series:GLOB\\[@step] (checkpoint"
        " folders) or org/name\\[@REV[,REV...]].",  # "\\[" prints "[" (not rich markup)
    ),
    data: str = typer.Option(
        "stdlib-docs",
        "--data",
        help="stdlib-docs[:heldout]; a .txt, .jsonl or .parquet file or a datasets folder"
        " (PATH:COLUMN names the text column).",
    ),
    store: Path = StoreOpt,
    max_tokens: int = typer.Option(100_000, "--max-tokens", min=1),
    seq_len: int = typer.Option(128, "--seq-len", min=2),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    codes: str = typer.Option(
        "auto",
        "--codes",
        help="Hash codes to keep: auto (all when they fit in 2 kB/token, else every:K),"
        " all, none, every:K (every K-th sequence) or layers:L1,L2.",
    ),
    name: str = typer.Option(None, "--name", help="A name for the run."),
    sae: list[Path] = typer.Option(
        [], "--sae", help="A SAELens or sparsify SAE folder to probe too (repeatable)."
    ),
    sae_any_model: bool = typer.Option(
        False, "--sae-any-model", help="Probe SAEs whose metadata names another model."
    ),
    sparsify: str = typer.Option(
        None,
        "--sparsify",
        help="METHOD:TARGET, e.g. threshold:0.5: probe the model running sparse.",
    ),
    engine: str = typer.Option(
        "local", "--engine", help="local, or ray: shard the batches over Ray actors."
    ),
    ray_address: str = typer.Option(
        None, "--ray-address", help="Ray cluster to join (default: RAY_ADDRESS or a local one)."
    ),
    workers: int = typer.Option(
        None, "--workers", min=1, help="Ray actors (default: one per GPU, else one per node)."
    ),
):
    """Probe a model over a data set; prints the run id on its last line."""
    from sparsescope.probes.job import ProbeConfig, run_probe

    if engine not in ("local", "ray"):
        echo_error("--engine must be local or ray")
        raise typer.Exit(2)
    if engine == "local" and (ray_address or workers):
        echo_error("--ray-address and --workers need --engine ray")
        raise typer.Exit(2)
    config = ProbeConfig(
        max_tokens=max_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        codes=codes,
        saes=[str(p) for p in sae],
        sae_any_model=sae_any_model,
        sparsify=sparsify,
    )
    if engine == "local":
        run_ids = run_probe(model, data, store, config, name)
    else:
        from sparsescope.probes.ray_engine import EngineError, run_probe_ray

        try:
            run_ids = run_probe_ray(model, data, store, config, name, False, ray_address, workers)
        except EngineError as err:
            echo_error(err)
            raise typer.Exit(1) from None
    for run_id in run_ids:
        print(run_id)


@app.command()
def runs(store: Path = StoreOpt, fmt: str = FormatOpt):
    """List the runs of a store."""
    from sparsescope.store.reader import Reader

    _check_format(fmt)
    reader = Reader(store)
    emit(
        reader.sql(
            "SELECT run_id, name, kind, status, model_id, dataset, n_tokens, started_at,"
            " finished_at,"
            " error FROM runs ORDER BY started_at"
        ),
        fmt,
        title=f"runs in {store}",
    )


@app.command()
def sql(
    query: str = typer.Argument(..., help="One SELECT statement."),
    store: Path = StoreOpt,
    fmt: str = FormatOpt,
    limit: int = typer.Option(10_000, "--limit", min=1, help="Row limit."),
):
    """Run one read-only SELECT on the store (sandboxed)."""
    from sparsescope.store.console import run_sql

    _check_format(fmt)
    result = run_sql(store, query, row_limit=limit)
    emit(frame(result.table), fmt)
    if result.truncated:
        typer.echo(f"(truncated at {limit} rows)", err=True)


HostOpt = typer.Option(
    "127.0.0.1",
    "--host",
    help="Address to listen on. The dashboard has no authentication: only give 0.0.0.0 (or"
    " another interface) on a network you trust.",
)


def _launch_dashboard(store: Path, port: int, host: str) -> None:
    from sparsescope.store.catalog import check_store
    from sparsescope.store.errors import BadInput

    check_store(store)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as err:
        raise BadInput(f"--host {host!r} is not an address to listen on: {err}") from None
    script = Path(__file__).with_name("dashboard.py")
    env = {**os.environ, "SPARSESCOPE_STORE": str(store.resolve())}
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(script),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]
    typer.echo(f"dashboard on http://{host}:{port} (store {store})")
    sys.stdout.flush()
    os.execve(sys.executable, cmd, env)  # streamlit replaces this process: signals reach it


@app.command("app")
def app_cmd(
    store: Path = StoreOpt,
    port: int = typer.Option(8501, "--port", min=1, max=65535),
    host: str = HostOpt,
):
    """Start the dashboard on a store (on this machine only, unless --host says otherwise)."""
    _launch_dashboard(store, port, host)


@app.command()
def demo(
    store: Path = typer.Option(DEFAULT_DEMO_STORE, "--store"),
    no_app: bool = typer.Option(
        False, "--no-app", help="Do all the work in the foreground; do not start the dashboard."
    ),
    port: int = typer.Option(8501, "--port", min=1, max=65535),
    host: str = HostOpt,
):
    """The main job on the embedded default: MiniLM, then the dashboard while the zoo's
    sparsity laws, a SAE, sparsify evaluations and IOI circuits fill the other pages.

    Everything is cached: a second run reuses the store and resumes what is missing.
    """
    from sparsescope.app import demo as demo_steps
    from sparsescope.probes.job import ProbeConfig, run_probe
    from sparsescope.store.catalog import init_store, is_store

    start = time.perf_counter()
    if is_store(store):
        init_store(store)  # a store of an older SparseScope is upgraded first
    if not _has_run(store, "probe", "minilm", DEMO_TOKENS):
        run_probe("minilm", "stdlib-docs", store, ProbeConfig(max_tokens=DEMO_TOKENS), "demo")
    typer.echo(f"MiniLM data in {store} after {time.perf_counter() - start:.1f}s")
    if no_app:
        failed = demo_steps.run_worker(store)
        typer.echo(f"demo store {store} ready in {time.perf_counter() - start:.1f}s")
        raise typer.Exit(1 if failed else 0)
    if demo_steps.start_worker(store) is not None:
        typer.echo(f"filling the other pages in the background (logs: {demo_steps.folder(store)})")
    _launch_dashboard(store, port, host)


def _has_run(store: Path, kind: str, model_like: str | None, n_tokens: int = 0) -> bool:
    from sparsescope.store.catalog import is_store
    from sparsescope.store.reader import Reader

    if not is_store(store):
        return False
    query = (
        "SELECT 1 FROM runs WHERE status = 'complete' AND kind = ? AND coalesce(n_tokens, 0) >= ?"
    )
    params: list = [kind, n_tokens]
    if model_like is not None:
        query += " AND model_id LIKE ?"
        params.append(model_like)
    return not Reader(store).sql(query, params).empty


@app.command()
def laws(
    store: Path = StoreOpt,
    preset: str = typer.Option(
        None, "--preset", help="Zoo preset (trained if missing) (default: tiny)."
    ),
    model: str = typer.Option(
        None,
        "--model",
        help="A checkpoint series instead of the zoo: series:GLOB, org/name@REV1,REV2 or"
        " zoo:<name>@all.",
    ),
    tokens: int = typer.Option(16_384, "--tokens", min=256, help="Probe tokens per checkpoint."),
    ppl_tokens: int = typer.Option(8_192, "--ppl-tokens", min=256, help="Tokens for PPL-p%."),
):
    """Sparsity laws over the zoo or a checkpoint series: probe every checkpoint, PPL-p% and
    CETT, fit both law forms."""
    from sparsescope.analysis.zoo_laws import analyze_series, analyze_zoo

    if model and preset:
        echo_error("give --preset (the zoo) or --model (a series), not both")
        raise typer.Exit(2)
    if model:
        fits = analyze_series(store, model, tokens, ppl_tokens)
    else:
        fits = analyze_zoo(store, preset or "tiny", tokens, ppl_tokens)
    best = fits[fits["layer"] == -1].sort_values("r2", ascending=False).drop_duplicates("model")
    emit(
        best[["model", "act_fn", "form", "a0", "alpha", "r2"]].sort_values("model"),
        "table",
        title="best law per model (mean over layers)",
    )


@store_app.command("gc")
def store_gc(store: Path = StoreOpt):
    """Remove what dead jobs left behind (staging folders, unpublished shards)."""
    from sparsescope.store.gc import collect

    result = collect(store)
    typer.echo(
        f"marked {len(result['failed_runs'])} dead run(s) failed,"
        f" removed {result['removed_folders']} folder(s)"
    )


@store_app.command("upgrade")
def store_upgrade(store: Path = StoreOpt):
    """Bring a store written by an older SparseScope to this one's schema."""
    from sparsescope.store.catalog import find_store, init_store

    init_store(find_store(store))
    typer.echo(f"store {store} is up to date")


@bench_app.command("probe")
def bench_probe_cmd(
    model: str = typer.Option(
        "minilm", "--model", help="A model spec, e.g. minilm or synthetic:llama-3-8b[:layers]."
    ),
    data: str = typer.Option("stdlib-docs", "--data"),
    tokens: int = typer.Option(32_768, "--tokens", min=1),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    seq_len: int = typer.Option(128, "--seq-len", min=2),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Interleaved runs; best of each."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    codes: str = typer.Option("auto", "--codes", help="As for probe."),
    sparsify: str = typer.Option(
        None, "--sparsify", help="METHOD:TARGET: both sides run the sparsified model."
    ),
    json_out: Path = typer.Option(None, "--json", help="Also write the results to this file."),
):
    """Probe throughput (all probes, writing a store) / bare HF forward throughput, peak RSS,
    bytes stored and bytes moved to the host per token."""
    import json

    from sparsescope.probes.bench import bench_probe
    from sparsescope.probes.job import ProbeConfig, model_specs

    def report(i: int, bare_s: float, probe_s: float) -> None:
        typer.echo(f"run {i}/{repeats}: bare {bare_s:.2f} s, probe {probe_s:.2f} s")

    config = ProbeConfig(
        batch_size=batch_size,
        seq_len=seq_len,
        device=device,
        dtype=dtype,
        codes=codes,
        sparsify=sparsify,
    )
    model_specs(model, data, config)  # bad options fail before any model is loaded
    r = bench_probe(model, data, tokens, config, repeats, report)
    stored, per_run = r["stored_bytes_per_token"], r["stored_bytes_per_run"]
    sparse = f", sparsified {r['sparsify']}" if r["sparsify"] else ""
    typer.echo(
        f"{r['model']} on {r['device']} ({r['dtype']}, codes {r['codes']}{sparse}):"
        f" {r['tokens']} tokens, batches of {r['batch_size']} x {r['seq_len']}"
    )
    typer.echo(f"bare forward    : {r['bare_tok_s']:9.0f} tokens/s")
    typer.echo(f"probe (all, store): {r['probe_tok_s']:7.0f} tokens/s")
    typer.echo(f"ratio probe/bare : {r['ratio']:.3f}")
    split = r["probe_split_s"]
    typer.echo(
        f"best probe run {r['probe_s']:.2f} s (bare {r['bare_s']:.2f} s): forward"
        f" {split['forward']:.2f} s, statistics {split['statistics']:.2f} s, token rows and"
        f" store {split['rest']:.2f} s (host clock)"
    )
    typer.echo(f"peak RSS while probing: {r['peak_rss_mb']:.0f} MiB")
    typer.echo(
        f"stored per token: {sum(stored.values()):.0f} B/token ("
        + ", ".join(f"{t} {b:.0f}" for t, b in stored.items())
        + f"); moved to host: {r['host_bytes_per_token']:.0f} B/token"
    )
    typer.echo(
        f"stored per run: {sum(per_run.values()) / 2**20:.1f} MiB, whatever its length ("
        + ", ".join(f"{t} {b / 2**20:.1f}" for t, b in per_run.items())
        + f"); {sum(per_run.values()) / r['tokens']:.0f} B/token at this run's length"
    )
    if json_out is not None:
        json_out.write_text(json.dumps(r, indent=1))


@bench_app.command("store")
def bench_store_cmd(
    model: str = typer.Option("synthetic:pythia-14m", "--model", help="The model to probe."),
    tokens: int = typer.Option(
        1_700_000, "--tokens", min=1, help="Tokens to probe (x layers = token-layer rows)."
    ),
    repeats: int = typer.Option(5, "--repeats", min=2, help="Renders and runs per item."),
    store: Path = typer.Option(
        None, "--store", help="Keep the store here (reused when it exists) (default: temporary)."
    ),
    json_out: Path = typer.Option(None, "--json", help="Also write the results to this file."),
):
    """Dashboard-page and README-recipe latency (p50/p95) on a store of 10^7 token-layer rows."""
    import json

    from sparsescope.app.bench_store import bench_store

    def report(kind: str, row: dict) -> None:
        if kind == "page":
            typer.echo(
                f"page {row['page']:<15} {row['queries']:3d} queries: p50"
                f" {row['queries_p50_s']:.3f} s, p95 {row['queries_p95_s']:.3f} s"
                f" (slowest query p95 {row['slowest_p95_s']:.3f} s;"
                f" render p95 {row['render_p95_s']:.2f} s)"
            )
        elif kind == "recipe":
            typer.echo(
                f"recipe {row['recipe']:2d} p50 {row['p50']:.3f} s, p95 {row['p95']:.3f} s,"
                f" {row['rows']} rows: {row['query']}"
            )
        else:
            typer.echo(f"{kind}: {row}")

    result = bench_store(model, tokens, repeats, store, report)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))


app.command("sparsify-eval")(sparsify_eval)
app.command()(circuits)
bench_app.command("kernels")(bench_kernels)


def main() -> None:
    """The console entry point: bad input of every command (``BadInput``; unreadable files)
    and bad options (a value out of range, a missing option) get one line ``error: ...``
    and exit code 2."""
    from sparsescope.store.errors import BadInput

    try:
        code = app(standalone_mode=False)
    except (BadInput, OSError) as err:  # every command's bad input, in one place
        echo_error(err)
        code = 2
    except typer.Abort:
        typer.echo("aborted", err=True)
        code = 1
    except typer.TyperException as err:  # click's usage errors
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        if message.strip():  # empty when the help was shown for a bare command group
            echo_error(message)
        code = getattr(err, "exit_code", 2)
    sys.exit(code if isinstance(code, int) else 0)


def console() -> NoReturn:
    """``sparsescope`` as a program: ``main`` with two changes to the interpreter's garbage
    collection, which after a model job cost a quarter of a short one (2.2 s of 7 s).

    - The collector's first threshold is raised: importing the model libraries makes
      millions of objects, and at the default thresholds the collections over them took
      0.9 s of the imports.
    - The exit runs the exit handlers (``atexit``: Ray, logging, thread pools, temporary
      folders), flushes the output and ends the process, without the interpreter's
      teardown: its final collection over those objects took 1.3 s.
    """
    gc.set_threshold(100_000, 50, 50)
    code = 0
    try:
        main()
    except SystemExit as done:  # main ends every command here, with an int code
        code = done.code
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console()
