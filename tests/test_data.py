"""Data sources and token batching."""

from __future__ import annotations

import itertools
import os
import sysconfig
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sparsescope.probes.batches import batches, windows
from sparsescope.probes.data import (
    _SKIP_DIRS,
    DataError,
    _stdlib_files,
    documents,
    stdlib_docs,
    validate,
)
from sparsescope.probes.models import minilm_path


def test_stdlib_docs_is_deterministic_and_splits_are_disjoint():
    first = list(itertools.islice(stdlib_docs(), 200))
    assert first == list(itertools.islice(stdlib_docs(), 200))
    held = set(itertools.islice(stdlib_docs("heldout"), 200))
    assert held and not held & set(first)
    assert all(len(doc) >= 40 for doc in first)
    with pytest.raises(DataError, match="unknown split"):
        validate("stdlib-docs:test")


def test_stdlib_files_are_every_py_file_outside_the_skipped_folders():
    root = Path(sysconfig.get_paths()["stdlib"])
    kept = [p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    expected = sorted(kept, key=lambda p: p.relative_to(root).as_posix())
    assert len(expected) > 100 and _stdlib_files() == expected


def test_txt_documents_split_on_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\nline two\n\n\nthree\n   \nfour")
    assert list(documents(str(path))) == ["one\nline two", "three", "four"]


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("x")
    with pytest.raises(DataError, match="unsupported"):
        validate(str(path))


def test_a_device_or_a_pipe_is_refused_before_it_is_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.txt")  # reading it would wait for a writer forever
    for spec in ("/dev/zero", str(tmp_path / "pipe.txt")):
        with pytest.raises(DataError, match="not a regular file"):
            validate(spec)


def test_windows_pack_documents_and_respect_max_tokens():
    tok = AutoTokenizer.from_pretrained(minilm_path())
    docs = ["alpha beta gamma delta"] * 30
    ws = list(windows(tok, docs, seq_len=16, max_tokens=100))
    assert sum(map(len, ws)) == 100
    assert all(w[0] == tok.cls_token_id for w in ws)
    assert all(len(w) == 16 for w in ws[:-1])
    body = [t for w in ws for t in w[1:]]
    assert body.count(tok.sep_token_id) >= 5  # documents separated by [SEP]
    bs = list(batches(tok, docs, seq_len=16, batch_size=4, max_tokens=100))
    assert [b.input_ids.shape for b in bs][:1] == [(4, 16)]
    assert [s for b in bs for s in b.seq_ids] == list(range(len(ws)))
