"""A SQLite file brought from outside the cluster (`litefs import`).

It is checked in full before anything of the cluster changes: the header,
the page size, a size of whole pages, and SQLite's own `integrity_check`.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from litefs import ltx

HEADER_SIZE = 100
CHANGE_COUNTER = slice(24, 28)
VERSION_VALID_FOR = slice(92, 96)
INTEGRITY_ERRORS_SHOWN = 3


class InvalidSQLiteFile(Exception):
    """The file is not a sound SQLite database; the text says why."""


def check(path: Path) -> int:
    """Check a SQLite file completely; returns its page count."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        raise InvalidSQLiteFile(f"not a SQLite database: only {size} bytes")
    try:
        page_size = ltx.sqlite_page_size(header)
    except ltx.InvalidDatabase as exc:
        raise InvalidSQLiteFile(str(exc)) from None
    if size % page_size:
        raise InvalidSQLiteFile(
            f"its size ({size} bytes) is not a whole number of {page_size}-byte pages"
        )
    _integrity_check(path)
    return size // page_size


def _integrity_check(path: Path) -> None:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error as exc:
        raise InvalidSQLiteFile(f"SQLite cannot open it: {exc}") from None
    try:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    except sqlite3.Error as exc:
        raise InvalidSQLiteFile(f"integrity_check failed: {exc}") from None
    finally:
        conn.close()
    if problems != ["ok"]:
        shown = "; ".join(problems[:INTEGRITY_ERRORS_SHOWN])
        more = len(problems) - INTEGRITY_ERRORS_SHOWN
        raise InvalidSQLiteFile(
            f"integrity_check found problems: {shown}" + (f" (and {more} more)" if more > 0 else "")
        )


def follow_change_counter(path: Path, previous: bytes) -> None:
    """Give the file a change counter past `previous` (the header of the
    database it replaces): connections that cached the old content see the
    counter move and drop their caches, as after any commit."""
    with open(path, "r+b") as f:
        header = bytearray(f.read(HEADER_SIZE))
        old = int.from_bytes(previous[CHANGE_COUNTER], "big") if len(previous) >= 28 else 0
        new = int.from_bytes(header[CHANGE_COUNTER], "big")
        counter = (max(old, new) + 1) & 0xFFFFFFFF
        valid = header[CHANGE_COUNTER] == header[VERSION_VALID_FOR]
        header[CHANGE_COUNTER] = counter.to_bytes(4, "big")
        if valid:
            header[VERSION_VALID_FOR] = counter.to_bytes(4, "big")
        f.seek(0)
        f.write(header)
