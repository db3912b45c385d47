"""Capture of transactions made with a rollback journal (DELETE, TRUNCATE,
PERSIST).

SQLite writes and syncs the journal header (its magic at offset 0) before it
changes the database, and ends the transaction by deleting the journal,
truncating it to zero, or zeroing its header. The database file's writes in
between name the pages that changed; at the ending operation, before it is
carried out, the transaction is recorded, so a crash leaves either a hot
journal to roll back or an LTX file that matches the database.

The kernel caches writes (the mount's writeback cache), so what reaches the
daemon is what SQLite synced. Unless `synchronous=OFF`, SQLite syncs the
journal before it writes the database and the database before it ends the
journal, so at the ending operation the daemon holds every page. When it
cannot know that (the header or the database sync never came: OFF), the
database's cached pages are pulled from the kernel before the transaction
is recorded.

A journal SQLite deletes stays on disk, emptied, so that the next
transaction need not create a file: on ext4 here a file's creation costs
about a tenth of a small commit, and syncing the new name another twentieth.
An empty journal is one SQLite sees only while it has the journal created.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from litefs.capture import SMALL_TRANSACTION, CrashPoints, create_file

if TYPE_CHECKING:
    from litefs.db import Database
    from litefs.position import Position

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
        self.database_synced = False
        """The database file was synced since the transaction began."""
        self.created = False
        """SQLite created the journal and has not deleted it."""

    # -- what the mount asks ----------------------------------------------

    def check_writable(self) -> None:
        """A journal is opened for writing only to begin a transaction,
        which only the primary may do."""
        self.db.check_writable()

    def write_blocks(self, offset: int, data: bytes) -> bool:
        return self._write_ends(offset, data) and self._ending_blocks()

    def truncate_blocks(self, size: int) -> bool:
        return size == 0 and self._ending_blocks()

    def remove_blocks(self) -> bool:
        return self._removal_pulls() or self.db.written_bytes() > SMALL_TRANSACTION

    def settle(self, wait: bool = True) -> None:
        return None

    def synced(self, wait: bool = True) -> None:
        return None

    def _ending_blocks(self) -> bool:
        """Pulling pages from the kernel must not run on the mount's loop,
        which serves the writes it causes."""
        return not self._holds_every_page() or self.db.written_bytes() > SMALL_TRANSACTION

    def _write_ends(self, offset: int, data: bytes) -> bool:
        """PERSIST ends a transaction by zeroing the header's magic. (With
        `synchronous=FULL` a transaction also begins with a zeroed magic,
        written again once the journal is synced.)"""
        return self.active and offset == 0 and len(data) >= 8 and not any(data[:8])

    def _holds_every_page(self) -> bool:
        return self.active and self.database_synced

    # -- file operations ---------------------------------------------------

    def write(self, fd: int, offset: int, data: bytes, wait: bool = True) -> int:
        if offset == 0 and len(data) >= 8:
            if data[:8] == JOURNAL_MAGIC:
                self._begin()
            elif self._write_ends(offset, data):
                return self._commit_then(lambda: os.pwrite(fd, data, offset), wait)
        return os.pwrite(fd, data, offset)

    def truncate(self, size: int, wait: bool = True) -> None:
        if size == 0:
            self._commit_then(lambda: os.truncate(self.path, 0), wait)
        else:
            os.truncate(self.path, size)

    def exists(self) -> bool:
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return False
        return size > 0 or self.created

    def create(self, mode: int, uid: int, gid: int) -> bool:
        """Reuse the emptied journal a deleted one left, if there is one."""
        try:
            os.chmod(self.path, mode)
            os.chown(self.path, uid, gid)
            new = False
        except FileNotFoundError:
            create_file(self.path, mode, uid, gid)
            new = True
        self.created = True
        return new

    def remove(self, wait: bool = True, *, in_use: bool = False) -> None:
        end = self._delete if in_use else self._empty
        self._commit_then(end, wait, pull=self._removal_pulls())

    def _empty(self) -> None:
        os.truncate(self.path, 0)
        self.created = False

    def _delete(self) -> None:
        os.unlink(self.path)
        self.created = False

    def _removal_pulls(self) -> bool:
        """Deleting the journal ends a transaction whose header the daemon
        saw unless SQLite wrote no page of it: without `synchronous=OFF`
        the header is synced before the first page, and with OFF it is
        written with its magic from the start and reaches the daemon when
        the journal is closed, before it is deleted."""
        return self.active and not self.database_synced

    def database_was_synced(self) -> None:
        """The database file was synced: the daemon holds all its pages."""
        self.database_synced = True

    # -- transactions ------------------------------------------------------

    def _begin(self) -> None:
        """A transaction may go on after the node stepped down (to roll
        back), but none may begin. Writes that reached the database before
        the header did are kept as part of it: with the kernel caching, the
        header may come late, and recording them apart could record half a
        transaction."""
        if not self.active:
            self.db.check_writable()
            self.database_synced = False
        self.active = True

    def _commit_then(self, end: Callable[[], T], wait: bool, *, pull: bool | None = None) -> T:
        self.commit(wait, pull=pull)
        self.crash("before-journal-removal")
        result = end()
        self.crash("after-journal-removal")
        return result

    def commit(self, wait: bool = True, *, pull: bool | None = None) -> Position | None:
        """Record the transaction that is ending; None when nothing changed
        (a rollback writes every page back as it was). Unless `pull` says,
        the kernel's cached pages are pulled first when the daemon cannot
        know it holds them all."""
        db = self.db
        if not self._holds_every_page() if pull is None else pull:
            db.pull_cached_pages()
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
