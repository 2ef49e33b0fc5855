"""Parquet files and Hugging Face ``datasets`` folders as data: the text column by name,
streamed, with one-line errors; the probe's tokens equal the tokenizer on the same texts."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparsescope.probes import data as data_sources
from sparsescope.probes.job import ProbeConfig, run_probe
from sparsescope.probes.models import minilm_path
from sparsescope.store.reader import Reader
from tests.conftest import run_cli

TEXTS = [f"document {i}: the quick brown fox jumps over lazy dog number {i}" for i in range(300)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("formats")
    table = pa.table({"id": list(range(len(TEXTS))), "body": TEXTS})
    pq.write_table(table, root / "c.parquet", row_group_size=64)
    datasets.Dataset.from_dict({"body": TEXTS, "n": list(range(len(TEXTS)))}).save_to_disk(
        str(root / "ds")
    )
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": TEXTS})}).save_to_disk(
        str(root / "dd")
    )
    return root


@pytest.mark.parametrize("name", ["c.parquet", "ds", "dd/train"])
def test_the_text_column_is_read_in_order(files, name):
    spec = f"{files / name}:body"
    data_sources.validate(spec)
    assert list(data_sources.documents(spec)) == TEXTS


@pytest.mark.parametrize(
    ("name", "needle"),
    [("c.parquet", "has no column 'text'"), ("c.parquet:id", "not text"),
     ("ds", "has no column 'text'"), ("dd", "several splits"), ("dd/train:nope", "no column")],
)  # fmt: skip
def test_bad_columns_and_folders_are_one_line(files, tmp_path, name, needle):
    out = run_cli("probe", "--model", "minilm", "--data", str(files / name), "--store",
                  str(tmp_path / "s"))  # fmt: skip
    assert out.returncode == 2 and needle in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_a_plain_folder_and_a_broken_parquet_are_one_line(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    for spec in (tmp_path / "plain", tmp_path / "bad.parquet"):
        with pytest.raises(data_sources.DataError):
            data_sources.validate(str(spec))


def test_probe_of_a_parquet_column_stores_the_tokenizers_ids(files, tmp_path):
    from transformers import AutoTokenizer

    store = tmp_path / "s"
    config = ProbeConfig(max_tokens=512, seq_len=64, batch_size=4)
    run_probe("minilm", f"{files / 'c.parquet'}:body", store, config, quiet=True)
    stored = Reader(store).sql("SELECT token_id FROM tokens ORDER BY seq_id, pos")["token_id"]
    tok = AutoTokenizer.from_pretrained(minilm_path())
    ids = [
        i for t in TEXTS for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    ]
    body = [i for i in stored if i != tok.cls_token_id]  # each window starts with [CLS]
    assert body == ids[: len(body)] and len(stored) == 512
