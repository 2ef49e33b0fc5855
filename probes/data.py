"""Data sources: the built-in stdlib-docs corpus and the user's .txt / .jsonl files.

A data spec is a string:

- ``stdlib-docs`` (training split) or ``stdlib-docs:heldout`` — docstrings of
  the running interpreter's standard library, parsed with ``ast`` (nothing is
  imported), in sorted file order;
- a path to a ``.txt`` file (documents separated by blank lines);
- a path to a ``.jsonl`` file with a ``text`` field on every line;
- a ``.parquet`` file or a Hugging Face ``datasets`` folder (``Dataset.save_to_disk``), its
  ``text`` column or the one named as ``PATH:COLUMN``, streamed a batch of rows at a time.

From Python, data may also be a list (or tuple) of strings: one document each.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sparsescope.store.errors import BadInput

STDLIB = "stdlib-docs"
_SPLITS = ("train", "heldout")
_HELDOUT_EVERY = 10  # one document in ten (by a hash of its name) is held out
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}


MAX_DOC_CHARS = 100_000  # longer documents reach the tokenizer in pieces
_READ_CHARS = 1 << 20
_BLANK_LINE = re.compile(r"\n\s*\n")
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


Data = str | Sequence[str]  # a spec, or the documents themselves (from Python)


class DataError(BadInput):
    """Bad data input: one line naming the input and what to do."""


@functools.cache
def _stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files outside ``_SKIP_DIRS``, by relative path (a
    walk that prunes those folders: a glob of every file first took a tenth of a job)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _SKIP_DIRS]
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@functools.cache
def _docstrings(path: Path) -> tuple[tuple[str, str], ...]:
    """(qualified name, docstring) for the module, classes and functions of one file.

    Cached: jobs that read the corpus many times (benchmarks, the zoo's laws) parse once.
    """
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ()
    out = []
    nodes = [(path.stem, tree)]
    while nodes:
        name, node = nodes.pop(0)
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= 40:
            out.append((name, doc))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                nodes.append((f"{name}.{child.name}", child))
    return tuple(out)


def _split_of(name: str) -> str:
    digest = hashlib.sha1(name.encode()).digest()
    return "heldout" if digest[0] % _HELDOUT_EVERY == 0 else "train"


def stdlib_docs(split: str = "train") -> Iterator[str]:
    """Docstrings of the standard library, deterministic order, one document each."""
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r} of {STDLIB}: use one of {', '.join(_SPLITS)}")
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        prefix = path.relative_to(root).with_suffix("").as_posix().replace("/", ".")
        for name, doc in _docstrings(path):
            qualified = f"{prefix}:{name}"
            if _split_of(qualified) == split:
                yield doc


def _clean(text: str) -> str:
    """Text as a tokenizer can take it: lone surrogates become U+FFFD, control characters
    other than tab and newlines are dropped, and the ends are stripped."""
    return _CONTROL.sub("", _SURROGATE.sub("\ufffd", text)).strip()


def _pieces(text: str) -> Iterator[str]:
    """A document cut into pieces of at most ``MAX_DOC_CHARS`` characters, at whitespace
    where there is some, so that one huge document never reaches the tokenizer whole."""
    while len(text) > MAX_DOC_CHARS:
        cut = text.rfind(" ", MAX_DOC_CHARS // 2, MAX_DOC_CHARS) + 1 or MAX_DOC_CHARS
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def _txt_documents(path: Path) -> Iterator[str]:
    """Documents separated by blank lines, read in chunks (a file of one huge line too)."""
    with path.open(encoding="utf-8") as f:
        buffer = ""
        while chunk := f.read(_READ_CHARS):
            parts = _BLANK_LINE.split(buffer + chunk)
            buffer = parts.pop()
            for doc in parts:
                if text := _clean(doc):
                    yield from _pieces(text)
            if len(buffer) > MAX_DOC_CHARS:  # a long document: its full pieces go now
                *full, buffer = _pieces(buffer)
                yield from filter(None, map(_clean, full))
        if text := _clean(buffer):
            yield from _pieces(text)


def _jsonl_documents(path: Path, column: str = "text") -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except (RecursionError, ValueError) as e:  # nesting too deep, huge integers
                raise DataError(f"{path}:{lineno}: JSON this reader refuses ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get(column), str):
                raise DataError(f'{path}:{lineno}: each line needs a string field "{column}"')
            if text := _clean(row[column]):
                yield from _pieces(text)


def _columns(names: list[str], batches: Iterator, column: str, where: Path) -> Iterator[str]:
    """The cleaned, cut documents of one string column of Arrow record batches (``names``:
    the columns the source has)."""
    if column not in names:
        raise DataError(
            f"data {str(where)!r} has no column {column!r}: its columns are"
            f" {', '.join(names)}; name one as {where}:COLUMN"
        )
    for batch in batches:
        values = batch.column(column)
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            raise DataError(f"{where}: column {column!r} holds {values.type}, not text")
        for text in values.to_pylist():
            if text and (text := _clean(text)):
                yield from _pieces(text)


def _parquet_documents(path: Path, column: str) -> Iterator[str]:
    """A Parquet file's text column, streamed a row batch at a time."""
    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"data {str(path)!r} is not a readable Parquet file ({err})") from None
    batches = f.iter_batches(batch_size=1024, columns=[column])
    yield from _columns(f.schema_arrow.names, batches, column, path)


def _dataset_files(folder: Path) -> list[Path]:
    """The Arrow files of a ``datasets`` folder written by ``Dataset.save_to_disk``."""
    if (folder / "dataset_dict.json").is_file():
        raise DataError(f"data {str(folder)!r} holds several splits: name one, e.g. {folder}/train")
    try:
        state = json.loads((folder / "state.json").read_text())
        return [folder / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(
            f"data {str(folder)!r} is a folder but not a `datasets` folder (save_to_disk)"
        ) from None


def _dataset_documents(folder: Path, column: str) -> Iterator[str]:
    """A ``datasets`` folder's text column, streamed a record batch at a time."""
    for file in _dataset_files(folder):
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(file)))
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"data {str(file)!r} is not an Arrow file ({err})") from None
        yield from _columns(reader.schema.names, reader, column, folder)


def _locate(spec: str) -> tuple[Path, str]:
    """(path, text column) of a file spec: ``PATH`` or ``PATH:COLUMN`` (default ``text``)."""
    head, sep, column = spec.rpartition(":")
    if not Path(spec).exists() and sep and column.isidentifier() and Path(head).exists():
        return Path(head), column
    return Path(spec), "text"


def validate(spec: Data) -> None:
    """Check a data spec (or a list of texts) completely before any work starts (files are
    read once)."""
    if not isinstance(spec, str):
        _check_texts(spec)
        return
    if spec == STDLIB or spec.startswith(STDLIB + ":"):
        split = spec.partition(":")[2] or "train"
        if split not in _SPLITS:
            raise DataError(f"unknown split {split!r} of {STDLIB}: use one of {', '.join(_SPLITS)}")
        return
    path, _ = _locate(spec)
    kinds = "stdlib-docs, a .txt, .jsonl or .parquet file, or a `datasets` folder"
    if not path.exists():
        raise DataError(f"data {spec!r} not found: give {kinds}")
    if not (path.is_file() or path.is_dir()):  # a device or a pipe may never end
        raise DataError(f"data {spec!r} is not a regular file or a folder: give {kinds}")
    if path.is_file() and path.suffix not in (".txt", ".jsonl", ".parquet"):
        raise DataError(f"data {spec!r}: unsupported file type; give {kinds}")
    try:
        if sum(1 for _ in documents(spec)) == 0:  # reads the whole input: errors surface now
            raise DataError(f"data {spec!r} holds no text")
    except UnicodeDecodeError:
        raise DataError(f"data {spec!r} is not UTF-8 text") from None


def documents(spec: Data) -> Iterator[str]:
    """Stream the documents of a data spec or a list of texts (see the module docstring)."""
    if not isinstance(spec, str):
        return (piece for text in map(_clean, spec) for piece in _pieces(text))
    if spec == STDLIB or spec.startswith(STDLIB + ":"):
        return stdlib_docs(spec.partition(":")[2] or "train")
    path, column = _locate(spec)
    if path.is_dir():
        return _dataset_documents(path, column)
    if path.suffix == ".parquet":
        return _parquet_documents(path, column)
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, column)
    return _txt_documents(path)


def _check_texts(texts: Sequence[str]) -> None:
    if not isinstance(texts, (list, tuple)):
        raise DataError(f"data must be a spec or a list of strings, not a {type(texts).__name__}")
    bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
    if bad is not None:
        raise DataError(f"data[{bad}] is a {type(texts[bad]).__name__}, not a string")
    if not any(_clean(text) for text in texts):
        raise DataError("the texts hold no text")


def label(spec: Data) -> str:
    """How a run's ``dataset`` names its data: the spec, or ``texts:N`` for a list of texts."""
    return spec if isinstance(spec, str) else f"texts:{len(spec)}"
