"""The user's prompt pairs as a circuits task: JSONL validation, and a CLI run of a random
GPT-2 whose stored baselines and patching scores are recomputed with plain HF forward hooks."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path

import pytest
import torch
import typer
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from sparsescope.analysis import tasks
from sparsescope.app.circuits_cli import circuits
from sparsescope.probes.tokenizer import train_tokenizer
from sparsescope.store.errors import BadInput
from sparsescope.store.reader import Reader
from tests.conftest import fingerprint

TEMPLATE = "Then {A} met {B} at the {P}, and then {A} left. Later {B} saw"


@pytest.fixture(scope="module")
def tokenizer():
    docs = list(itertools.islice(tasks.ioi_training_docs(0), 4000))
    return train_tokenizer(docs, 2048, 64)


def _records(tokenizer, n: int, seed: int = 0) -> list[dict]:
    """``n`` pairs: the answer is the first name; the corrupted prompt has two other names."""
    names = tasks.single_tokens(tokenizer, tasks.split_names("test"))
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b, c, d = rng.sample(names, 4)
        place = tasks.PLACES[i % 3]
        out.append(
            {
                "id": f"pair-{i}",  # other keys are ignored
                "clean": TEMPLATE.format(A=a, B=b, P=place),
                "corrupted": TEMPLATE.format(A=c, B=d, P=place),
                "answer": " " + a,
                "wrong": " " + b,
            }
        )
    return out


def _write(path, lines) -> str:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_jsonl_task_is_bos_then_prompt_tokens(tokenizer, tmp_path):
    records = _records(tokenizer, 5)
    path = tmp_path / "my-pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n" +
                    "\n".join(json.dumps(r) for r in records[2:]) + "\n")  # fmt: skip
    task = tasks.from_jsonl(path, tokenizer)
    bos = tokenizer.bos_token_id
    assert bos is not None and task.name == "my-pairs"
    assert task.clean.tolist() == [[bos, *_ids(tokenizer, r["clean"])] for r in records]
    assert task.corrupted.tolist() == [[bos, *_ids(tokenizer, r["corrupted"])] for r in records]
    assert task.answers.tolist() == [
        [_ids(tokenizer, r["answer"])[0], _ids(tokenizer, r["wrong"])[0]] for r in records
    ]
    assert task.pos_labels[0] == "BOS" and "".join(task.pos_labels[1:]) == records[0]["clean"]
    assert task.info == {
        "task_file": str(path.resolve()),
        "task_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    first = tasks.make_task(str(path), tokenizer, n=3)
    assert torch.equal(first.clean, task.clean[:3]) and first.name == "my-pairs"
    same = tasks.from_records(tokenizer, records, name="mine")
    assert same.name == "mine" and torch.equal(same.corrupted, task.corrupted)


def test_readme_example_pair_is_a_valid_task_line(tokenizer, tmp_path):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    (block,) = [b.split("```")[0] for b in text.split("```jsonl\n")[1:]]
    path = _write(tmp_path / "readme.jsonl", [block.strip(), block.strip()])
    task = tasks.from_jsonl(path, tokenizer)
    record = json.loads(block)
    assert task.answers[0].tolist() == [_ids(tokenizer, record[k])[0] for k in ("answer", "wrong")]


def _cases(tokenizer):
    """(lines, expected message part) for every rule."""
    good, other = _records(tokenizer, 2)
    multi = " Mary John"
    longer = good["corrupted"] + " again"
    n_clean, n_long = 1 + len(_ids(tokenizer, good["clean"])), 1 + len(_ids(tokenizer, longer))
    short = _records(tokenizer, 1, seed=9)[0] | {
        "clean": "Then Mary saw",
        "corrupted": "Then Ann saw",
    }
    return [
        ([good, '{"clean": "x",'], "line 2: not JSON"),
        ([good, "[1, 2]"], "line 2: a prompt pair is a JSON object, not list"),
        ([good, {k: v for k, v in other.items() if k != "wrong"}], "line 2: missing field 'wrong'"),
        ([good, other | {"answer": 3}], "line 2: field 'answer' must be a string, not int"),
        ([good, other | {"clean": "  "}], "line 2: 'clean' is an empty prompt"),
        (
            [good, other | {"answer": multi}],
            f"line 2: 'answer' ' Mary John' is {len(_ids(tokenizer, multi))} tokens",
        ),
        ([good, other | {"wrong": other["answer"]}], "line 2: 'answer' and 'wrong' are the same"),
        (
            [good, good | {"corrupted": longer}],
            f"line 2: 'clean' is {n_clean} tokens and 'corrupted' {n_long}",
        ),
        (
            [good, other, short],
            f"line 3: prompts are {1 + len(_ids(tokenizer, short['clean']))} tokens, those of"
            f" line 1 {n_clean}",
        ),
        ([good, other | {"clean": "Then \x1b[31mMary"}], "line 2: 'clean' holds control char"),
        ([good, other | {"wrong": " Mary\x00"}], "U+0000"),
        ([good], "one prompt pair; a task needs at least 2"),
        ([], "no prompt pairs"),
        (["", "   "], "no prompt pairs"),
        (
            [good | {"corrupted": good["clean"]}, other | {"corrupted": other["clean"]}],
            "every corrupted prompt equals its clean",
        ),
        (
            [good] * (tasks.MAX_PAIRS + 1),
            f"line {tasks.MAX_PAIRS + 1}: pair {tasks.MAX_PAIRS + 1},",
        ),
    ]


def test_bad_files_get_one_line_naming_file_and_line(tokenizer, tmp_path):
    for i, (lines, expected) in enumerate(_cases(tokenizer)):
        path = _write(tmp_path / f"case{i}.jsonl", lines)
        with pytest.raises(tasks.TaskError) as err:
            tasks.from_jsonl(path, tokenizer)
        message = str(err.value)
        assert isinstance(err.value, BadInput) and "\n" not in message, message
        assert message.startswith(path) and expected in message, (expected, message)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"clean": "a"}\n{"clean": "caf\xe9"}\n')
    with pytest.raises(tasks.TaskError, match=r"latin1.jsonl line 2: not UTF-8"):
        tasks.from_jsonl(bad, tokenizer)
    huge = tmp_path / "huge.jsonl"
    with huge.open("wb") as f:
        f.truncate(tasks.MAX_FILE_BYTES + 1)
    with pytest.raises(tasks.TaskError, match="over 16 MiB"):
        tasks.from_jsonl(huge, tokenizer)
    with pytest.raises(tasks.TaskError, match="not found"):
        tasks.make_task(str(tmp_path / "missing.jsonl"), tokenizer)
    with pytest.raises(tasks.TaskError, match="record 2: missing field 'clean'"):
        tasks.from_records(tokenizer, [_records(tokenizer, 1)[0], {}])


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=64,
        activation_function="gelu_new", initializer_range=0.3,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("model")
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _cli(*args: str):
    app = typer.Typer()
    app.command()(circuits)
    return CliRunner().invoke(app, list(args))


def _hf_lds(hf, ids, answers, module=None, fn=None) -> torch.Tensor:
    """LD at the last position from plain HF; ``fn`` rewrites ``module``'s output."""
    handle = module.register_forward_hook(lambda m, i, out: fn(out)) if module else None
    with torch.no_grad():
        last = hf(ids).logits[:, -1]
    if handle is not None:
        handle.remove()
    rows = torch.arange(len(ids))
    return last[rows, answers[:, 0]] - last[rows, answers[:, 1]]


def test_cli_file_task_matches_plain_hf(tokenizer, model_dir, tmp_path):
    records = _records(tokenizer, 6, seed=1)
    path = _write(tmp_path / "meets.jsonl", records)
    store = tmp_path / "store"
    result = _cli("--model", str(model_dir), "--store", str(store), "--task", path)
    assert result.exit_code == 0, result.output
    r = Reader(store)
    runs = r.sql("SELECT dataset, config FROM runs WHERE kind = 'circuits'")
    assert runs["dataset"].tolist() == ["meets"]
    config = json.loads(runs["config"][0])
    assert config["task"] == "meets" and config["n"] == 6
    assert config["task_file"] == str((tmp_path / "meets.jsonl").resolve())
    assert "split" not in config and "seed" not in config

    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    bos = [tokenizer.bos_token_id]
    clean = torch.tensor([bos + _ids(tokenizer, rec["clean"]) for rec in records])
    corr = torch.tensor([bos + _ids(tokenizer, rec["corrupted"]) for rec in records])
    answers = torch.tensor([[_ids(tokenizer, rec[k])[0] for k in ("answer", "wrong")]
                            for rec in records])  # fmt: skip
    ld_clean = float(_hf_lds(hf, clean, answers).mean())
    ld_corr = float(_hf_lds(hf, corr, answers).mean())
    assert config["ld_clean"] == pytest.approx(ld_clean, abs=1e-4)
    assert config["ld_corr"] == pytest.approx(ld_corr, abs=1e-4)

    scores = r.sql(
        "SELECT site, layer, pos, score FROM patching_scores WHERE method = 'activation'"
    )
    last = clean.shape[1] - 1
    differ = int((clean != corr).any(0).nonzero()[0])  # the first name
    for site, layer, pos in [("mlp_out", 1, last), ("attn_out", 0, differ), ("mlp_out", 0, differ)]:
        block = hf.transformer.h[layer]
        module = block.mlp if site == "mlp_out" else block.attn
        seen = []
        handle = module.register_forward_hook(lambda m, i, out, seen=seen: seen.append(out))
        with torch.no_grad():
            hf(clean)
        handle.remove()

        def put(out, ref=seen[0], pos=pos):
            head, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
            head = head.clone()
            head[:, pos] = (ref[0] if rest is not None else ref)[:, pos]
            return head if rest is None else (head, *rest)

        patched = float(_hf_lds(hf, corr, answers, module, put).mean())
        expected = (patched - ld_corr) / (ld_clean - ld_corr)
        row = scores[(scores["site"] == site) & (scores["layer"] == layer) & (scores["pos"] == pos)]
        assert float(row["score"].iloc[0]) == pytest.approx(expected, abs=1e-4), (site, layer, pos)


def test_cli_bad_file_is_one_line_and_leaves_store(tokenizer, model_dir, tmp_path):
    good, other = _records(tokenizer, 2)
    path = _write(tmp_path / "bad.jsonl", [good, other | {"answer": " Mary John"}])
    store = tmp_path / "store"
    before = fingerprint(store)
    result = _cli("--model", str(model_dir), "--store", str(store), "--task", path)
    assert result.exit_code == 2 and f"error: {path} line 2: 'answer'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and fingerprint(store) == before
    # a pair set whose clean and corrupted mean LDs are equal leaves M undefined
    swapped = good | {"clean": good["corrupted"], "corrupted": good["clean"]}
    path = _write(tmp_path / "flat.jsonl", [good, swapped])
    result = _cli("--model", str(model_dir), "--store", str(store), "--task", path)
    assert result.exit_code == 2 and "normalised metric is undefined" in result.output
    long = [r | {k: r[k] + " " + r[k] for k in ("clean", "corrupted")} for r in (good, other)]
    result = _cli("--model", str(model_dir), "--store", str(store), "--task",
                  _write(tmp_path / "long.jsonl", long))  # fmt: skip
    n_long = 1 + len(_ids(tokenizer, long[0]["clean"]))
    assert result.exit_code == 2 and f"prompts are {n_long} tokens, over the 32" in result.output
    result = _cli("--model", str(model_dir), "--store", str(store), "--task", "nope")
    assert result.exit_code == 2 and "unknown task 'nope'" in result.output
