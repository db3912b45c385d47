"""One replicated SQLite database: its files, position, page checksums, the
recording of each committed transaction as an LTX file, applying received
ones, and recovery.

Which transaction committed, and when, is learned by the capture modules
(`litefs.capture.rollback` for rollback journals, `litefs.capture.wal` for
WAL), which this class owns, one per journal file. The database file's own
writes tell which pages a rollback-journal transaction touched. Whatever the
journal mode, `record_transaction` writes one LTX file before the operation
that makes the transaction durable for SQLite goes ahead, so a crash of the
daemon leaves either something SQLite rolls back or an LTX file matching the
database, and `recover` tells the two apart at start-up. When the file is
synced is a `Sync` choice.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from pathlib import Path
from typing import BinaryIO, Protocol

from litefs import clean_stop, ltx, walapply
from litefs.capture import NO_CRASH, CrashPoints, Sync, WouldBlock, read_page_at
from litefs.capture.rollback import RollbackJournal, journal_is_hot
from litefs.capture.wal import SharedMemory, WriteAheadLog
from litefs.ltx import SQLITE_MAGIC
from litefs.position import EMPTY_POSITION, Position
from litefs.spares import SpareFiles

log = logging.getLogger("litefs.db")

HANDED_OVER_PAGES = 256
"""The most pages of an applied transaction handed to the kernel's cache one
by one; past that, it drops them all and readers fetch what they need."""


PageReader = Callable[[int], bytes]
"""Returns the content of a page (by number) as of the transaction being recorded."""


class CommitEvents(Protocol):
    """What a database asks of its store when it records a transaction."""

    def commit_allowed(self) -> bool:
        """False once the lease may have passed to another node."""
        ...

    def committed(self, name: str) -> None:
        """Called after each recorded transaction, from the recording thread."""
        ...

    def pull_cached_pages(self, name: str) -> None:
        """Have the kernel write back the pages of the database file it
        caches and the daemon has not seen. Never called on the mount's
        event loop, which serves those writes."""
        ...


class _Unobserved:
    def commit_allowed(self) -> bool:
        return True

    def committed(self, name: str) -> None:
        return None

    def pull_cached_pages(self, name: str) -> None:
        return None


class DatabaseError(Exception):
    """Base of the errors a database operation reports to its caller."""


class ReadOnlyError(DatabaseError):
    """A write reached a database this node does not own (it is a replica)."""


class NotPermitted(DatabaseError):
    """An operation that would break a database's replicated history."""


class PositionMismatch(DatabaseError):
    """A received LTX file does not continue this database's history."""


class RecoveryError(DatabaseError):
    """A crashed transaction could not be settled."""


class Content(Enum):
    """What a database file holds, decided from its first bytes."""

    EMPTY = "empty"
    SQLITE = "sqlite"
    PLAIN = "plain"
    """Not SQLite: kept as a local file and never replicated."""


class MainFile:
    """The database file as the mount drives it (see `SQLiteFile`): writes
    go through `Database.write`, which tracks the pages they touch."""

    __slots__ = ("db", "path")

    def __init__(self, db: Database) -> None:
        self.db = db
        self.path = db.database_path

    def check_writable(self) -> None:
        self.db.check_writable()

    def write(self, fd: int, offset: int, data: bytes, wait: bool = True) -> int:
        return self.db.write(offset, data)

    def write_blocks(self, offset: int, data: bytes) -> bool:
        return False

    def truncate(self, size: int, wait: bool = True) -> None:
        self.db.truncate(size)

    def truncate_blocks(self, size: int) -> bool:
        return False

    def exists(self) -> bool:
        return True

    def create(self, mode: int, uid: int, gid: int) -> bool:
        raise NotPermitted("a database is created through its store")

    def remove(self, wait: bool = True, *, in_use: bool = False) -> None:
        raise NotPermitted("a database is removed through its store")

    def remove_blocks(self) -> bool:
        return False

    def settle(self, wait: bool = True) -> None:
        self.db.settle_unjournaled(wait)

    def synced(self, wait: bool = True) -> None:
        self.db.journal.database_was_synced()
        self.db.settle_unjournaled(wait)


class Database:
    """A database directory `<data>/dbs/<name>/` and its in-memory state.

    Thread-safe: the FUSE thread writes through it while commits and recovery
    run in worker threads.
    """

    def __init__(
        self,
        name: str,
        path: Path,
        *,
        crash: CrashPoints = NO_CRASH,
        events: CommitEvents | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.database_path = path / "database"
        self.journal_path = path / "journal"
        self.wal_path = path / "wal"
        self.shm_path = path / "shm"
        self.ltx_dir = path / "ltx"
        self.spares = SpareFiles(self.ltx_dir)
        self.applying_path = path / "applying"
        self.clean_stop_path = path / "clean-stop"
        self.lock = threading.RLock()
        self.crash = crash
        self.events: CommitEvents = events or _Unobserved()
        self.journal = RollbackJournal(self, crash)
        self.wal = WriteAheadLog(self, crash)
        self.shm = SharedMemory(self)
        self.main_file = MainFile(self)
        self.fd = -1
        self.page_size = 0
        self._write_page_size = 0
        self.content = Content.EMPTY
        self.position = EMPTY_POSITION
        self.writable = True
        self.wal_mode = False
        """The committed header says WAL: the file is written by checkpoints."""
        self._unjournaled = False
        """Writes outside any transaction wait to be recorded."""
        self._checksums = array.array("Q")
        self._xor = 0
        self._dirty: set[int] = set()
        self._size_changed = False
        self.applied_pages: list[tuple[int, bytes]] | None = None
        """Every page the last apply changed, when it changed nothing else
        and few enough of them (rollback-journal databases only)."""

    # -- life cycle -------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        path: Path,
        mode: int = 0o644,
        *,
        crash: CrashPoints = NO_CRASH,
        events: CommitEvents | None = None,
    ) -> Database:
        """Lay out a new, empty database directory and open it."""
        path.mkdir(parents=True, exist_ok=False)
        (path / "ltx").mkdir()
        fd = os.open(path / "database", os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        os.close(fd)
        db = cls(name, path, crash=crash, events=events)
        db.open()
        return db

    @classmethod
    def from_sqlite_file(cls, name: str, path: Path, source: Path) -> Database:
        """Lay out a new database directory around a checked SQLite file,
        which becomes the database file itself (moved, not copied), with one
        snapshot as its history. The file is read once, to write the
        snapshot; the page checksums that pass computes are left as a clean
        stop's would be, so opening reads nothing more."""
        path.mkdir(parents=True, exist_ok=False)
        (path / "ltx").mkdir()
        db = cls(name, path)
        os.rename(source, db.database_path)
        os.chmod(db.database_path, 0o644)
        snapshot = db.ltx_dir / ltx.format_filename(1, 1)
        checksums = array.array("Q")
        with open(db.database_path, "rb") as src, open(snapshot, "wb") as out:
            header, trailer = ltx.encode_snapshot(src, out, checksums=checksums)
        state = clean_stop.CleanStop(1, trailer.post_apply_checksum, header.page_size, checksums)
        clean_stop.save(db.clean_stop_path, state, db.database_path, snapshot)
        db.open()
        return db

    def open(self) -> None:
        """Open the database file and load its state, recovering from a crash."""
        self.ltx_dir.mkdir(exist_ok=True)
        self.spares.adopt()
        self.fd = os.open(self.database_path, os.O_RDWR | os.O_CLOEXEC)
        self.recover()

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                self._save_clean_stop()
                os.close(self.fd)
                self.fd = -1
            self.spares.close()

    def _save_clean_stop(self) -> None:
        """Leave the checksums for the next start, when they describe the
        file alone: no transaction under way, no WAL holding pages."""
        if (
            self.content is not Content.SQLITE
            or not self.position.txid
            or self.checksum != self.position.checksum
            or self.journal.active
            or self._unjournaled
            or self._dirty
            or self.wal.path.exists()
        ):
            return
        files = self.ltx_files()
        state = clean_stop.CleanStop(
            self.position.txid, self.position.checksum, self.page_size, self._checksums
        )
        try:
            clean_stop.save(
                self.clean_stop_path, state, self.database_path, files[-1][2] if files else None
            )
        except OSError as exc:
            log.warning("database %s: checksums not saved for the next start: %s", self.name, exc)

    @property
    def checksum(self) -> int:
        """The database checksum of the contents as of the last commit."""
        return self._xor | ltx.CHECKSUM_FLAG

    @property
    def page_count(self) -> int:
        return len(self._checksums)

    @contextlib.contextmanager
    def locked(self, wait: bool = True) -> Iterator[None]:
        """Hold the database's lock; without `wait`, raise WouldBlock if
        another thread holds it (the mount's event loop must not wait)."""
        if not self.lock.acquire(blocking=wait):
            raise WouldBlock(self.name)
        try:
            yield
        finally:
            self.lock.release()

    def written_bytes(self) -> int:
        """How much the rollback-journal transaction under way has written."""
        return len(self._dirty) * self._write_page_size

    def uses_wal(self) -> bool:
        """Whether connections may have the database open in WAL mode."""
        return self.wal_mode or self.wal.path.exists() or self.shm.path.exists()

    def check_writable(self) -> None:
        """Only the primary changes a database; the store sets `writable`."""
        if not self.writable:
            raise ReadOnlyError(f"database {self.name} is read-only on a replica")

    # -- the database file (hot path) --------------------------------------

    def write(self, offset: int, data: bytes) -> int:
        """Write through to the database file, remembering the pages touched."""
        if not self.journal.active and self._write_outside_transaction(offset, data):
            return os.pwrite(self.fd, data, offset)
        if offset == 0 and self.content is not Content.PLAIN:
            self._check_page_one(data)
        written = os.pwrite(self.fd, data, offset)
        page_size = self._write_page_size
        if page_size:
            first = offset // page_size + 1
            last = (offset + written - 1) // page_size + 1
            if first == last:
                self._dirty.add(first)
            else:
                self._dirty.update(range(first, last + 1))
        return written

    def truncate(self, size: int) -> None:
        """Truncate the database file.

        SQLite may shrink the file just after the journal is gone (while it
        still holds its exclusive lock) to the size the committed header
        already records, and a checkpoint shrinks it to the size the WAL
        records; neither changes what the LTX files say.
        """
        committed_size = self.page_count * self.page_size
        active = self.journal.active
        rolling_back = active and size == committed_size
        if not self.writable and not rolling_back:
            raise ReadOnlyError(f"database {self.name} is read-only on a replica")
        if (
            not active
            and not self.wal_mode
            and self.content is not Content.PLAIN
            and size != committed_size
        ):
            self._unjournaled = True
        os.ftruncate(self.fd, size)
        self._size_changed = True

    def _write_outside_transaction(self, offset: int, data: bytes) -> bool:
        """Check a write no rollback journal covers; True when it changes no
        content (a WAL checkpoint copying committed pages back). Any other
        is recorded by `settle_unjournaled`."""
        self.check_writable()
        if self.wal_mode:
            return True
        content = self.content
        if content is Content.PLAIN:
            return False
        if content is Content.EMPTY and not (offset == 0 and data[:16] == SQLITE_MAGIC):
            self.content = Content.PLAIN
            return False
        self._unjournaled = True
        return False

    def settle_unjournaled(self, wait: bool = True) -> Position | None:
        """Record the writes made outside any transaction, as one LTX file.

        They come from a database file copied into the mount, from tools
        that write a database directly, and from SQLite in journal modes
        OFF and MEMORY, which keep no journal on disk: such a write can only
        be known complete when the file is synced or closed, which is when
        this runs; a journaled transaction ending first records them with
        its own pages.
        """
        if not self._unjournaled:
            return None
        with self.locked(wait):
            if not self._unjournaled:
                return None
            self._unjournaled = False
            return self.record_written_pages()

    def _check_page_one(self, data: bytes) -> None:
        if data[:16] != SQLITE_MAGIC:
            return
        self.content = Content.SQLITE
        self._write_page_size = ltx.sqlite_page_size(data)

    def pull_cached_pages(self) -> None:
        """Make sure the database file holds every page SQLite wrote, though
        the kernel may still cache some (see `CommitEvents`)."""
        self.events.pull_cached_pages(self.name)

    # -- recording transactions ---------------------------------------------

    def record_written_pages(self, timestamp: int | None = None) -> Position | None:
        """Record the rollback-journal transaction that is ending: the pages
        written to the file since it began, and any the file grew by.

        Returns the new position, or None when nothing changed (a rollback,
        or a transaction that wrote back what was there).
        """
        with self.lock:
            if not self._dirty and not self._size_changed:
                return None
            try:
                return self._record_written_pages(timestamp)
            finally:
                self._dirty.clear()
                self._size_changed = False
                self._unjournaled = False

    def _record_written_pages(self, timestamp: int | None) -> Position | None:
        size = os.fstat(self.fd).st_size
        if size == 0 and self.position.txid == 0:
            return None
        header = os.pread(self.fd, 100, 0)
        if header[:16] != SQLITE_MAGIC:
            return None
        page_size = ltx.sqlite_page_size(header)
        commit = _committed_page_count(header, size, page_size)
        snapshot = self.position.txid == 0 or page_size != self.page_size
        self.content = Content.SQLITE
        pages: range | list[int]
        if snapshot:
            pages = range(1, commit + 1)
        else:
            grown = range(self.page_count + 1, commit + 1)
            pages = sorted({p for p in self._dirty if p <= commit}.union(grown))
        return self.record_transaction(
            pages,
            commit,
            page_size,
            self._file_page_reader(page_size),
            snapshot=snapshot,
            timestamp=timestamp,
            sync=Sync.FILESYSTEM,
        )

    def _file_page_reader(self, page_size: int) -> PageReader:
        fd = self.fd

        def read_page(pgno: int) -> bytes:
            return os.pread(fd, page_size, (pgno - 1) * page_size)

        return read_page

    def record_current_state(self, read_page: PageReader) -> Position | None:
        """Record every page as a snapshot at the next TXID."""
        with self.lock:
            commit = self.page_count
            return self.record_transaction(
                range(1, commit + 1), commit, self.page_size, read_page, snapshot=True
            )

    def record_transaction(
        self,
        pages: Iterable[int],
        commit: int,
        page_size: int,
        read_page: PageReader,
        *,
        snapshot: bool,
        timestamp: int | None = None,
        sync: Sync = Sync.NOW,
    ) -> Position | None:
        """Write and adopt one LTX file for a committed transaction.

        `pages` (ascending) are those the transaction may have changed;
        only the ones whose checksum differs from the recorded state go into
        the file. A node that may no longer commit (a replica, or a primary
        past its lease's deadline) refuses any change, but lets a
        transaction that changed nothing end.

        `sync` says when the file is synced.
        """
        with self.lock:
            pages = pages if isinstance(pages, (range, list)) else list(pages)
            if not (self.writable and self.events.commit_allowed()):
                if self._changes(pages, commit, page_size, read_page, snapshot):
                    raise ReadOnlyError(
                        f"database {self.name}: this node stopped being the primary "
                        "before the transaction committed"
                    )
                return None
            try:
                position = self._write_ltx(
                    pages, commit, page_size, read_page, snapshot, timestamp, sync
                )
            except OSError as exc:
                log.error(
                    "database %s: the commit fails: its LTX file cannot be written: %s",
                    self.name,
                    exc.strerror or exc,
                )
                raise
        if position is not None:
            self.events.committed(self.name)
        return position

    def _changes(
        self,
        pages: range | list[int],
        commit: int,
        page_size: int,
        read_page: PageReader,
        snapshot: bool,
    ) -> bool:
        if snapshot or commit != self.page_count or page_size != self.page_size:
            return commit != 0 or self.page_count != 0
        checksums = self._checksums
        lock_pgno = ltx.lock_page(page_size)
        for pgno in pages:
            if pgno == lock_pgno:
                continue
            if ltx.page_checksum(pgno, read_page(pgno)) != checksums[pgno - 1]:
                return True
        return False

    def _write_ltx(
        self,
        pages: range | list[int],
        commit: int,
        page_size: int,
        read_page: PageReader,
        snapshot: bool,
        timestamp: int | None,
        sync: Sync,
    ) -> Position | None:
        old = self._checksums
        lock_pgno = ltx.lock_page(page_size)
        txid = self.position.txid + 1
        min_txid = 1 if snapshot else txid
        header = ltx.Header(
            flags=0,
            page_size=page_size,
            commit=commit,
            min_txid=min_txid,
            max_txid=txid,
            timestamp=int(time.time() * 1000) if timestamp is None else timestamp,
            pre_apply_checksum=0 if snapshot else self.checksum,
        )
        changes: dict[int, int] = {}
        xor = 0 if snapshot else self._xor
        old_count = len(old)
        if not snapshot:
            for pgno in range(commit + 1, old_count + 1):
                xor ^= old[pgno - 1]
        first_page = b""
        crash = self.crash
        path = self.ltx_dir / ltx.format_filename(min_txid, txid)
        spare = self.spares.take()
        written = path if spare is None else spare
        flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if spare is None else 0)
        fd = os.open(written, flags, 0o644)
        try:
            with os.fdopen(fd, "wb", buffering=1 << 20, closefd=False) as out:
                encoder = ltx.Encoder(out, header)
                crash("before-ltx")
                halfway = len(pages) // 2
                for index, pgno in enumerate(pages):
                    if pgno == lock_pgno:
                        continue
                    data = read_page(pgno)
                    checksum = ltx.page_checksum(pgno, data)
                    previous = old[pgno - 1] if pgno <= old_count and not snapshot else 0
                    if pgno == 1:
                        first_page = data
                    if checksum == previous:
                        continue
                    encoder.write_page(pgno, data)
                    changes[pgno] = checksum
                    xor ^= previous ^ checksum
                    if index == halfway:
                        out.flush()
                        crash("mid-ltx")
                if not changes and commit == old_count and not snapshot:
                    out.flush()
                    os.unlink(written)
                    return None
                post_apply = xor | ltx.CHECKSUM_FLAG
                encoder.finish(post_apply)
            if spare is not None:
                os.rename(spare, path)
                written = path
            crash("before-ltx-sync")
            if sync is Sync.NOW:
                os.fdatasync(fd)  # the directory entry is left to the filesystem: see recover()
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(written)
            raise
        finally:
            os.close(fd)
        self._apply_checksums(changes, commit, lock_pgno, snapshot)
        self._xor = xor
        self.page_size = self._write_page_size = page_size
        self.content = Content.SQLITE
        if first_page:
            self.wal_mode = _is_wal_header(first_page)
        self.position = Position(txid, post_apply)
        return self.position

    def _apply_checksums(
        self, changes: dict[int, int], commit: int, lock_pgno: int, snapshot: bool
    ) -> None:
        checksums = array.array("Q", bytes(8 * commit)) if snapshot else self._checksums
        if len(checksums) < commit:
            checksums.frombytes(bytes(8 * (commit - len(checksums))))
        elif len(checksums) > commit:
            del checksums[commit:]
        for pgno, checksum in changes.items():
            checksums[pgno - 1] = checksum
        if lock_pgno <= commit:
            checksums[lock_pgno - 1] = 0
        self._checksums = checksums

    # -- recovery ---------------------------------------------------------

    def ltx_files(self) -> list[tuple[int, int, Path]]:
        """The LTX files on disk as (min TXID, max TXID, path), oldest first."""
        files = []
        for entry in os.scandir(self.ltx_dir):
            if not entry.name.endswith(".ltx"):
                continue
            try:
                min_txid, max_txid = ltx.parse_filename(entry.name)
            except ltx.LTXError:
                continue
            files.append((min_txid, max_txid, Path(entry.path)))
        files.sort(key=lambda item: (item[1], item[0]))
        return files

    def recover(self) -> None:
        """Bring the database file and its LTX history into agreement."""
        with self.lock:
            self._next_applying_path.unlink(missing_ok=True)
            if not self._resume_clean_stop():
                self.position = self._last_good_position()
                if self.applying_path.exists():
                    self._roll_back_unfinished_journal()
                    self._finish_interrupted_apply()
                if self.journal.is_hot():
                    self._settle_hot_journal()
                self._load_checksums()
            self._remove_stale_wal_index()
            self.wal.recover()
            if self.position.txid and self.checksum != self.position.checksum:
                self._capture_unrecorded_state()
            self.wal_mode = _is_wal_header(self.read_page(1)) if self.page_count else False
            committed_size = self.page_count * self.page_size
            if (
                self.content is Content.SQLITE
                and not self.wal_mode
                and os.fstat(self.fd).st_size > committed_size
            ):
                os.ftruncate(self.fd, committed_size)

    def _resume_clean_stop(self) -> bool:
        """Take the checksums a clean stop left, if its files are untouched."""
        files = self.ltx_files()
        saved = clean_stop.take(
            self.clean_stop_path, self.database_path, files[-1][2] if files else None
        )
        if saved is None or not files or files[-1][1] != saved.txid:
            return False
        if self.applying_path.exists() or self.journal.is_hot():
            return False
        self.position = Position(saved.txid, saved.checksum)
        self.content = Content.SQLITE
        self.page_size = self._write_page_size = saved.page_size
        self._checksums = saved.checksums
        self._xor = ltx.checksum_of(saved.checksums)
        self._dirty.clear()
        self._size_changed = False
        return True

    def _remove_stale_wal_index(self) -> None:
        """Nothing can have `-shm` open before the mount exists, and what it
        holds may be an old index (its last pages lived in the mappings of
        processes that are gone): without it, the first connection builds
        the index again from the WAL itself."""
        self.shm.path.unlink(missing_ok=True)

    def _last_good_position(self) -> Position:
        for _min_txid, max_txid, path in reversed(self.ltx_files()):
            try:
                with open(path, "rb") as f:
                    _, trailer = ltx.verify(f)
            except ltx.LTXError as exc:
                log.warning(
                    "database %s: removing incomplete LTX file %s: %s", self.name, path.name, exc
                )
                path.unlink()
                continue
            return Position(max_txid, trailer.post_apply_checksum)
        return EMPTY_POSITION

    def _settle_hot_journal(self) -> None:
        """Finish a transaction a crash interrupted, one way or the other."""
        self._load_checksums()
        if self.position.txid and self.checksum == self.position.checksum:
            log.info("database %s: last transaction was captured; removing its journal", self.name)
            self.journal.path.unlink()
            return
        log.info("database %s: rolling back an uncommitted transaction", self.name)
        _roll_back_journal(self.path, self.database_path, self.journal_path)
        self.journal_path.unlink()

    def _load_checksums(self) -> None:
        size = os.fstat(self.fd).st_size
        self._dirty.clear()
        self._size_changed = False
        if size == 0:
            self.content = Content.EMPTY
            self._checksums = array.array("Q")
            self._xor = 0
            return
        header = os.pread(self.fd, 100, 0)
        if header[:16] != SQLITE_MAGIC:
            self.content = Content.PLAIN
            self._checksums = array.array("Q")
            self._xor = 0
            return
        self.content = Content.SQLITE
        self.page_size = self._write_page_size = ltx.sqlite_page_size(header)
        count = _committed_page_count(header, size, self.page_size)
        self._checksums = ltx.page_checksums(self.fd, self.page_size, count)
        self._xor = ltx.checksum_of(self._checksums)

    def _finish_interrupted_apply(self) -> None:
        """Finish applying an LTX file if a crash interrupted a replica's apply.

        The marker names the file being applied; files hold whole pages, so
        writing all of them again over a half-applied database yields exactly
        the state after the file.
        """
        name = self.applying_path.read_text().strip()
        path = self.ltx_dir / name
        self.wal.fold_into_database()
        if path.exists():
            with open(path, "rb") as f:
                decoder = ltx.Decoder(f)
                header = decoder.header
                for pgno, data in decoder.pages():
                    os.pwrite(self.fd, data, (pgno - 1) * header.page_size)
            os.ftruncate(self.fd, header.commit * header.page_size)
            log.info("database %s: finished applying %s after a crash", self.name, name)
        self.applying_path.unlink()

    def _capture_unrecorded_state(self) -> None:
        """Record contents no LTX file describes as a new snapshot.

        This happens when the newest LTX file was lost with the machine
        (it is synced, its directory entry is not) after SQLite had already
        made the transaction durable: the database is right and the history
        is one file short. Rolling the database back would lose a transaction
        the application saw committed, so the history is extended instead.
        """
        log.warning(
            "database %s: contents (checksum %016x) do not match TXID %d (checksum %016x); "
            "recording them as a snapshot at TXID %d",
            self.name,
            self.checksum,
            self.position.txid,
            self.position.checksum,
            self.position.txid + 1,
        )
        self.record_current_state(self.read_page)

    def read_page(self, pgno: int) -> bytes:
        """A page as last committed: from the WAL if it holds the page,
        else from the database file (zeros past its end)."""
        page_size = self.page_size
        data = self.wal.read_page(pgno, page_size)
        if data is None:
            data = read_page_at(self.fd, page_size, (pgno - 1) * page_size)
        return data

    def copy_checksums(self) -> array.array[int]:
        with self.lock:
            return array.array("Q", self._checksums)

    def adopt_checksums(self, checksums: array.array[int], page_size: int) -> None:
        """Take the page checksums of the committed state, worked out by recovery."""
        with self.lock:
            self._checksums = checksums
            self._xor = ltx.checksum_of(checksums)
            if checksums:
                self.page_size = self._write_page_size = page_size
                self.content = Content.SQLITE

    # -- replication ------------------------------------------------------

    def files_after(self, position: Position) -> list[Path] | None:
        """The LTX files that bring a replica at `position` to ours, in order.

        None means no chain of retained files does: the replica is ahead,
        has diverged, or needs files retention already removed, and must be
        sent a snapshot instead.

        It takes no lock: it runs on the HTTP server's event loop, and a
        commit holds the database's lock across its sync. A position is
        adopted only once its file exists, so files listed after reading
        the position include its file.
        """
        current = self.position
        if position.txid == current.txid:
            return [] if position.checksum == current.checksum else None
        if position.txid > current.txid:
            return None
        if position.txid > 0:
            quick = self._single_transaction_files(position, current.txid)
            if quick is not None:
                return quick
        current = self.position
        files = self.ltx_files()
        chain: list[Path] = []
        rest = files
        expected = position.txid + 1
        if position.txid == 0:
            starts = [i for i, (min_txid, _, _) in enumerate(files) if min_txid == 1]
            if not starts:
                return None
            _, max_txid, path = files[starts[-1]]
            chain, rest, expected = [path], files[starts[-1] + 1 :], max_txid + 1
        for min_txid, max_txid, path in rest:
            if max_txid < expected:
                continue
            if min_txid != expected:
                return None
            if not chain and not self._continues(path, position.checksum):
                return None
            chain.append(path)
            expected = max_txid + 1
        return chain if expected == current.txid + 1 else None

    def _single_transaction_files(self, position: Position, last: int) -> list[Path] | None:
        """The common case without listing the directory (which may hold
        thousands of files): one file per transaction, named by its TXID."""
        chain = [
            self.ltx_dir / ltx.format_filename(txid, txid)
            for txid in range(position.txid + 1, last + 1)
        ]
        if len(chain) > 64 or not all(path.exists() for path in chain):
            return None
        return chain if self._continues(chain[0], position.checksum) else None

    @staticmethod
    def _continues(path: Path, checksum: int) -> bool:
        try:
            with open(path, "rb") as f:
                header = ltx.Header.unpack(f.read(ltx.HEADER_SIZE))
        except (OSError, ltx.LTXError):
            return False
        return header.pre_apply_checksum == checksum

    def write_snapshot(
        self, out: Path, read_lock: contextlib.AbstractContextManager[None]
    ) -> Position:
        """Write a snapshot LTX file of the committed database to `out`.

        The file is copied under `read_lock` (SQLite's SHARED lock, so no
        transaction is half-written) and encoded afterwards, so writers wait
        only for the copy. In WAL mode the file changes only by checkpoints,
        which change no content: the copy is overlaid with the pages the WAL
        holds, and the database lock alone keeps commits and WAL restarts out.
        """
        copy = out.with_name(out.name + ".db")
        try:
            position = self.copy_committed(copy, read_lock)
            with open(copy, "rb") as src, open(out, "wb") as dst:
                _, trailer = ltx.encode_snapshot(src, dst, txid=position.txid)
            if trailer.post_apply_checksum != position.checksum:
                raise DatabaseError(
                    f"database {self.name}: snapshot checksum {trailer.post_apply_checksum:016x} "
                    f"does not match position {position}"
                )
        finally:
            with contextlib.suppress(FileNotFoundError):
                copy.unlink()
        return position

    def copy_committed(
        self, target: Path, read_lock: contextlib.AbstractContextManager[None]
    ) -> Position:
        """Copy the committed database to `target`, a SQLite file of its own;
        returns the position it is a copy of."""
        with contextlib.nullcontext() if self.wal_mode else read_lock, self.lock:
            position = self.position
            size = self.page_count * self.page_size
            _copy_file(self.fd, target, size, allow_short=self.wal_mode)
            self.wal.overlay(target, self.page_size)
        return position

    def apply_ltx(
        self,
        path: Path,
        write_lock: contextlib.AbstractContextManager[None],
        wal_writer: contextlib.AbstractContextManager[int] | None = None,
    ) -> Position:
        """Apply a received LTX file, checked in full before any page is written.

        The file is read twice: once to check it (file checksum, continuity
        with our position, the checksum it promises), once to write it. It
        enters the history before the first page is written, with a marker,
        so `recover` can finish an apply a crash interrupted; pages are
        written under `write_lock` (SQLite's EXCLUSIVE lock through the
        mount) so readers never see part of it.

        In WAL mode, `wal_writer` (the WAL write lock, yielding the
        wal-index) lets the transaction be appended to the log instead,
        where readers need not be kept out. The file then enters the history
        after its commit frame: a crash in between leaves a committed
        transaction in the log, which `recover` records again, as it does
        on a primary.
        """
        with self.lock, open(path, "rb") as f:
            checked = ltx.check_apply(f, self.fd, checksums=self._checksums)
            header = checked.header
            if not header.is_snapshot and header.min_txid != self.position.txid + 1:
                raise PositionMismatch(
                    f"database {self.name}: LTX file {header.min_txid}-{header.max_txid} "
                    f"does not follow {self.position}"
                )
            if header.is_snapshot and self.position.txid:
                self._log_reseed(header.max_txid, checked.trailer.post_apply_checksum)
            final = self.ltx_dir / ltx.format_filename(header.min_txid, header.max_txid)
            appended = wal_writer is not None and self._append_to_wal(f, header, wal_writer)
            if appended:
                os.rename(path, final)
            else:
                self._apply_to_file(f, checked, path, final, write_lock)
            assert checked.checksums is not None
            self._checksums = checked.checksums
            self._xor = ltx.checksum_of(self._checksums)
            self.page_size = self._write_page_size = header.page_size
            self.content = Content.SQLITE if header.commit else Content.EMPTY
            if not appended:  # a transaction appended to the log keeps WAL mode
                self.wal_mode = _is_wal_header(self.read_page(1))
            self.position = Position(header.max_txid, checked.trailer.post_apply_checksum)
            return self.position

    def _apply_to_file(
        self,
        f: BinaryIO,
        checked: ltx.CheckedApply,
        path: Path,
        final: Path,
        write_lock: contextlib.AbstractContextManager[None],
    ) -> None:
        """Write the pages into the database file under `write_lock`, the
        file entered in the history first with a marker naming it."""
        header = checked.header
        self._prepare_apply(final.name, header.commit * header.page_size)
        os.rename(path, final)
        if header.is_snapshot:
            for _min, _max, old in self.ltx_files():
                if old != final:
                    old.unlink(missing_ok=True)
        os.rename(self._next_applying_path, self.applying_path)
        pages = self._pages_to_hand_over(f, header)
        with write_lock:
            self._discard_unfinished_transaction()
            if pages is None:
                ltx.write_pages(f, self.fd, checked, sync=False)
            else:
                ltx.store_pages(pages, self.fd, header, sync=False)
            self.applied_pages = pages
        self.applying_path.unlink()

    def _pages_to_hand_over(
        self, f: BinaryIO, header: ltx.Header
    ) -> list[tuple[int, bytes]] | None:
        """The pages of a small transaction that changes nothing else,
        decoded before readers are kept out: written, they are handed to the
        kernel's cache too, instead of it dropping every page it holds."""
        if (
            header.is_snapshot
            or header.page_size != self.page_size
            or header.commit * header.page_size < os.fstat(self.fd).st_size
            or self.wal_mode
        ):
            return None
        f.seek(0)
        pages: list[tuple[int, bytes]] = []
        for page in ltx.Decoder(f).pages():
            if len(pages) == HANDED_OVER_PAGES:
                return None
            pages.append(page)
        if pages and pages[0][0] == 1 and _is_wal_header(pages[0][1]):
            return None  # the database enters WAL mode: its readers start afresh
        return pages

    def _append_to_wal(
        self,
        f: BinaryIO,
        header: ltx.Header,
        wal_writer: contextlib.AbstractContextManager[int],
    ) -> bool:
        """Apply a transaction as frames of the log (`walapply`), when it
        neither starts a new history nor leaves WAL mode; False if it
        was not (nothing changed)."""
        if not self.wal_mode or header.is_snapshot or header.page_size != self.page_size:
            return False
        if self.journal.active or self.journal.is_hot():
            return False
        f.seek(0)
        pages: list[tuple[int, bytes]] = []
        for page in ltx.Decoder(f).pages():
            if len(pages) == walapply.MAX_PAGES:
                return False
            pages.append(page)
        if pages and pages[0][0] == 1 and not _is_wal_header(pages[0][1]):
            return False
        with wal_writer as shm:
            return shm >= 0 and walapply.append(self.wal, shm, pages, header.commit)

    def backfill(self, shm: int, copied: Callable[[], None], *, force: bool = False) -> int:
        """Copy frames a replica appended into the database file, as far as
        readers allow (`walapply.backfill`)."""
        with self.lock:
            if not self.wal_mode or self.wal.chain is None:
                return 0
            return walapply.backfill(self.wal, shm, self.fd, copied, force=force)

    @property
    def _next_applying_path(self) -> Path:
        return self.applying_path.with_name("applying.next")

    def _prepare_apply(self, name: str, size: int) -> None:
        """Claim the space an apply needs before anything changes, so that a
        full disk fails it here, whole, and not halfway through its pages:
        the blocks the database file grows into, and the marker."""
        _reserve_space(self.fd, size)
        marker = self._next_applying_path
        spare = self.spares.take()
        try:
            if spare is None:
                marker.write_text(name)
            else:
                _write_into(spare, name.encode())
                os.rename(spare, marker)
        except OSError:
            marker.unlink(missing_ok=True)
            if spare is not None:
                spare.unlink(missing_ok=True)
            raise

    def incoming_path(self) -> Path | None:
        """A file made ahead of time for an LTX file about to arrive, in
        the directory it will be applied into; None when none is ready."""
        return self.spares.take()

    def _log_reseed(self, txid: int, checksum: int) -> None:
        """Say what a snapshot replaces: a node that was primary may hold
        transactions the new primary never received."""
        local = self.position
        if local == Position(txid, checksum):
            return
        if local.txid > txid:
            discarded = f"{local.txid - txid} local transactions after TXID {txid} are discarded"
        elif local.txid == txid:
            discarded = f"the local transaction {txid} differs from the primary's and is discarded"
        else:
            discarded = "local history differs from the primary's and is replaced"
        log.warning(
            "database %s: re-seeded from a snapshot at TXID %d; was at %s: %s",
            self.name,
            txid,
            local,
            discarded,
        )

    def _discard_unfinished_transaction(self) -> None:
        """Roll back what a transaction left when its node stopped being the
        primary mid-way; SQLite's EXCLUSIVE lock is held, so its writer is gone."""
        self._roll_back_unfinished_journal()
        self.wal.checkpoint()

    def _roll_back_unfinished_journal(self) -> None:
        """The journal holds pages as they were before the file about to be
        applied: played back after it, it would undo part of that file."""
        journal = self.journal
        hot = journal.is_hot()
        if journal.active or hot:
            log.warning(
                "database %s: rolling back a transaction the primary never committed", self.name
            )
            if hot:
                _roll_back_journal(self.path, self.database_path, journal.path)
                # Emptied, not removed: the kernel may hold its name, and
                # SQLite's next open(O_CREAT) of the journal would reach a
                # vanished file.
                os.truncate(journal.path, 0)
            journal.active = False
            self._dirty.clear()
            self._size_changed = False

    # -- retention --------------------------------------------------------

    def enforce_retention(self, max_age: float, now: float | None = None) -> int:
        """Remove LTX files older than `max_age` seconds, always keeping the newest."""
        now = time.time() if now is None else now
        removed = 0
        with self.lock:
            files = self.ltx_files()
            for _min_txid, _max_txid, path in files[:-1]:
                try:
                    if now - path.stat().st_mtime > max_age:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

    def remove(self, trash: Path) -> None:
        """Delete the database directory: moved aside at once, then erased."""
        with self.lock:
            self.close()
            target = trash / f"{os.getpid()}-{time.monotonic_ns()}"
            os.rename(self.path, target)
        shutil.rmtree(target, ignore_errors=True)


_FALLOC_FL_KEEP_SIZE = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


def _write_into(path: Path, data: bytes) -> None:
    """Write an existing empty file: cheaper than creating one."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _reserve_space(fd: int, size: int) -> None:
    """Allocate the file's blocks up to `size` without changing its size
    (readers see nothing); raises OSError (ENOSPC) when the disk lacks them.
    A filesystem that cannot reserve space is left to fail on write."""
    current = os.fstat(fd).st_size
    if size <= current:
        return
    result = _LIBC.fallocate(
        fd,
        _FALLOC_FL_KEEP_SIZE,
        ctypes.c_longlong(current),
        ctypes.c_longlong(size - current),
    )
    if result != 0:
        code = ctypes.get_errno()
        if code not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(code, os.strerror(code))


def _committed_page_count(header: bytes, file_size: int, page_size: int) -> int:
    """The database size the header records, which SQLite keeps valid as long
    as the version-valid-for number equals the change counter; SQLite may
    truncate the file to it only after the journal is gone."""
    in_header = int.from_bytes(header[28:32], "big")
    if in_header and header[24:28] == header[92:96]:
        return min(in_header, file_size // page_size)
    return file_size // page_size


def _is_wal_header(page: bytes) -> bool:
    """Whether a database header's file format bytes (18 and 19) say WAL."""
    return len(page) > 19 and (page[18] == 2 or page[19] == 2)


def _roll_back_journal(directory: Path, database: Path, journal: Path) -> None:
    """Let SQLite itself play a hot journal back into the database file.

    SQLite finds a journal by name (`<db>-journal`), so both files are
    hard-linked under those names in a scratch directory and opened there.
    """
    scratch = directory / ".recovery"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        os.link(database, scratch / "db")
        os.link(journal, scratch / "db-journal")
        conn = sqlite3.connect(scratch / "db", isolation_level=None)
        try:
            conn.execute("PRAGMA schema_version").fetchone()
        finally:
            conn.close()
        if journal_is_hot(scratch / "db-journal"):
            raise RecoveryError(f"SQLite left the journal of {directory.name} hot")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _copy_file(fd: int, target: Path, size: int, *, allow_short: bool = False) -> None:
    """Copy the first `size` bytes; with `allow_short`, a shorter file is
    copied whole and the rest left as zeros (WAL pages are laid over it)."""
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        while offset < size:
            copied = os.copy_file_range(fd, out, size - offset, offset, offset)
            if copied == 0:
                if allow_short:
                    os.ftruncate(out, size)
                    break
                raise DatabaseError(f"database file ended at byte {offset}, expected {size}")
            offset += copied
    finally:
        os.close(out)
