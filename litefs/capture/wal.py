"""Capture of transactions made in WAL mode.

SQLite appends each transaction to the `-wal` file as frames (a 24-byte
header, then the page), the last of which carries the database size after
the commit. The transaction is committed once that frame and every frame
before it are valid (salts and cumulative checksum), whether or not SQLite
syncs: that is when SQLite's own recovery would accept it. The mount
therefore writes each frame through, and when a write completes a commit
frame, reads the transaction back from the file, validates it the way
SQLite does and records it, before the write returns. Frames of a
transaction that never commits are never valid up to a commit frame, and
produce nothing.

A checkpoint copies committed pages into the database file and may restart
the log with new salts; neither changes the database's content, so neither
produces an LTX file. What the log holds beyond the database file is kept
as a map from page number to the page's latest committed frame: the
content of the database is the file overlaid with that map.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from litefs import ltx
from litefs.capture import SMALL_TRANSACTION, CrashPoints, Sync, create_file, read_page_at
from litefs.walfile import (
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    Frame,
    FrameChain,
    WalFormatError,
    group,
    is_commit_header,
    parse_header,
)

if TYPE_CHECKING:
    from litefs.db import Database

log = logging.getLogger("litefs.capture.wal")


class WriteAheadLog:
    """The `-wal` file of one database, as SQLite uses it."""

    def __init__(self, db: Database, crash: CrashPoints) -> None:
        self.db = db
        self.path = db.path / "wal"
        self.crash = crash
        self.chain: FrameChain | None = None
        """The current generation's validated frames; None without a valid header."""
        self.pages: dict[int, int] = {}
        """Page number -> file offset of its page in the latest committed frame."""
        self._commits: dict[int, bool] = {}
        """Offsets of frames written with a commit size beyond the chain's end,
        and whether their page has been written too."""
        self._refused: tuple[int, int, int] | None = None
        """(start, end, errno) of a commit frame that could not be recorded."""

    # -- what the mount asks ----------------------------------------------

    def check_writable(self) -> None:
        """Readers open the log for writing too (replicas included): only
        writing frames is the primary's."""

    def write_blocks(self, offset: int, data: bytes) -> bool:
        """A new generation of the log makes the recorded files durable
        first; a large transaction takes long to record."""
        if offset < HEADER_SIZE:
            return True
        chain = self.chain
        if chain is None or not self._scan(offset, data, update=False):
            return False
        return offset + len(data) - chain.end > SMALL_TRANSACTION

    def truncate_blocks(self, size: int) -> bool:
        return True

    def remove_blocks(self) -> bool:
        return True

    def settle(self, wait: bool = True) -> None:
        return None

    def synced(self, wait: bool = True) -> None:
        return None

    # -- file operations ---------------------------------------------------

    def write(self, fd: int, offset: int, data: bytes, wait: bool = True) -> int:
        db = self.db
        db.check_writable()
        if self._refused is not None:
            self._refuse_rest_of_frame(offset, len(data))
        if offset < HEADER_SIZE:
            self._before_frames_are_lost()
            with db.locked(wait):
                written = os.pwrite(fd, data, offset)
                self._start_generation(fd)
                self._scan(offset, data, update=True)
                self._record_committed(fd)
            return written
        if not self._scan(offset, data, update=False):
            written = os.pwrite(fd, data, offset)
            self._scan(offset, data, update=True)
            return written
        with db.locked(wait):
            written = os.pwrite(fd, data, offset)
            self._scan(offset, data, update=True)
            self._record_committed(fd)
        return written

    def truncate(self, size: int, wait: bool = True) -> None:
        self._before_frames_are_lost()
        with self.db.locked(wait):
            cuts_frames = self.chain is not None and size < self.chain.end
            os.truncate(self.path, size)
            if cuts_frames:
                self.forget()
            for offset in [c for c in self._commits if c >= size]:
                del self._commits[offset]

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def create(self, mode: int, uid: int, gid: int) -> bool:
        create_file(self.path, mode, uid, gid)
        return True

    def remove(self, wait: bool = True, *, in_use: bool = False) -> None:
        self._before_frames_are_lost()
        with self.db.locked(wait):
            os.unlink(self.path)
            self.forget()

    def _refuse_rest_of_frame(self, offset: int, size: int) -> None:
        """The kernel may split one write of SQLite's into several; when the
        part completing a commit frame fails (its LTX file could not be
        written: disk full), it reports a short write, and SQLite writes the
        rest again. That rest must fail too, or SQLite takes the commit for
        done. A write from the frame's start on is a new attempt."""
        assert self._refused is not None
        start, end, code = self._refused
        if offset <= start < offset + size or offset >= end:
            self._refused = None
        elif offset < end:
            raise OSError(code, "the transaction could not be recorded")

    def _before_frames_are_lost(self) -> None:
        """Before the log is restarted, cut short or removed, the database
        file must hold the pages checkpoints copied into it: the kernel may
        still be caching them. Pulling them needs the mount's loop free, so
        it comes before the database's lock is taken."""
        self.db.pull_cached_pages()

    def forget(self) -> None:
        """The log is gone or restarted: SQLite does that only once every
        committed frame is in the database file."""
        self.chain = None
        self.pages = {}
        self._commits = {}
        self._refused = None

    # -- capture -----------------------------------------------------------

    def _start_generation(self, fd: int) -> None:
        self.forget()
        try:
            header = parse_header(os.pread(fd, HEADER_SIZE, 0))
        except WalFormatError:
            return
        self.chain = FrameChain(header)

    def _scan(self, offset: int, data: bytes, *, update: bool) -> bool:
        """Note the commit frames this write touches; True when one of them
        is complete (its header and its page written), so the transaction
        it ends may now be valid. Cheap: SQLite writes one frame header or
        one page at a time."""
        chain = self.chain
        if chain is None:
            return False
        size = chain.header.frame_size
        end = offset + len(data)
        if end <= chain.end:
            return False
        commits = self._commits
        ready = False
        frame = chain.end + max(0, (offset - chain.end) // size) * size
        while frame < end:
            if frame >= offset and frame + FRAME_HEADER_SIZE <= end:
                if is_commit_header(data, frame - offset):
                    if update:
                        commits.setdefault(frame, False)
                    elif frame not in commits:
                        ready = ready or frame + size <= end
                        frame += size
                        continue
                elif update:
                    commits.pop(frame, None)
                    frame += size
                    continue
                else:
                    frame += size
                    continue
            if frame in commits:
                complete = commits[frame] or frame + size <= end
                if update:
                    commits[frame] = complete
                ready = ready or complete
            frame += size
        return ready

    def _record_committed(self, fd: int) -> None:
        """Record every transaction the log now holds up to a valid commit
        frame, one LTX file each. Runs with the database lock held."""
        chain = self.chain
        if chain is None or not self._commits:
            return
        last = max(self._commits) + chain.header.frame_size
        data = os.pread(fd, last - chain.end, chain.end)
        pending: list[Frame] = []
        for frame in chain.validate(data):
            pending.append(frame)
            if not frame.commit:
                continue
            try:
                self._record(fd, pending)
            except Exception as exc:
                self._invalidate(fd, frame)
                code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
                self._refused = (frame.offset, frame.offset + chain.header.frame_size, code)
                raise
            chain.advance(frame)
            pending = []
        for offset in [c for c in self._commits if c < chain.end]:
            del self._commits[offset]

    def _invalidate(self, fd: int, frame: Frame) -> None:
        """Make a commit frame that could not be recorded invalid on disk, so
        that SQLite's recovery never takes a transaction the history lacks."""
        os.pwrite(fd, bytes(FRAME_HEADER_SIZE), frame.offset)
        self._commits.pop(frame.offset, None)

    def _record(self, fd: int, frames: list[Frame]) -> None:
        chain = self.chain
        assert chain is not None
        db = self.db
        page_size = chain.header.page_size
        commit = frames[-1].commit
        latest = _committed_pages(frames)
        db.settle_unjournaled()
        read_page = _page_reader(fd, db.fd, page_size, latest, self.pages)
        snapshot = db.position.txid == 0 or page_size != db.page_size
        if snapshot:
            pages: range | list[int] = range(1, commit + 1)
        else:
            grown = range(db.page_count + 1, commit + 1)
            pages = sorted(set(latest).union(grown))
        db.record_transaction(
            pages, commit, page_size, read_page, snapshot=snapshot, sync=Sync.FILESYSTEM
        )
        _overlay(self.pages, latest, commit)

    def read_page(self, pgno: int, page_size: int) -> bytes | None:
        """The page's committed content if the log holds it, else None."""
        offset = self.pages.get(pgno)
        if offset is None:
            return None
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), page_size, offset)

    def overlay(self, target: Path, page_size: int) -> None:
        """Write the pages the WAL holds over a copy of the database file."""
        if self.pages:
            with open(target, "r+b") as out:
                self._copy_pages(out.fileno(), page_size)

    def _copy_pages(self, out: int, page_size: int) -> None:
        with open(self.path, "rb") as wal:
            for pgno, offset in sorted(self.pages.items()):
                os.pwrite(out, os.pread(wal.fileno(), page_size, offset), (pgno - 1) * page_size)

    # -- start-up and replicas ---------------------------------------------

    def recover(self) -> None:
        """Bring the transactions the log holds into the history, each once.

        After a crash the log may hold committed transactions whose LTX files
        were never written. The database's state after each transaction is
        compared with the recorded position; the ones after the last match
        are recorded now. When none matches, the final state is recorded as
        a snapshot, as for a rollback database whose history is short.
        """
        self.forget()
        db = self.db
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        try:
            header = parse_header(data)
        except WalFormatError:
            return
        chain = FrameChain(header)
        transactions = group(chain.validate(memoryview(data)[HEADER_SIZE:]))
        self.chain = chain
        if not transactions:
            return
        with open(self.path, "rb") as f:
            replay = _Replay(db, f.fileno(), header.page_size)
            position = db.position
            matched = None
            if position.txid == 0 or replay.matches(position.checksum):
                matched = (-1, replay.checksums[:])
            for index, frames in enumerate(transactions):
                replay.apply(frames)
                if position.txid and replay.matches(position.checksum):
                    matched = (index, replay.checksums[:])
            if matched is None:
                self._accept(transactions)
                db.adopt_checksums(replay.checksums, header.page_size)
                log.warning(
                    "database %s: contents with the WAL do not match TXID %d; "
                    "recording them as a snapshot",
                    db.name,
                    position.txid,
                )
                db.record_current_state(
                    _page_reader(f.fileno(), db.fd, header.page_size, self.pages)
                )
                return
            index, checksums = matched
            self._accept(transactions[: index + 1])
            db.adopt_checksums(checksums, header.page_size)
            rest = transactions[index + 1 :]
            if rest:
                log.info(
                    "database %s: recording %d committed WAL transactions found at start-up",
                    db.name,
                    len(rest),
                )
            for frames in rest:
                self._record(f.fileno(), frames)
                chain.advance(frames[-1])

    def overlay_transaction(self, latest: dict[int, int], commit: int) -> None:
        """Take a transaction written to the log by the daemon itself (a
        replica applying): `latest` maps its pages to their offsets."""
        _overlay(self.pages, latest, commit)

    def fold_into_database(self) -> None:
        """Copy every committed page into the database file and empty the
        log, at start-up, when no connection can be reading it: an apply a
        crash interrupted is then finished over the file alone."""
        self.forget()
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            header = parse_header(data)
        except (FileNotFoundError, WalFormatError):
            return
        transactions = group(FrameChain(header).validate(memoryview(data)[HEADER_SIZE:]))
        for frames in transactions:
            _overlay(self.pages, _committed_pages(frames), frames[-1].commit)
        if transactions:
            self._copy_pages(self.db.fd, header.page_size)
            os.ftruncate(self.db.fd, transactions[-1][-1].commit * header.page_size)
        os.truncate(self.path, 0)
        self.forget()

    def _accept(self, transactions: list[list[Frame]]) -> None:
        chain = self.chain
        assert chain is not None
        for frames in transactions:
            _overlay(self.pages, _committed_pages(frames), frames[-1].commit)
            chain.advance(frames[-1])

    def checkpoint(self) -> None:
        """Copy every committed page into the database file and empty the
        log: a replica does this before applying, under every WAL lock, so
        a former primary's log cannot hide what it applies."""
        db = self.db
        if self.pages:
            self._copy_pages(db.fd, db.page_size)
            os.ftruncate(db.fd, db.page_count * db.page_size)
        if self.path.exists():
            self._before_frames_are_lost()
            os.truncate(self.path, 0)
        self.forget()


class SharedMemory:
    """The `-shm` file: SQLite's WAL index, which every process using the
    database maps. It describes this node's WAL only, so it is local to the
    node and never replicated; readers on replicas need it writable too."""

    def __init__(self, db: Database) -> None:
        self.path = db.path / "shm"

    def check_writable(self) -> None:
        return None

    def write(self, fd: int, offset: int, data: bytes, wait: bool = True) -> int:
        return os.pwrite(fd, data, offset)

    def write_blocks(self, offset: int, data: bytes) -> bool:
        return False

    def truncate(self, size: int, wait: bool = True) -> None:
        os.truncate(self.path, size)

    def truncate_blocks(self, size: int) -> bool:
        return False

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def create(self, mode: int, uid: int, gid: int) -> bool:
        create_file(self.path, mode, uid, gid)
        return False  # never needs to outlive a crash

    def remove(self, wait: bool = True, *, in_use: bool = False) -> None:
        os.unlink(self.path)

    def remove_blocks(self) -> bool:
        return False

    def settle(self, wait: bool = True) -> None:
        return None

    def synced(self, wait: bool = True) -> None:
        return None


def _committed_pages(frames: list[Frame]) -> dict[int, int]:
    """Page number -> page offset of each page a transaction leaves in the
    database (its latest frame; pages past the new size are gone)."""
    commit = frames[-1].commit
    return {f.pgno: f.data_offset for f in frames if f.pgno <= commit}


def _overlay(pages: dict[int, int], latest: dict[int, int], commit: int) -> None:
    """Bring a page map forward by one transaction."""
    pages.update(latest)
    for pgno in [p for p in pages if p > commit]:
        del pages[pgno]


def _page_reader(
    wal_fd: int, db_fd: int, page_size: int, *maps: dict[int, int]
) -> Callable[[int], bytes]:
    """Reads a page from the WAL when one of `maps` (first match wins) holds
    it, else from the database file."""

    def read_page(pgno: int) -> bytes:
        for pages in maps:
            offset = pages.get(pgno)
            if offset is not None:
                return os.pread(wal_fd, page_size, offset)
        return read_page_at(db_fd, page_size, (pgno - 1) * page_size)

    return read_page


class _Replay:
    """Page checksums of the database file overlaid with WAL transactions,
    one at a time, to find which of them the history already holds."""

    def __init__(self, db: Database, wal_fd: int, page_size: int) -> None:
        self.checksums = db.copy_checksums()
        self.xor = ltx.checksum_of(self.checksums)
        self.lock_pgno = ltx.lock_page(page_size)
        self.latest: dict[int, int] = {}
        self._page = _page_reader(wal_fd, db.fd, page_size, self.latest)

    def matches(self, checksum: int) -> bool:
        return (self.xor | ltx.CHECKSUM_FLAG) == checksum

    def apply(self, frames: list[Frame]) -> None:
        commit = frames[-1].commit
        checksums = self.checksums
        while len(checksums) > commit:
            self.xor ^= checksums.pop()
        touched = _committed_pages(frames)
        _overlay(self.latest, touched, commit)
        pages = set(touched).union(range(len(checksums) + 1, commit + 1))
        if len(checksums) < commit:
            checksums.extend([0] * (commit - len(checksums)))
        for pgno in pages:
            if pgno == self.lock_pgno:
                continue
            value = ltx.page_checksum(pgno, self._page(pgno))
            self.xor ^= checksums[pgno - 1] ^ value
            checksums[pgno - 1] = value
