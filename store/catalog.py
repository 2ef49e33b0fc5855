"""The catalog (``catalog.duckdb``): runs, models, SAEs and the schema version.

The catalog is opened briefly for each read or transaction and closed again, so
a probe job, the dashboard and a user's DuckDB session can share one store.
DuckDB lets one process write a database file at a time; a connection that
meets another process's lock waits and retries.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import duckdb

from sparsescope.store.errors import StoreError
from sparsescope.store.schema import MIGRATIONS, SCHEMA_VERSION

CATALOG = "catalog.duckdb"
LOCK_TIMEOUT_S = 60.0


def _is_lock_error(err: duckdb.Error) -> bool:
    """Another process holds the catalog (not, say, a corrupt "block" of it)."""
    return re.search(r"\block\b", str(err), re.IGNORECASE) is not None


@contextmanager
def connect(root: Path, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the catalog, waiting while another process holds its lock."""
    path = root / CATALOG
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.Error as err:
            if not _is_lock_error(err) or time.monotonic() > deadline:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise StoreError(f"cannot open the catalog of {root}: {first}") from None
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 0.2)
    try:
        yield con
    finally:
        con.close()


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The catalog's schema version (0 for an empty catalog); a DuckDB file holding other
    tables is refused."""
    tables = {
        r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()
    }
    if "schema_version" not in tables:
        if tables:
            names = ", ".join(sorted(tables)[:5])
            raise StoreError(f"its {CATALOG} is not a SparseScope catalog (it holds {names})")
        return 0
    return con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0] or 0


def migrate(con: duckdb.DuckDBPyConnection, root: Path) -> int:
    """Apply pending migrations to the store at ``root`` in one catalog transaction;
    returns the new version."""
    current = schema_version(con)
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"store schema v{current} is newer than this SparseScope (v{SCHEMA_VERSION}): upgrade"
        )
    if current == SCHEMA_VERSION:
        return current
    con.execute("BEGIN")
    if current == 0:
        con.execute("CREATE TABLE schema_version (version INTEGER, applied_at TIMESTAMP)")
    for version in range(current + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[version](con, root)
        con.execute("INSERT INTO schema_version VALUES (?, now())", [version])
    con.execute("COMMIT")
    return SCHEMA_VERSION


def is_store(root: Path) -> bool:
    return (Path(root) / CATALOG).is_file()


def store_path(root: object) -> Path:
    """``root`` as a Path; a one-line StoreError when it is no path (``None``, a number)."""
    if not isinstance(root, str | os.PathLike):
        raise StoreError(f"a store is a folder path, not {root!r}")
    return Path(root)


def find_store(root: Path) -> Path:
    """``root`` as a Path if it holds a catalog file, else a one-line StoreError (the catalog
    itself is checked when it is opened: :func:`open_readable`)."""
    root = store_path(root)
    if not root.exists():
        raise StoreError(
            f"store {root} does not exist: run `sparsescope probe --store {root}` first"
        )
    if not is_store(root):
        raise StoreError(f"{root} is not a SparseScope store (no {CATALOG})")
    return root


@contextmanager
def open_readable(root: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """The catalog opened read-only, if it is one this SparseScope can read; else a one-line
    StoreError (not DuckDB, not ours, empty, or newer)."""
    stack = ExitStack()
    try:
        con = stack.enter_context(connect(root, read_only=True))
        version = schema_version(con)
        if version == 0:
            raise StoreError(f"its {CATALOG} is empty")
    except StoreError as err:
        stack.close()
        raise StoreError(f"{root} is not a SparseScope store: {err}") from None
    if version > SCHEMA_VERSION:
        stack.close()
        raise StoreError(f"store {root} has schema v{version}, newer than this SparseScope's")
    if version < SCHEMA_VERSION:
        stack.close()
        raise StoreError(
            f"store {root} has schema v{version}: upgrade it to v{SCHEMA_VERSION} with"
            f" `sparsescope store upgrade --store {root}`"
        )
    with stack:
        yield con


def check_store(root: Path) -> Path:
    """Return ``root`` as a Path if it is a store this SparseScope can read, else raise a
    one-line StoreError."""
    root = find_store(root)
    with open_readable(root):
        return root


def _check_folder(root: Path) -> None:
    if "?" in str(root.resolve()):
        raise StoreError(f"store path {root} holds '?', which DuckDB reads as URL parameters")
    if root.exists() and not root.is_dir():
        raise StoreError(f"store path {root} is a file, not a folder")
    if root.is_dir() and not is_store(root) and any(root.iterdir()):
        raise StoreError(f"{root} is not empty and not a SparseScope store: choose another path")


def check_writable(root: Path) -> Path:
    """Raise the one-line StoreError that writing a run to ``root`` would meet, changing
    nothing: for commands that fail fast before long work. A missing folder is fine."""
    root = Path(root)
    _check_folder(root)
    return check_store(root) if is_store(root) else root


def init_store(root: Path) -> Path:
    """Create a store at ``root`` (an absent or empty folder) or upgrade an existing one."""
    root = store_path(root)
    _check_folder(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        with connect(root) as con:  # the catalog first: a bad one leaves the folder as it was
            migrate(con, root)
    except StoreError as err:
        raise StoreError(f"{root} is not a SparseScope store: {err}") from None
    for sub in ("data", "staging"):
        (root / sub).mkdir(exist_ok=True)
    return root
