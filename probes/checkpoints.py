"""Owner of checkpoint series specs: a user's own training checkpoints, one spec each.

- ``series:GLOB``: the folders a glob pattern matches (Python ``glob``; the only spec read as
  a pattern), each a Hugging Face checkpoint folder; ``series:GLOB@N`` is its checkpoint at
  step N. The series is named (its ``family``) after the last folder of the pattern before
  the first one with a glob character (``series:runs/relu/checkpoint-*``: ``relu``).
- ``org/name@REV`` is a Hub revision; ``org/name@REV1,REV2,...`` a series of them.

A folder's step is ``global_step`` of its ``trainer_state.json`` (tokens seen: its
``num_input_tokens_seen`` when positive), else the number in its name after ``step`` or
``checkpoint`` (``checkpoint-1200``, ``step_1200``, ``global_step1200``), else a trailing
integer. A revision's step is the number after ``step`` or ``checkpoint`` (``step3000``).
A ``tokens<N>[K|M|B|T]`` part of a name (OLMo's ``step1000-tokens4B``) gives the tokens seen
when nothing else does. A series is in step order (numeric); two checkpoints of one step are
an error.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sparsescope.store.errors import BadInput

PREFIX = "series:"
_AT_STEP = re.compile(r"^(.*)@(\d+)$", re.S)
_NAMED_STEP = re.compile(r"(?:step|checkpoint)[-_]?(\d+)", re.I)
_TRAILING = re.compile(r"(\d+)$")
_TOKENS = re.compile(r"tokens(\d+)([KMBT]?)(?![0-9A-Za-z])", re.I)
_SCALE = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_MAGIC = re.compile(r"[*?[]")


class SeriesError(BadInput):
    """A checkpoint series (or one of its checkpoints) that cannot be read; one line."""


@dataclass(frozen=True)
class Checkpoint:
    spec: str  # the spec of this one checkpoint (its model_id in the store)
    where: str  # its folder, or the Hub name
    family: str  # the series
    step: int | None
    tokens_seen: int | None
    revision: str | None = None  # Hub revisions only


def step_of(name: str, trailing: bool = False) -> int | None:
    """The step a folder or revision name states (see the module docstring), or None."""
    if match := _NAMED_STEP.search(name):
        return int(match.group(1))
    if trailing and (match := _TRAILING.search(name)):
        return int(match.group(1))
    return None


def tokens_of(name: str) -> int | None:
    """Tokens seen from a ``tokens<N>[K|M|B|T]`` part of a name, or None."""
    match = _TOKENS.search(name)
    return int(match.group(1)) * _SCALE[match.group(2).upper()] if match else None


def series(spec: str) -> list[Checkpoint] | None:
    """The checkpoints a ``series:`` or Hub-revision spec names, in step order (one for
    ``series:GLOB@N`` and ``org/name@REV``); None for every other spec."""
    if spec.startswith(PREFIX):
        return _local(spec.removeprefix(PREFIX))
    if "@" in spec and not Path(spec).expanduser().exists():
        return _hub(spec)
    return None


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _trainer_state(folder: Path) -> tuple[int | None, int | None]:
    """(global_step, num_input_tokens_seen or None) of the folder's trainer_state.json; (None,
    None) when it has none."""
    file = folder / "trainer_state.json"
    if not file.exists():
        return None, None
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise SeriesError(f"{file} is not readable JSON: {err}") from None
    step = state.get("global_step") if isinstance(state, dict) else None
    if not _count(step):
        raise SeriesError(f"{file} has no global_step (a non-negative integer)")
    tokens = state.get("num_input_tokens_seen")
    return step, tokens if _count(tokens) and tokens > 0 else None  # the Trainer writes 0


def _family(pattern: str) -> str:
    parts = Path(pattern).parts[:-1]
    fixed = list(itertools.takewhile(lambda part: not _MAGIC.search(part), parts))
    return Path(os.path.abspath(Path(*fixed) if fixed else ".")).name or pattern


def _local(body: str) -> list[Checkpoint]:
    match = _AT_STEP.match(body)
    pattern, wanted = (match.group(1), int(match.group(2))) if match else (body, None)
    label = PREFIX + pattern
    if not pattern:
        raise SeriesError("series: needs a glob pattern, e.g. series:runs/out/checkpoint-*")
    pattern = os.path.expanduser(pattern)
    found = sorted(glob.glob(pattern))
    if not found:
        raise SeriesError(f"{label} matches no folder")
    family = _family(pattern)
    checkpoints = []
    for path in map(Path, found):
        if not (path / "config.json").is_file():
            raise SeriesError(
                f"{path} (matched by {label}) has no config.json: every match of a series must"
                " be a Hugging Face checkpoint folder"
            )
        step, tokens = _trainer_state(path)
        step = step_of(path.name, trailing=True) if step is None else step
        if step is None:
            raise SeriesError(
                f"cannot read the step of checkpoint {path}: name it checkpoint-<N> or"
                " step<N>, or give it a trainer_state.json with global_step"
            )
        where = str(path.resolve())
        tokens = tokens_of(path.name) if tokens is None else tokens
        checkpoints.append(Checkpoint(f"{label}@{step}", where, family, step, tokens))
    checkpoints = _in_step_order(checkpoints, label)
    if wanted is None:
        return checkpoints
    hits = [c for c in checkpoints if c.step == wanted]
    if not hits:
        steps = ", ".join(str(c.step) for c in checkpoints)
        raise SeriesError(f"{label} has no checkpoint at step {wanted}: steps are {steps}")
    return hits


def _hub(spec: str) -> list[Checkpoint] | None:
    name, _, revisions = spec.partition("@")
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    revisions = [r.strip() for r in revisions.split(",")]
    if not all(revisions):
        raise SeriesError(f"model {spec!r} has an empty revision: use org/name@REV[,REV...]")
    family = name.split("/")[1]
    checkpoints = [
        Checkpoint(f"{name}@{r}", name, family, step_of(r), tokens_of(r), r) for r in revisions
    ]
    if len(checkpoints) == 1:
        return checkpoints
    for c in checkpoints:
        if c.step is None:
            raise SeriesError(
                f"revision {c.revision!r} of the series {spec!r} names no step: a series of"
                " revisions needs names like step3000"
            )
    return _in_step_order(checkpoints, spec)


def _in_step_order(checkpoints: list[Checkpoint], label: str) -> list[Checkpoint]:
    ordered = sorted(checkpoints, key=lambda c: c.step)
    for a, b in itertools.pairwise(ordered):
        if a.step == b.step:
            first, second = (c.revision or c.where for c in (a, b))
            raise SeriesError(f"{label}: {first} and {second} are both at step {a.step}")
    return ordered
