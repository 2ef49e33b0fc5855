"""Printing tables on the command line: rich table, CSV or JSON; and Arrow results as
DataFrames whatever their column types.

User-controlled text (cells, column names, titles) is never read as rich markup."""

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
        table = Table(title=Text(title) if title else None, show_lines=False)
        for col in names:
            table.add_column(Text(col), overflow="fold")
        for row in df.itertuples(index=False):
            table.add_row(*(Text(cell_text(v)) for v in row))
        wide_console().print(table)
