"""The CLI: happy paths and bad input (one-line error, non-zero exit, store untouched)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import fingerprint, run_cli


def _one_line_error(result, *needles: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_runs_and_sql_formats(minilm_store):
    runs = run_cli("runs", "--store", str(minilm_store), "--format", "json")
    assert runs.returncode == 0, runs.stderr
    (run,) = json.loads(runs.stdout)
    assert run["status"] == "complete" and run["model_id"] == "minilm"
    csv = run_cli(
        "sql",
        "--store",
        str(minilm_store),
        "--format",
        "csv",
        "SELECT layer, count(*) AS n FROM layer_token_stats GROUP BY layer ORDER BY layer",
    )
    assert csv.returncode == 0, csv.stderr
    lines = csv.stdout.strip().splitlines()
    assert lines[0] == "layer,n" and len(lines) == 7
    table = run_cli("sql", "--store", str(minilm_store), "SELECT 42 AS answer")
    assert table.returncode == 0 and "42" in table.stdout


@pytest.mark.parametrize(
    "query, needle",
    [
        ("DROP TABLE runs", "only SELECT"),
        ("SELECT * FROM read_csv('/etc/passwd')", "Permission"),
        ("SELECT 1; SELECT 2", "exactly one statement"),
        ("SET enable_external_access = true", "only SELECT"),
        ("COPY tokens TO '/tmp/out.csv'", "only SELECT"),
        ("SELEC 1", "does not parse"),
        ("SELECT * FROM no_such_table", "no_such_table"),
    ],
)
def test_sql_refusals_exit_2_and_leave_store_unchanged(store_copy, query, needle):
    before = fingerprint(store_copy)
    result = run_cli("sql", "--store", str(store_copy), query)
    assert result.returncode == 2
    _one_line_error(result, needle)
    assert fingerprint(store_copy) == before


def test_every_readme_query_runs_on_a_store(minilm_store):
    """The README's SQL runs in the sandbox; its first query equals numpy on the probe's rows."""
    from sparsescope.app.bench_store import README, readme_queries
    from sparsescope.probes.mlp_stats import bin_bounds
    from sparsescope.store.console import run_sql
    from sparsescope.store.reader import Reader

    queries = readme_queries(README.read_text())
    assert len(queries) >= 8
    results = [run_sql(minilm_store, q.rstrip(";")).table.to_pandas() for q in queries]
    ratio = results[0]
    assert "FROM layer_summary" in queries[0] and len(ratio) == 6
    n_active = Reader(minilm_store).sql("SELECT layer, n_active FROM layer_token_stats")
    expected = n_active.groupby("layer")["n_active"].mean().to_numpy() / 1536
    np.testing.assert_allclose(ratio.sort_values("layer")["activation_ratio"], expected)
    (density,) = [r for q, r in zip(queries, results, strict=True) if "FROM neuron_density" in q]
    n_tokens = Reader(minilm_store).sql("SELECT count(*) FROM tokens").iloc[0, 0]
    assert density["count"].sum() == n_tokens  # every token in one bin
    assert (density["sample_values"].map(len) <= 2).all()
    lower, upper = bin_bounds()
    for b, values in zip(density["bin"], density["sample_values"], strict=True):
        assert all(lower[b] <= v <= upper[b] for v in values), (b, values)


def test_sql_row_and_time_limits(minilm_store):
    from sparsescope.store.console import SqlRefused, run_sql

    result = run_sql(minilm_store, "SELECT * FROM range(100)", row_limit=10)
    assert result.table.num_rows == 10 and result.truncated
    with pytest.raises(SqlRefused, match="time limit"):
        run_sql(
            minilm_store,
            "SELECT sum(a.range * b.range) FROM range(300000) a, range(300000) b",
            time_limit_s=0.5,
        )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["probe", "--model", "minilm", "--max-tokens", "0"], "Invalid value for '--max-tokens'"),
        (["experiment", "hash-encoder", "--seed", "-1"], "Invalid value for '--seed'"),
        (["app", "--port", "99999"], "Invalid value for '--port'"),
        (["bench", "kernels", "--device", "tpu"], "--device 'tpu'"),
        (["bench", "kernels", "--from-json", "{numbers}"], "non-empty JSON list of row objects"),
        (["circuits", "--model", "minilm", "--n", "2"], "'minilm' is not a causal LM"),
        (["sae", "train", "--model", "minilm", "--hook", "blocks.1.hook_resid_post", "--lr", "-1"],
         "--lr -1.0 must be a positive number"),
        (["sae", "train", "--model", "minilm", "--hook", "blocks.1.hook_resid_post", "--out",
          "{file}"], "is a file, not a folder"),
    ],
)  # fmt: skip
def test_bad_option_values_are_one_line_errors(store_copy, tmp_path, args, needle):
    (tmp_path / "numbers.json").write_text("[1, 2]")
    (tmp_path / "file").write_text("")
    paths = {"numbers": tmp_path / "numbers.json", "file": tmp_path / "file"}
    args = [a.format(**paths) for a in args]
    before = fingerprint(store_copy)
    result = run_cli(*args, "--store", str(store_copy))
    assert result.returncode == 2
    _one_line_error(result, needle)
    assert fingerprint(store_copy) == before


def test_sql_prints_blobs_as_hex_and_lists(minilm_store):
    from sparsescope.store.reader import Reader

    query = "SELECT code, [1, 2] AS pair FROM hash_codes ORDER BY seq_id, pos, layer LIMIT 1"
    (code,) = Reader(minilm_store).sql(query)["code"]
    for fmt in ("json", "table", "csv"):
        result = run_cli("sql", "--store", str(minilm_store), "--format", fmt, query)
        assert result.returncode == 0, result.stderr
        if fmt == "json":
            (row,) = json.loads(result.stdout)
            assert row == {"code": bytes(code).hex(), "pair": [1, 2]}
        elif fmt == "csv":
            assert bytes(code).hex() in result.stdout


def test_missing_model(store_copy):
    before = fingerprint(store_copy)
    result = run_cli("probe", "--model", "/nowhere/model", "--store", str(store_copy))
    _one_line_error(result, "/nowhere/model", "not found")
    assert fingerprint(store_copy) == before


def test_empty_data_file(store_copy, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    before = fingerprint(store_copy)
    result = run_cli("probe", "--model", "minilm", "--data", str(empty), "--store", str(store_copy))
    _one_line_error(result, "empty.txt", "no text")
    assert fingerprint(store_copy) == before


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"text": "fine"}\n{not json}\n', ":2: not valid JSON"),
        (
            '{"text": "fine"}\n{"body": "no text field"}\n',
            ':2: each line needs a string field "text"',
        ),
    ],
)
def test_malformed_jsonl(store_copy, tmp_path, content, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    before = fingerprint(store_copy)
    result = run_cli("probe", "--model", "minilm", "--data", str(bad), "--store", str(store_copy))
    _one_line_error(result, needle)
    assert fingerprint(store_copy) == before


def test_missing_data_file(store_copy, tmp_path):
    result = run_cli(
        "probe",
        "--model",
        "minilm",
        "--data",
        str(tmp_path / "nope.txt"),
        "--store",
        str(store_copy),
    )
    _one_line_error(result, "nope.txt", "not found")


@pytest.mark.parametrize("command", [["runs"], ["sql", "SELECT 1"], ["store", "gc"]])
def test_store_path_that_is_not_a_store(tmp_path, command):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a store")
    before = fingerprint(junk)
    result = run_cli(*command, "--store", str(junk))
    _one_line_error(result, "not a SparseScope store")
    assert fingerprint(junk) == before


@pytest.mark.parametrize("catalog", ["foreign", "corrupt"])
@pytest.mark.parametrize(
    "command",
    [["runs"], ["sql", "SELECT 1"], ["store", "gc"], ["sae", "list"],
     ["probe", "--model", "minilm", "--max-tokens", "64"]],
)  # fmt: skip
def test_a_catalog_that_is_not_ours_is_refused(tmp_path, catalog, command):
    """A DuckDB file with other tables, or a file that is not DuckDB, named catalog.duckdb."""
    import duckdb

    folder = tmp_path / "f"
    folder.mkdir()
    if catalog == "foreign":
        with duckdb.connect(str(folder / "catalog.duckdb")) as con:
            con.execute("CREATE TABLE x (a INTEGER)")
    else:
        (folder / "catalog.duckdb").write_text("not a database")
    before = fingerprint(folder)
    result = run_cli(*command, "--store", str(folder))
    _one_line_error(result, "not a SparseScope store")
    assert fingerprint(folder) == before


def test_probe_refuses_a_non_empty_folder_that_is_not_a_store(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("keep me")
    before = fingerprint(junk)
    result = run_cli("probe", "--model", "minilm", "--store", str(junk), "--max-tokens", "64")
    _one_line_error(result, "not empty")
    assert fingerprint(junk) == before and list(before) == ["notes.txt"]


def test_probe_txt_and_jsonl_files(tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_text("The first document.\n\nThe second one, after a blank line.\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "alpha beta gamma"}\n{"text": "delta epsilon"}\n')
    store = tmp_path / "store"
    for data in (txt, jsonl):
        result = run_cli(
            "probe",
            "--model",
            "minilm",
            "--data",
            str(data),
            "--store",
            str(store),
            "--name",
            data.suffix,
        )
        assert result.returncode == 0, result.stderr
    runs = json.loads(run_cli("runs", "--store", str(store), "--format", "json").stdout)
    assert [r["name"] for r in runs] == [".txt", ".jsonl"]
    assert all(r["status"] == "complete" and r["n_tokens"] > 5 for r in runs)
    gc = run_cli("store", "gc", "--store", str(store))
    assert gc.returncode == 0 and "0 dead run(s)" in gc.stdout


def test_the_program_runs_exit_handlers_and_keeps_its_exit_code(tmp_path):
    """``console`` skips the interpreter's teardown, not the exit handlers or the output."""
    code = (
        "import atexit, sys\n"
        "from sparsescope.app import cli\n"
        "atexit.register(lambda: print('handler ran'))\n"
        "print('before', end='')\n"  # unflushed output must still come out
        f"sys.argv = ['sparsescope', 'runs', '--store', {str(tmp_path / 'none')!r}]\n"
        "cli.console()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == "beforehandler ran\n"
    assert out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1


def test_a_dense_probe_job_does_not_load_triton():
    code = "import sys, sparsescope.probes.job; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_help_texts_survive_rich_markup():
    """Typer renders help through rich, which drops ``[...]`` it reads as markup tags
    (a "[default: tiny]" vanished from ``laws --help``): every help text prints as written,
    with ``\\[`` for a literal bracket where rich would see a tag."""
    import click
    import typer
    from rich.text import Text

    from sparsescope.app.cli import app

    def commands(cmd: click.Command, path: str):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from commands(sub, f"{path} {name}")

    seen = 0
    for path, cmd in commands(typer.main.get_command(app), "sparsescope"):
        for text in [cmd.help] + [getattr(p, "help", None) for p in cmd.params]:
            if text:
                seen += 1
                assert Text.from_markup(text).plain == text.replace("\\[", "["), f"{path}: {text!r}"
    assert seen > 50
