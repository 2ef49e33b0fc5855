"""Token batches: documents packed into fixed-length windows, streamed.

Documents are tokenized one at a time, joined with the tokenizer's separator
(EOS, or SEP for BERT-style tokenizers) and cut into windows of ``seq_len``
tokens; each window starts with the BOS/CLS token when the tokenizer has one.
Memory holds one batch of windows at a time, whatever the corpus size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    seq_ids: list[int]
    input_ids: torch.Tensor  # [B, T] int64, no padding


def _special_ids(tokenizer) -> tuple[int | None, int | None]:
    bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return bos, sep


def _tokenized(tokenizer, docs: Iterable[str], chunk: int = 32) -> Iterator[list[int]]:
    """Token ids of each document, tokenized a chunk of documents at a time."""
    it = iter(docs)
    while group := list(itertools.islice(it, chunk)):
        yield from tokenizer(group, add_special_tokens=False)["input_ids"]


def windows(
    tokenizer, docs: Iterable[str], seq_len: int, max_tokens: int | None
) -> Iterator[list[int]]:
    """Yield token windows; their lengths add up to at most ``max_tokens``."""
    bos, sep = _special_ids(tokenizer)
    prefix = [bos] if bos is not None else []
    body = seq_len - len(prefix)
    buf: list[int] = []
    emitted = 0
    for ids in _tokenized(tokenizer, docs):
        buf.extend(ids)
        if sep is not None:
            buf.append(sep)
        while len(buf) >= body:
            window = prefix + buf[:body]
            del buf[:body]
            if max_tokens is not None and emitted + len(window) >= max_tokens:
                yield window[: max_tokens - emitted]
                return
            emitted += len(window)
            yield window
    if buf:
        window = prefix + buf
        if max_tokens is not None:
            window = window[: max_tokens - emitted]
        if window:
            yield window


def batches(
    tokenizer, docs: Iterable[str], seq_len: int, batch_size: int, max_tokens: int | None = None
) -> Iterator[Batch]:
    """Group consecutive windows of equal length into batches (only the last may be short)."""
    group: list[list[int]] = []
    seq_id = 0
    for window in windows(tokenizer, docs, seq_len, max_tokens):
        if group and (len(window) != len(group[0]) or len(group) == batch_size):
            yield Batch(list(range(seq_id, seq_id + len(group))), torch.tensor(group))
            seq_id += len(group)
            group = []
        group.append(window)
    if group:
        yield Batch(list(range(seq_id, seq_id + len(group))), torch.tensor(group))
