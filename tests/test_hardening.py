"""Hostile input: each defect of the hardening review as a regression test, and
property-based fuzzing (hypothesis) of the SQL console, the data readers and options."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsescope.probes import data as data_sources
from sparsescope.probes.codes import CodesError, parse_codes
from sparsescope.store.console import SqlRefused, check_statement, run_sql
from sparsescope.store.errors import StoreError
from sparsescope.store.reader import Reader
from tests.conftest import fingerprint, run_cli

SECRET = "do-not-leak-7f3a"


def _one_line(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_the_duckdb_temp_folder_of_the_cwd_is_not_readable(minilm_store, tmp_path):
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "leak.csv").write_text(f"a\n{SECRET}\n")
    for query in ("SELECT * FROM read_csv('.tmp/leak.csv')",
                  "SELECT current_setting('allowed_directories') AS d"):  # fmt: skip
        out = run_cli("sql", "--store", str(minilm_store), "--format", "json", query, cwd=tmp_path)
        assert SECRET not in out.stdout and ".tmp" not in out.stdout


def test_limits_stop_a_single_long_call_and_a_long_scan(minilm_store):
    with pytest.raises(SqlRefused, match="memory|Out of Memory"):
        run_sql(minilm_store, "SELECT length(repeat('x', 4000000000))", time_limit_s=20)
    with pytest.raises(SqlRefused, match="time limit"):
        run_sql(minilm_store, "SELECT count(*) FROM range(100000000000)", time_limit_s=1)


def test_user_text_is_never_markup(store_copy):
    out = run_cli(
        "sql", "--store", str(store_copy), "SELECT '[/x]' AS \"[/y]\", '[red]a[/red]' AS m"
    )
    assert out.returncode == 0, out.stderr
    assert "[/x]" in out.stdout and "[/y]" in out.stdout and "[red]a[/red]" in out.stdout
    import duckdb

    with duckdb.connect(str(store_copy / "catalog.duckdb")) as con:
        con.execute("UPDATE runs SET name = '[/x] [bold]b'")
    out = run_cli("runs", "--store", str(store_copy))
    assert out.returncode == 0 and "[/x] [bold]b" in out.stdout, out.stderr


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_every_result_type_prints(minilm_store, fmt):
    query = (
        "SELECT union_value(k := 1) AS u, [from_hex('00ff'), from_hex('01')] AS blobs,"
        " {'a': 1.5, 'b': NULL} AS s, 'nan'::DOUBLE AS n, INTERVAL 1 DAY AS i,"
        " 123456789012345678901234567890::HUGEINT AS h, '1.5'::DECIMAL(3,1) AS d"
    )
    out = run_cli("sql", "--store", str(minilm_store), "--format", fmt, query)
    assert out.returncode == 0, out.stderr
    assert "00ff" in out.stdout
    if fmt == "json":
        (row,) = json.loads(out.stdout)
        assert row["blobs"] == ["00ff", "01"] and row["n"] is None and row["u"] == 1


def test_query_text_that_is_not_utf8_is_refused(minilm_store):
    with pytest.raises(SqlRefused, match="UTF-8"):
        run_sql(minilm_store, "SELECT '\udcff'")
    out = run_cli("sql", "--store", str(minilm_store), "SELECT '\udcff'")  # argv bytes 0xff
    _one_line(out)


@pytest.mark.parametrize("name", ["a[/b]", "br[x]/s", "st*r"])
def test_store_paths_with_glob_characters(minilm_store, tmp_path, name):
    root = tmp_path / name
    root.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(minilm_store, root)
    for args in (["runs"], ["sql", "SELECT count(*) AS n FROM layer_summary"], ["sae", "list"]):
        out = run_cli(args[0], *args[1:], "--store", str(root))
        assert out.returncode == 0, (args, out.stderr)
    out = run_cli("sql", "--store", str(root), "--format", "json",
                  "SELECT count(*) AS n FROM layer_token_stats")  # fmt: skip
    assert json.loads(out.stdout)[0]["n"] > 0


def test_the_glob_escape_of_a_store_path_opens_no_other_folder(minilm_store, tmp_path):
    """``st[1]``'s views escape it as ``st[[]1[]]``, which is also a real folder's name:
    the console must not read that folder's files."""
    root, sibling = tmp_path / "st[1]", tmp_path / "st[[]1[]]" / "data"
    shutil.copytree(minilm_store, root)
    sibling.mkdir(parents=True)
    (sibling / "secret.txt").write_text(SECRET)
    assert run_sql(root, "SELECT count(*) AS n FROM tokens").table["n"][0].as_py() > 0
    for query in (f"SELECT * FROM read_text('{sibling}/secret.txt')",
                  f"SELECT * FROM read_text('{root}/data/../../st[[]1[]]/data/secret.txt')",
                  "SELECT * FROM read_text('data/../../st[[]1[]]/data/secret.txt')"):  # fmt: skip
        with pytest.raises(SqlRefused):
            run_sql(root, query)


def test_a_store_path_with_a_question_mark_is_refused(tmp_path):
    out = run_cli("probe", "--model", "minilm", "--store", str(tmp_path / "s?x"))
    _one_line(out)
    assert not (tmp_path / "s?x").exists()


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("deep.jsonl", '{"text": ' + "[" * 200_000 + "]" * 200_000 + "}\n", "refuses"),
        ("digits.jsonl", '{"text": "a b c", "n": ' + "9" * 5000 + "}\n", "refuses"),
        ("nul.txt", b"\x00" * 5000, "holds no text"),
        ("latin1.txt", "café\n".encode("latin-1"), "not UTF-8"),
    ],
)
def test_hostile_data_files_are_one_line_and_create_no_store(tmp_path, name, content, needle):
    path = _write(tmp_path / name, content)
    out = run_cli("probe", "--model", "minilm", "--data", str(path), "--store", str(tmp_path / "s"))
    _one_line(out)
    assert needle in out.stderr and not (tmp_path / "s").exists()


def test_a_lone_surrogate_is_replaced_not_fatal(tmp_path):
    path = _write(tmp_path / "s.jsonl", '{"text": "hello \\ud800 world, and more words"}\n')
    assert list(data_sources.documents(str(path))) == ["hello \ufffd world, and more words"]


def test_one_huge_line_reaches_the_tokenizer_in_pieces(tmp_path):
    words = [f"w{i}" for i in range(120_000)]  # about 700 kB on one line
    path = _write(tmp_path / "line.txt", " ".join(words))
    pieces = list(data_sources.documents(str(path)))
    assert len(pieces) > 5 and max(map(len, pieces)) <= data_sources.MAX_DOC_CHARS
    assert " ".join(pieces).split() == words


@pytest.mark.parametrize("content", ["", "garbage{", '{"x": 1}', '{"checkpoints": [1]}'])
def test_a_bad_zoo_manifest_is_one_line(tmp_path, content):
    (tmp_path / "zoo.json").write_text(content)
    _one_line(run_cli("zoo", "list", "--out", str(tmp_path)))


def test_a_reader_survives_gc_removing_a_dead_runs_files(store_copy):
    """The views list the files when a query starts; gc may delete a dead run's files
    after that: the reader retries on fresh views instead of failing."""
    run_id = Reader(store_copy).sql("SELECT run_id FROM runs").iloc[0, 0]
    src = store_copy / "data" / "tokens" / f"run_id={run_id}"
    dead = store_copy / "data" / "tokens" / "run_id=dead-run"
    shutil.copytree(src, dead)
    r = Reader(store_copy)  # its tokens view now lists the dead run's part too
    expected = r.sql("SELECT count(*) FROM tokens").iloc[0, 0]
    shutil.rmtree(dead)  # what gc does to a dead run's half-published folder
    assert r.sql("SELECT count(*) FROM tokens").iloc[0, 0] == expected


def test_refusal_is_fast_it_loads_no_model_library(minilm_store):
    code = (
        "import sys; from sparsescope.app import cli; "
        f"sys.argv = ['sparsescope', 'sql', '--store', {str(minilm_store)!r}, 'DROP TABLE runs']\n"
        "try:\n    cli.main()\nexcept SystemExit as e:\n    assert e.code == 2\n"
        "heavy = ('torch', 'transformers', 'transformer_lens')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_the_dashboard_listens_on_localhost_unless_told(monkeypatch, minilm_store):
    from sparsescope.app import cli

    calls = []
    monkeypatch.setattr(os, "execve", lambda exe, cmd, env: calls.append(cmd))
    cli._launch_dashboard(minilm_store, 8501, "127.0.0.1")
    cmd = calls[0]
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    out = run_cli("app", "--help")
    assert "127.0.0.1" in out.stdout


# ---- fuzzing ---------------------------------------------------------------------------

FUZZ = settings(
    max_examples=int(os.environ.get("SPARSESCOPE_FUZZ", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HOSTILE = st.sampled_from(
    ["[/x]", "[red]a[/red]", "'", '"', "\\", "\x00", "\udcff", "\u202e", "*", "?", "[", "]",
     "../", "/etc/passwd", ".tmp/leak.csv", "%s", "{}", "\n", ";", "--", "/*"]
)  # fmt: skip
TEXT = st.lists(st.one_of(HOSTILE, st.text(max_size=8)), max_size=6).map("".join)
TABLES = st.sampled_from(["runs", "models", "tokens", "layer_token_stats", "layer_summary",
                          "neuron_stats", "hash_codes", "nope"])  # fmt: skip
FILE_FUNCS = st.sampled_from(["read_csv", "read_parquet", "read_json", "read_text", "glob",
                              "read_blob", "parquet_metadata"])  # fmt: skip
CASTS = st.sampled_from(["INTEGER", "BLOB", "BIT", "VARCHAR[]", "JSON", "UNION(a INT)",
                         "STRUCT(a INT)", "HUGEINT", "DATE"])  # fmt: skip


@st.composite
def statements(draw) -> str:
    kind = draw(st.integers(0, 5))
    text = draw(TEXT).replace("'", "''")
    if kind == 0:
        return f"SELECT * FROM {draw(TABLES)} LIMIT {draw(st.integers(-2, 50))}"
    if kind == 1:
        return f"SELECT * FROM {draw(FILE_FUNCS)}('{text}')"
    if kind == 2:
        return f"SELECT '{text}'::{draw(CASTS)} AS c"
    if kind == 3:
        return f"SELECT '{text}' AS \"{draw(TEXT).replace(chr(34), '')}\""
    if kind == 4:
        return f"{draw(st.sampled_from(['COPY', 'ATTACH', 'PRAGMA', 'SET', 'INSTALL']))} {text}"
    return draw(TEXT)


@FUZZ
@given(query=statements())
def test_fuzz_check_statement_refuses_or_accepts(query):
    try:
        check_statement(query)
    except SqlRefused as err:
        assert "\n" not in str(err)


@settings(FUZZ, max_examples=max(5, FUZZ.max_examples // 4))
@given(query=statements())
def test_fuzz_run_sql_reads_nothing_outside_the_store(minilm_store, tmp_path_factory, query):
    outside = tmp_path_factory.getbasetemp() / "outside.csv"
    outside.write_text(f"a\n{SECRET}\n")
    query = query.replace("/etc/passwd", str(outside)).replace(".tmp/leak.csv", str(outside))
    before = fingerprint(minilm_store)
    try:
        result = run_sql(minilm_store, query, time_limit_s=10)
    except (SqlRefused, StoreError) as err:
        assert "\n" not in str(err)
    else:
        assert SECRET not in str(result.table.to_pylist())
    assert fingerprint(minilm_store) == before


@FUZZ
@given(
    lines=st.lists(
        st.one_of(
            st.builds(lambda t: json.dumps({"text": t}), TEXT),
            st.builds(lambda t: json.dumps({"text": t}, ensure_ascii=False), TEXT),
            TEXT,
            st.just('{"text": 5}'),
            st.just("[" * 5000),
        ),
        max_size=5,
    ),
    suffix=st.sampled_from([".jsonl", ".txt"]),
)
def test_fuzz_data_files_give_clean_documents_or_one_line(tmp_path_factory, lines, suffix):
    path = tmp_path_factory.mktemp("data") / f"d{suffix}"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    try:
        data_sources.validate(str(path))
        docs = list(data_sources.documents(str(path)))
    except data_sources.DataError as err:
        assert "\n" not in str(err)
    else:
        assert docs and all(isinstance(d, str) and d == d.strip() for d in docs)
        for doc in docs:
            doc.encode("utf-8")  # no lone surrogates reach the tokenizer
            assert "\x00" not in doc and len(doc) <= data_sources.MAX_DOC_CHARS


@FUZZ
@given(spec=st.one_of(TEXT, st.builds(lambda k, v: f"{k}:{v}", st.sampled_from(
    ["every", "layers", "all", "none", "auto", "x"]), TEXT)))  # fmt: skip
def test_fuzz_codes_specs(spec):
    try:
        policy = parse_codes(spec, 6, 1536)
    except CodesError as err:
        assert "\n" not in str(err)
    else:
        assert parse_codes(policy.spec, 6, 1536) == policy


@settings(FUZZ, max_examples=max(5, FUZZ.max_examples // 4))
@given(
    store=TEXT,
    fmt=st.one_of(st.sampled_from(["table", "json", "csv"]), TEXT),
    command=st.sampled_from([["runs"], ["sae", "list"], ["store", "gc"]]),
)
def test_fuzz_cli_store_and_format_options(tmp_path_factory, store, fmt, command):
    cwd = tmp_path_factory.mktemp("cli")
    store, fmt = store.replace("\x00", ""), fmt.replace("\x00", "")  # argv holds no NUL
    args = [*command, "--store", store or "."]
    if command == ["runs"]:
        args += ["--format", fmt or "x"]
    out = run_cli(*args, cwd=cwd)
    assert out.returncode in (0, 2) and "Traceback" not in out.stderr, out.stderr
    assert list(cwd.iterdir()) == []  # a refused command creates nothing


def test_a_corrupt_catalog_is_an_error_at_once_not_a_lock_wait(tmp_path, monkeypatch):
    """DuckDB's checksum error names a "block": that is no lock to wait for."""
    from sparsescope.store import catalog

    root = catalog.init_store(tmp_path / "s")
    path = root / catalog.CATALOG
    data = bytearray(path.read_bytes())
    data[12288 + 64 : 12288 + 4096] = os.urandom(4096 - 64)  # the first block after the headers
    path.write_bytes(bytes(data))

    def no_wait(seconds):
        raise AssertionError("waited as for a lock")

    monkeypatch.setattr(catalog.time, "sleep", no_wait)
    with pytest.raises(StoreError, match="Corrupt"):
        Reader(root)


def test_a_damaged_parquet_file_is_one_line(store_copy):
    part = next((store_copy / "data" / "tokens").glob("run_id=*/*.parquet"))
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    before = fingerprint(store_copy)
    for args in (["runs"], ["sae", "list"]):
        out = run_cli(*args, "--store", str(store_copy))
        _one_line(out)
        assert "tokens" in out.stderr and "damaged" in out.stderr
    assert fingerprint(store_copy) == before


def test_control_characters_reach_the_terminal_escaped(minilm_store, tmp_path):
    out = run_cli("sql", "--store", str(minilm_store), "SELECT chr(27) || '[31mX' AS s")
    assert out.returncode == 0 and "\x1b" not in out.stdout and "\\x1b[31mX" in out.stdout
    out = run_cli("runs", "--store", str(tmp_path / "zz\nb"))  # the path in the error
    _one_line(out)
    assert "zz\\nb" in out.stderr


def test_a_host_that_is_no_address_is_one_line(minilm_store):
    out = run_cli("app", "--store", str(minilm_store), "--host", "bad host;rm", timeout=60)
    _one_line(out)
    assert "--host" in out.stderr
