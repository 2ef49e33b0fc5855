"""Printing tables on the command line: rich table, CSV or JSON."""

from __future__ import annotations

import json
import sys

import pandas as pd
from rich.console import Console
from rich.table import Table

FORMATS = ("table", "csv", "json")


def emit(df: pd.DataFrame, fmt: str = "table", title: str | None = None) -> None:
    if fmt == "csv":
        df.to_csv(sys.stdout, index=False)
    elif fmt == "json":
        print(json.dumps(json.loads(df.to_json(orient="records", date_format="iso")), indent=2))
    else:
        table = Table(title=title, show_lines=False)
        for col in df.columns:
            table.add_column(str(col), overflow="fold")
        for row in df.itertuples(index=False):
            table.add_row(*("" if pd.isna(v) else str(v) for v in row))
        Console(width=max(Console().width, 160)).print(table)
