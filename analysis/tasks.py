"""Owner of METHODS.md §6 task data: IOI prompts and the normalised logit difference.

A :class:`Task` is clean prompts, corrupted prompts, the answer tokens (correct, wrong)
of each prompt and the metric. IOI prompts ("When Mary and John went to the store, John
gave a drink to" → " Mary") use single-token names, places and objects; ABBA and BABA
orders alternate; the corrupted prompt keeps template, place and object and takes three
fresh names (ABC). All prompts of a task share one template, so positions align across
prompts; the tokenizer's BOS token (the zoo's document separator) leads each prompt. Names
are split once, by a fixed seed, into disjoint train, validation and test sets: the zoo's
``ioi`` preset answers IOI sentences on train names (and stand-in names) only, picks its
final checkpoint by accuracy on validation names, and the task is scored on test names.

Other tasks plug in the same way: a builder ``(tokenizer, n, split, seed) -> Task`` in
``TASKS``. The user's own prompt pairs come from records or a JSONL file
(:func:`from_records`, :func:`from_jsonl`): each pair has ``clean`` and ``corrupted``
prompts and the ``answer`` and ``wrong`` continuations, each exactly one token. A file task
is built like IOI: BOS first, every prompt of the task one token length (patching is
position-wise and prompts are not padded), positions labelled with the first clean
prompt's tokens. Strings are only tokenized, never evaluated or rendered as markup.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import random
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparsescope.probes import zoo
from sparsescope.probes.data import stdlib_docs
from sparsescope.store.errors import BadInput

NAMES = (
    "Mary John Alice Bob Tom James Anna Sarah David Paul Peter Mark Lisa Kate Jack Emma Max "
    "Sam Ann Dan Ben Tim Joe Eve Adam Mike Kim Leo Ray Lee Amy Ron Ted Jim Jane Rose Ruth "
    "Carl Fred Greg Hugo Ian Ivan Jon Karl Ken Luke Matt Nick Otto Pete Rick Sean Tony Will "
    "Zoe Beth Cara Dora Ella Fay Gina Hope Ida Joy Kay Lily Mia Nora Olga Pam Rita Sue Tina "
    "Una Vera Wendy Yara Adrian Brian Colin Derek Ethan Frank Henry Isaac Jacob Kevin Louis "
    "Oscar Simon Victor Walter Grace Helen Irene Julia Laura Maria Nina Paula Sophie Diana"
).split()
PLACES = (
    "store park school garden office market station house beach library hospital kitchen "
    "farm museum river church"
).split()
OBJECTS = "drink book ring bag key letter gift ball apple pen cake flower card hat map box".split()
TEMPLATES = (
    "When {A} and {B} went to the {P}, {C} gave a {O} to",
    "After {A} and {B} went to the {P}, {C} gave a {O} to",
    "When {A} and {B} got to the {P}, {C} handed a {O} to",
    "While {A} and {B} were at the {P}, {C} gave a {O} to",
)
COPY_TEMPLATES = (  # {N} is one of the names before it
    "{N} was at the {P}, and then {N} left.",
    "{A} met {B} at the {P}, and then {N} left.",
)
TEST_SHARE = 0.25
N_VAL = 20  # validation names: like test names, never an IOI answer in training
STAND_IN_SHARE = 0.75  # of the answered IOI training sentences
_SPLIT_SEED = 1234
FIELDS = ("clean", "corrupted", "answer", "wrong")  # a prompt pair's record
MAX_PAIRS = 1024
MAX_FILE_BYTES = 16 * 2**20


class TaskError(BadInput):
    """Bad task request or task data (unknown task, a bad prompt pair): one clear line."""


@dataclass
class Task:
    """Paired prompts ``[n, seq]`` (same length), answers ``[n, 2]`` = (correct, wrong)."""

    name: str
    clean: torch.Tensor
    corrupted: torch.Tensor
    answers: torch.Tensor
    pos_labels: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # recorded in the run's config (e.g. the file)

    @property
    def prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clean, self.corrupted

    def logit_diff(self, logits: torch.Tensor) -> torch.Tensor:
        """LD = logit(correct) − logit(wrong) at the last position, one per prompt.

        ``logits`` may stack several replicas of the batch (``[k · n, seq, vocab]``).
        """
        last = logits[:, -1, :]
        answers = self.answers.repeat(len(last) // len(self.answers), 1)
        return (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).squeeze(1)


def normalized_ld(ld: torch.Tensor, ld_clean: float, ld_corr: float) -> torch.Tensor:
    """``(mean LD − LD_corr) / (LD_clean − LD_corr)``: 0 on corrupted, 1 on clean prompts."""
    return (ld.mean() - ld_corr) / (ld_clean - ld_corr)


def split_names(split: str) -> list[str]:
    """The train, val or test names (disjoint, fixed by a seed; before any tokenizer filter)."""
    names = sorted(NAMES)
    random.Random(_SPLIT_SEED).shuffle(names)
    n_test = round(TEST_SHARE * len(names))
    splits = {"test": names[:n_test], "train": names[n_test:-N_VAL], "val": names[-N_VAL:]}
    if split not in splits:
        raise TaskError(f"unknown name split {split!r}: use train, val or test")
    return splits[split]


def single_tokens(tokenizer, words: list[str]) -> list[str]:
    """The words that are one token (with a leading space) under the tokenizer."""
    return [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]


def _fill(template: str, a: str, b: str, c: str, place: str, obj: str) -> str:
    return template.format(A=a, B=b, C=c, P=place, O=obj)


def ioi_prompt(rng: random.Random, names: list[str], template: str) -> tuple[str, str, str]:
    """One clean IOI prompt and its (IO, S) names; ABBA or BABA at random."""
    io, s = rng.sample(names, 2)
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    a, b = (io, s) if rng.random() < 0.5 else (s, io)
    return _fill(template, a, b, s, place, obj), io, s


def ioi_task(tokenizer, n: int = 32, split: str = "test", seed: int = 0, template: int = 0) -> Task:
    """``n`` IOI prompts on ``split`` names with ABC corruptions, all of one template."""
    names = single_tokens(tokenizer, split_names(split))
    places, objects = single_tokens(tokenizer, PLACES), single_tokens(tokenizer, OBJECTS)
    if len(names) < 5 or not places or not objects:
        raise TaskError(
            f"the tokenizer has only {len(names)} single-token {split} names: IOI needs a"
            " tokenizer trained with names, such as the zoo's ioi preset"
        )
    rng = random.Random(seed)
    tmpl = TEMPLATES[template]
    clean, corrupted, answers = [], [], []
    for _ in range(n):
        io, s = rng.sample(names, 2)
        place, obj = rng.choice(places), rng.choice(objects)
        a, b = (io, s) if len(clean) % 2 == 0 else (s, io)
        x, y, z = rng.sample([m for m in names if m not in (io, s)], 3)
        clean.append(_fill(tmpl, a, b, s, place, obj))
        corrupted.append(_fill(tmpl, x, y, z, place, obj))
        answers.append([tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in (io, s)])
    bos = _bos(tokenizer)
    enc = [
        [bos + ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for texts in (clean, corrupted)
    ]
    if len({len(ids) for ids in enc[0] + enc[1]}) != 1:
        raise TaskError(f"IOI template {template} tokenizes to prompts of different lengths")
    labels = ["BOS"] * len(bos) + _fill(tmpl, "A", "B", "S2", "P", "O").replace(",", " ,").split()
    pos_labels = labels if len(labels) == len(enc[0][0]) else []
    return Task(
        "ioi",
        torch.tensor(enc[0]),
        torch.tensor(enc[1]),
        torch.tensor(answers),
        pos_labels or [str(i) for i in range(len(enc[0][0]))],
    )


def _bos(tokenizer) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _check_text(where: str, key: str, text: str) -> None:
    bad = next((c for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n"), None)
    if bad is not None:
        raise TaskError(
            f"{where}: {key!r} holds control character U+{ord(bad):04X} (only tab and newline"
            " may appear)"
        )


def _pair(tokenizer, where: str, record) -> tuple[list[int], list[int], list[int]]:
    """One record's clean and corrupted ids (BOS first) and its (answer, wrong) ids."""
    if not isinstance(record, dict):
        raise TaskError(f"{where}: a prompt pair is a JSON object, not {type(record).__name__}")
    for key in FIELDS:
        if key not in record:
            raise TaskError(f"{where}: missing field {key!r} (a pair has {', '.join(FIELDS)})")
        if not isinstance(record[key], str):
            kind = type(record[key]).__name__
            raise TaskError(f"{where}: field {key!r} must be a string, not {kind}")
        _check_text(where, key, record[key])
    for key in ("clean", "corrupted"):
        if not record[key].strip():
            raise TaskError(f"{where}: {key!r} is an empty prompt")
    answers = []
    for key in ("answer", "wrong"):
        ids = tokenizer.encode(record[key], add_special_tokens=False)
        if len(ids) != 1:
            raise TaskError(
                f"{where}: {key!r} {record[key]!r} is {len(ids)} tokens for this tokenizer; it"
                " must be exactly one (usually with a leading space)"
            )
        answers += ids
    if answers[0] == answers[1]:
        raise TaskError(f"{where}: 'answer' and 'wrong' are the same token {record['answer']!r}")
    clean, corr = (
        _bos(tokenizer) + tokenizer.encode(record[k], add_special_tokens=False)
        for k in ("clean", "corrupted")
    )
    if len(clean) != len(corr):
        raise TaskError(
            f"{where}: 'clean' is {len(clean)} tokens and 'corrupted' {len(corr)} (BOS included);"
            " a pair must have one token length"
        )
    return clean, corr, answers


def _pairs_task(tokenizer, items: list[tuple[str, object]], name: str, source: str) -> Task:
    """A task of ``(where, record)`` items; ``source`` names them all in errors."""
    if not items:
        raise TaskError(
            f"{source}: no prompt pairs; give one JSON object per line with fields"
            f" {', '.join(FIELDS)}"
        )
    if len(items) < 2:
        raise TaskError(f"{source}: one prompt pair; a task needs at least 2")
    if len(items) > MAX_PAIRS:
        raise TaskError(
            f"{items[MAX_PAIRS][0]}: pair {MAX_PAIRS + 1}, over the {MAX_PAIRS} prompt"
            " pairs a task may hold (take the first ones with n)"
        )
    pairs = [_pair(tokenizer, where, record) for where, record in items]
    length = len(pairs[0][0])
    for (where, _), (clean, _, _) in zip(items, pairs, strict=True):
        if len(clean) != length:
            raise TaskError(
                f"{where}: prompts are {len(clean)} tokens, those of"
                f" {items[0][0].removeprefix(source + ' ')} {length} (BOS included); every prompt"
                " of a task must have one token length"
            )
    clean, corrupted, answers = (torch.tensor(column) for column in zip(*pairs, strict=True))
    if torch.equal(clean, corrupted):
        raise TaskError(f"{source}: every corrupted prompt equals its clean prompt")
    bos = _bos(tokenizer)
    labels = ["BOS"] * len(bos) + [tokenizer.decode([t]) for t in clean[0, len(bos) :].tolist()]
    return Task(name, clean, corrupted, answers, labels)


def from_records(tokenizer, records: list[dict], name: str = "custom") -> Task:
    """A task of prompt pairs ``{"clean", "corrupted", "answer", "wrong"}`` (other keys are
    ignored): 2 to ``MAX_PAIRS`` pairs, all prompts one token length, answers one token."""
    items = [(f"record {i}", record) for i, record in enumerate(records, 1)]
    return _pairs_task(tokenizer, items, name, "records")


def from_jsonl(path: str | Path, tokenizer, n: int | None = None) -> Task:
    """The task of a JSONL file, one prompt pair per line (blank lines skipped), named after
    the file's stem; ``n`` takes the first ``n`` pairs. Rules as :func:`from_records`."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {str(path)!r} not found (or not a file)")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise TaskError(
            f"{path}: over {MAX_FILE_BYTES // 2**20} MiB; a task holds at most"
            f" {MAX_PAIRS} prompt pairs"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise TaskError(f"{path} line {line}: not UTF-8 text") from None
    items = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            items.append((f"{path} line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise TaskError(f"{path} line {number}: not JSON ({err.msg})") from None
    task = _pairs_task(tokenizer, items[:n], path.stem, str(path))
    task.info = {
        "task_file": str(path.resolve()),
        "task_sha256": hashlib.sha256(data).hexdigest(),
    }
    return task


TASKS: dict[str, Callable[..., Task]] = {"ioi": ioi_task}


def make_task(
    spec: str, tokenizer, n: int | None = None, split: str = "test", seed: int = 0
) -> Task:
    """A registered task by name (``n`` prompts, 32 by default) or a JSONL file of prompt
    pairs (its first ``n``, all by default)."""
    if spec in TASKS:
        return TASKS[spec](tokenizer, n=32 if n is None else n, split=split, seed=seed)
    if spec.endswith(".jsonl") or Path(spec).is_file():
        return from_jsonl(spec, tokenizer, n)
    raise TaskError(
        f"unknown task {spec!r}: choose one of {', '.join(TASKS)} or give a .jsonl file of"
        " prompt pairs"
    )


@functools.cache
def stand_in_names(n: int = 600) -> tuple[str, ...]:
    """The ``n`` most frequent words (4–8 letters) of the stdlib-docs training split,
    capitalised; none is a name, place, object or template word of the IOI task."""
    counts = collections.Counter(
        w for doc in stdlib_docs("train") for w in re.findall(r"\b[a-z]{4,8}\b", doc)
    )
    taken = " ".join([*NAMES, *PLACES, *OBJECTS, *TEMPLATES, *COPY_TEMPLATES]).lower()
    skip = set(re.findall(r"[a-z]+", taken))
    return tuple(w.capitalize() for w, _ in counts.most_common() if w not in skip)[:n]


def ioi_training_docs(seed: int) -> Iterator[str]:
    """Endless training documents for the zoo's ``ioi`` preset.

    70% are complete IOI sentences (every template): a quarter on train names, three
    quarters on stand-in names (capitalised frequent words of the corpus, 600 of them),
    which no model can learn name by name, so it learns IOI as an operation on whatever
    tokens fill the name slots. The other 30% copy a name, any name, test names included,
    from one name ("Nora was at the park, and then Nora left.") or from two, either of them
    ("Nora met Ivan at the park, and then Ivan left."), so the model knows test and
    validation names as names that can be copied from the context (pretrained models know
    names the same way), while none of them ever answers an IOI sentence.
    """
    rng = random.Random(seed)
    train, stand_ins = split_names("train"), list(stand_in_names())
    while True:
        u = rng.random()
        if u < 0.7:
            names = stand_ins if u < 0.7 * STAND_IN_SHARE else train
            text, io, _ = ioi_prompt(rng, names, rng.choice(TEMPLATES))
            yield f"{text} {io}."
        else:
            a, b = rng.sample(NAMES, 2)
            template = rng.choice(COPY_TEMPLATES)
            yield template.format(A=a, B=b, N=rng.choice((a, b)), P=rng.choice(PLACES))


def _ioi_lds(model, tokenizer, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Clean and corrupted LDs on ``split`` names, ``n`` prompts of every template that
    tokenizes evenly; None if none does."""
    lds, ld_corr = [], []
    for template in range(len(TEMPLATES)):
        try:
            task = ioi_task(tokenizer, n=n, split=split, seed=100 + template, template=template)
        except TaskError:
            continue
        lds.append(task.logit_diff(model(input_ids=task.clean).logits))
        ld_corr.append(task.logit_diff(model(input_ids=task.corrupted).logits))
    return (torch.cat(lds), torch.cat(ld_corr)) if lds else None


@torch.no_grad()
def ioi_metrics(model, tokenizer, n: int = 64) -> dict:
    """Held-out IOI accuracy (logit(IO) > logit(S)) on test and on validation names, and the
    mean clean/corrupted LD on test names. ``model`` is a Hugging Face causal LM."""
    test, val = _ioi_lds(model, tokenizer, "test", n), _ioi_lds(model, tokenizer, "val", n)
    if test is None or val is None:
        return {}
    return {
        "ioi_acc": float((test[0] > 0).float().mean()),
        "ioi_val_acc": float((val[0] > 0).float().mean()),
        "ioi_ld_clean": float(test[0].mean()),
        "ioi_ld_corr": float(test[1].mean()),
    }


zoo.register_mixer("ioi", ioi_training_docs, ioi_metrics)
