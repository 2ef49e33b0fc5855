"""Printing tables on the command line: rich table, CSV or JSON."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

FORMATS = ("table", "csv", "json")


def wide_console() -> Console:
    """A console at least 160 columns wide, so that tables do not fold on a narrow terminal."""
    return Console(width=max(Console().width, 160))


def _cell(value) -> str:
    """A printable cell: blobs (hash codes) as hex, lists and arrays as text, nulls empty."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, list | tuple | dict | np.ndarray):
        return str(value.tolist() if isinstance(value, np.ndarray) else value)
    return "" if pd.isna(value) else str(value)


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    """Blob columns as hex strings (JSON and CSV cannot carry raw bytes)."""
    blobs = [c for c in df.columns if df[c].map(lambda v: isinstance(v, bytes)).any()]
    return df.assign(**{c: df[c].map(_cell) for c in blobs})


def emit(df: pd.DataFrame, fmt: str = "table", title: str | None = None) -> None:
    """Print a result as a rich table, CSV or JSON."""
    if fmt == "csv":
        _plain(df).to_csv(sys.stdout, index=False)
    elif fmt == "json":
        text = _plain(df).to_json(orient="records", date_format="iso")
        print(json.dumps(json.loads(text), indent=2))
    else:
        table = Table(title=title, show_lines=False)
        for col in df.columns:
            table.add_column(str(col), overflow="fold")
        for row in df.itertuples(index=False):
            table.add_row(*(_cell(v) for v in row))
        wide_console().print(table)
