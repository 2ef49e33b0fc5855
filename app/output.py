"""Printing tables on the command line: rich table, CSV or JSON; and Arrow results as
DataFrames whatever their column types; token strings made readable (``readable_token``).

User-controlled text (cells, column names, titles, error messages) is never read as rich markup,
and a table or an error shows its control characters escaped (``printable``)."""

from __future__ import annotations

import datetime
import json
import math
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
from rich.console import Console
from rich.table import Table
from rich.text import Text

FORMATS = ("table", "csv", "json")
_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥"}


def wide_console() -> Console:
    """A console at least 160 columns wide, so that tables do not fold on a narrow terminal."""
    return Console(width=max(Console().width, 160))


def plain(value):
    """A value as JSON-ready Python: blobs (hash codes) as hex, nested lists and structs
    element by element, numpy scalars as numbers, NaN and NA as None, times as ISO text."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime.date | datetime.time | pd.Timestamp):
        return value.isoformat()
    return str(value)  # decimals, UUIDs, intervals, ...


def printable(text: str) -> str:
    """``text`` with each unprintable character (newline, escape, ...) written as its Python
    escape (``\\n``, ``\\x1b``): it stays on one line and cannot restyle the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def echo_error(err: Exception | str) -> None:
    """The CLI's one line for bad input, on stderr: ``error: ...``, control characters escaped."""
    print(f"error: {printable(str(err))}", file=sys.stderr)


def cell_text(value) -> str:
    """A printable cell (no markup)."""
    value = plain(value)
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def frame(table: pa.Table) -> pd.DataFrame:
    """An Arrow result as a DataFrame: columns pandas cannot hold (unions, some nested or
    extension types) become their values as Python objects."""
    columns = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        try:
            columns[name] = column.to_pandas()
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            columns[name] = pd.Series(column.to_pylist(), dtype=object)
    return pd.DataFrame(columns) if columns else pd.DataFrame(index=range(table.num_rows))


def emit(df: pd.DataFrame, fmt: str = "table", title: str | None = None) -> None:
    """Print a result as a rich table, CSV or JSON."""
    names = [str(c) for c in df.columns]
    if fmt == "csv":
        df.map(cell_text).set_axis(names, axis=1).to_csv(sys.stdout, index=False)
    elif fmt == "json":
        records = [dict(zip(names, map(plain, row), strict=True)) for row in df.itertuples(False)]
        print(json.dumps(records, indent=2, ensure_ascii=False))
    else:
        table = Table(title=Text(printable(title)) if title else None, show_lines=False)
        for col in names:
            table.add_column(Text(printable(col)), overflow="fold")
        for row in df.itertuples(index=False):
            table.add_row(*(Text(printable(cell_text(v))) for v in row))
        wide_console().print(table)


def readable_token(text: str, raw: bytes | None = None) -> str:
    """A token's text with nothing invisible: spaces as ␣, newlines as ↵, tabs as ⇥, other
    unprintable characters as ``<0xNN>`` (ASCII) or ``<U+NNNN>``, the empty token as ∅.

    U+FFFD (bytes the tokenizer cannot decode alone) becomes those bytes as ``<0xNN>`` when
    ``raw``, the token's bytes, is known (see ``feature_page.token_bytes``), else ``<0x??>``.
    The result is plain text: escape it before putting it in HTML.
    """
    if "\ufffd" in text and raw is not None:
        text = raw.decode("utf-8", "surrogateescape")  # bytes that do not decode -> U+DC80..FF
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"<0x{code - 0xDC00:02X}>")
        elif ch == "\ufffd":
            out.append("<0x??>")
        elif not ch.isprintable():
            out.append(f"<0x{code:02X}>" if code < 0x80 else f"<U+{code:04X}>")
        else:
            out.append(ch)
    return "".join(out) or "∅"
