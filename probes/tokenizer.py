"""Byte-level BPE tokenizer of the model zoo, trained on the stdlib-docs corpus.

``<|endoftext|>`` (id 0) is the only special token; it serves as BOS, EOS, padding and
document separator. Training is deterministic: the same documents give the same tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOT = "<|endoftext|>"


def train_tokenizer(
    docs: Iterable[str], vocab_size: int, model_max_length: int
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer; `save_pretrained` writes an AutoTokenizer folder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        model_max_length=model_max_length,
    )


def encode_stream(tokenizer: PreTrainedTokenizerFast, docs: Iterable[str]) -> torch.Tensor:
    """One token stream: ``<|endoftext|>`` before every document (1-D int64 tensor)."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(list(docs), add_special_tokens=False):
        ids.append(eot)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)
