"""DuckDB reads every file name given to ``read_parquet`` as a glob pattern: a store path
holding ``*``, ``?``, ``[`` or ``]`` must be escaped to mean itself."""

from __future__ import annotations

from pathlib import Path

_SPECIAL = {"*": "[*]", "?": "[?]", "[": "[[]", "]": "[]]"}


def glob_literal(path: Path | str) -> str:
    """``path`` as a glob pattern that matches exactly that path."""
    return "".join(_SPECIAL.get(c, c) for c in str(path))


def sql_string(text: str) -> str:
    """``text`` as a single-quoted SQL string literal."""
    return "'" + text.replace("'", "''") + "'"
