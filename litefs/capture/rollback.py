"""Capture of transactions made with a rollback journal (DELETE, TRUNCATE,
PERSIST).

SQLite writes and syncs the journal header (its magic at offset 0) before it
changes the database, and ends the transaction by deleting the journal,
truncating it to zero, or zeroing its header. The database file's writes in
between name the pages that changed; at the ending operation, before it is
carried out, the transaction is recorded, so a crash leaves either a hot
journal to roll back or an LTX file that matches the database.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from litefs.capture import SMALL_TRANSACTION, CrashPoints

if TYPE_CHECKING:
    from litefs.db import Database, Position

T = TypeVar("T")

JOURNAL_MAGIC = b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7"


class RollbackJournal:
    """The `-journal` file of one database, as SQLite uses it."""

    def __init__(self, db: Database, crash: CrashPoints) -> None:
        self.db = db
        self.path = db.path / "journal"
        self.crash = crash
        self.active = False
        """A transaction is under way: the header's magic has been written."""

    # -- what the mount asks ----------------------------------------------

    def check_writable(self) -> None:
        """A journal is opened for writing only to begin a transaction,
        which only the primary may do."""
        self.db.check_writable()

    def write_blocks(self, offset: int, data: bytes) -> bool:
        return self._write_commits(offset, data) and self._large()

    def truncate_blocks(self, size: int) -> bool:
        return self.active and size == 0 and self._large()

    def remove_blocks(self) -> bool:
        return self.active and self._large()

    def settle(self, wait: bool = True) -> None:
        return None

    def _write_commits(self, offset: int, data: bytes) -> bool:
        """PERSIST ends a transaction by zeroing the header's magic."""
        return self.active and offset == 0 and len(data) >= 8 and not any(data[:8])

    def _large(self) -> bool:
        return self.db.written_bytes() > SMALL_TRANSACTION

    # -- file operations ---------------------------------------------------

    def write(self, fd: int, offset: int, data: bytes, wait: bool = True) -> int:
        if offset == 0 and len(data) >= 8:
            if data[:8] == JOURNAL_MAGIC:
                self._begin(wait)
            elif self._write_commits(offset, data):
                return self._commit_then(lambda: os.pwrite(fd, data, offset), wait)
        return os.pwrite(fd, data, offset)

    def truncate(self, size: int, wait: bool = True) -> None:
        if self.active and size == 0:
            self._commit_then(lambda: os.truncate(self.path, 0), wait)
        else:
            os.truncate(self.path, size)

    def remove(self, wait: bool = True) -> None:
        if self.active:
            self._commit_then(lambda: os.unlink(self.path), wait)
        else:
            os.unlink(self.path)

    # -- transactions ------------------------------------------------------

    def _begin(self, wait: bool) -> None:
        """A transaction may go on after the node stepped down (to roll
        back), but none may begin. Writes made outside any transaction
        before it are recorded first, as their own."""
        if not self.active:
            self.db.check_writable()
            self.db.settle_unjournaled(wait)
            self.db.begin_transaction()
        self.active = True

    def _commit_then(self, end: Callable[[], T], wait: bool) -> T:
        self.commit(wait)
        self.crash("before-journal-removal")
        result = end()
        self.crash("after-journal-removal")
        return result

    def commit(self, wait: bool = True) -> Position | None:
        """Record the transaction that is ending; None when nothing changed
        (a rollback writes every page back as it was)."""
        db = self.db
        with db.locked(wait):
            try:
                return db.record_written_pages()
            finally:
                self.active = False

    def is_hot(self) -> bool:
        """Whether the journal on disk holds a transaction a crash interrupted."""
        return journal_is_hot(self.path)


def journal_is_hot(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == JOURNAL_MAGIC
    except FileNotFoundError:
        return False
