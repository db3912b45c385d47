"""Applying LTX files to a replica's WAL database the way SQLite writes one.

A WAL reader never waits for SQLite's own writer: the writer appends frames
to the log and publishes them in the wal-index header, and each reader keeps
the snapshot it began with. A replica applies a transaction the same way,
so no reader can hold replication up, nor replication a reader:

- the transaction's pages become frames after the last committed one, under
  the WAL write lock alone (readers never take it), and the index's hash
  tables and header then publish them;
- `backfill` copies frames into the database file as SQLite's PASSIVE
  checkpoint does, never past a frame a reader may still need and never
  waiting for a lock;
- once every frame is in the database file and no reader uses the log, the
  next transaction starts the log again from its first frame, with new
  salts, as SQLite's writer does.

The index must describe this node's log exactly (the frames the daemon
knows, their salts and checksum); when it does not, or when the
transaction changes the journal mode or is a snapshot, `append` declines
and the caller applies the transaction to the database file under locks
that keep readers out.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from litefs import walindex
from litefs.locking import WAL_CHECKPOINT_LOCK, WAL_READ_LOCK_0, try_lock, unlock
from litefs.walfile import (
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    Frame,
    FrameChain,
    encode_frames,
    encode_header,
    header_bytes,
)

if TYPE_CHECKING:
    from litefs.capture.wal import WriteAheadLog

MAX_PAGES = 4096
"""Larger transactions are applied to the database file: their frames
would be held in memory at once."""
BACKFILL_AFTER = 1000
"""Frames the log holds beyond the database file before `backfill` copies
them, as SQLite's automatic checkpoint does."""

_NATIVE_PAIR = struct.Struct("=II")


def append(log: WriteAheadLog, shm: int, pages: list[tuple[int, bytes]], commit: int) -> bool:
    """Append one transaction; False (with nothing changed) when the index
    is not one this node's log can continue. The WAL write lock is held."""
    parsed = walindex.parse(os.pread(shm, walindex.INFO_SIZE, 0))
    if parsed is None or not pages:
        return False
    index, info = parsed
    page_size = len(pages[0][1])
    if not _describes(index, log) or (index.max_frame and index.page_size != page_size):
        return False
    if index.max_frame and info.backfill == index.max_frame:
        index = _restart(shm, index) or index
    chain = log.chain
    if index.max_frame == 0:
        seq = chain.header.checkpoint_seq + 1 if chain is not None else 0
        header = encode_header(page_size, seq, _new_salt(index.salt))
        chain = FrameChain(header)
        prefix = header_bytes(header)
        log.forget()
        log.chain = chain
        first = 1
    else:
        assert chain is not None
        prefix = b""
        first = index.max_frame + 1
    data, last = encode_frames(chain.header, chain.checksum, pages, commit)
    offset = chain.end - len(prefix)
    _write_log(log, prefix + data, offset)
    walindex.add_frames(shm, first, [pgno for pgno, _ in pages], index.max_frame)
    frame_size = chain.header.frame_size
    end = chain.end + len(pages) * frame_size
    walindex.publish(
        shm,
        walindex.next_change(
            index,
            big_endian=chain.header.big_endian,
            page_size=page_size,
            max_frame=first - 1 + len(pages),
            page_count=commit,
            frame_checksum=_NATIVE_PAIR.pack(*last),
            salt=_salt(chain),
        ),
    )
    latest = {
        pgno: chain.end + i * frame_size + FRAME_HEADER_SIZE for i, (pgno, _) in enumerate(pages)
    }
    chain.advance(Frame(end - frame_size, pages[-1][0], commit, last))
    log.overlay_transaction(latest, commit)
    return True


def backfill(
    log: WriteAheadLog, shm: int, db_fd: int, copied: Callable[[], None], *, force: bool = False
) -> int:
    """Copy frames into the database file as far as no reader needs them
    in the log; returns how many frames the file now holds. `copied` runs
    after the file changed and before readers may rely on it. Waits for no
    lock: whatever a reader holds is left for a later call."""
    parsed = walindex.parse(os.pread(shm, walindex.INFO_SIZE, 0))
    if parsed is None or not _describes(parsed[0], log):
        return 0
    index, info = parsed
    if index.max_frame - info.backfill < (1 if force else BACKFILL_AFTER):
        return info.backfill
    if not try_lock(shm, WAL_CHECKPOINT_LOCK):
        return info.backfill
    try:
        safe = _safe_frame(shm, index.max_frame, info.read_marks)
        if info.backfill >= safe or not try_lock(shm, WAL_READ_LOCK_0):
            return info.backfill
        try:
            _copy_frames(log, db_fd, info.backfill, safe, index)
            copied()
            os.pwrite(shm, struct.pack("=I", safe), walindex.BACKFILL_OFFSET)
        finally:
            unlock(shm, WAL_READ_LOCK_0)
        return safe
    finally:
        unlock(shm, WAL_CHECKPOINT_LOCK)


def _describes(index: walindex.IndexHeader, log: WriteAheadLog) -> bool:
    """Whether the index's committed frames are exactly the log's (an
    index without frames needs a log whose pages are all in the file)."""
    if index.max_frame == 0:
        return not log.pages
    chain = log.chain
    if chain is None:
        return False
    header = chain.header
    frames = (chain.end - HEADER_SIZE) // header.frame_size
    return (
        frames == index.max_frame
        and header.page_size == index.page_size
        and header.big_endian == index.big_endian
        and _salt(chain) == index.salt
        and _NATIVE_PAIR.pack(*chain.checksum) == index.frame_checksum
    )


def _restart(shm: int, index: walindex.IndexHeader) -> walindex.IndexHeader | None:
    """Start the log again from its first frame, if no reader is using it:
    every frame is in the database file already. None if one is."""
    readers = walindex.READ_MARKS - 1
    if not try_lock(shm, WAL_READ_LOCK_0 + 1, readers):
        return None
    try:
        restarted = walindex.next_change(index, max_frame=0, salt=_new_salt(index.salt))
        walindex.publish(shm, restarted)
        os.pwrite(shm, walindex.restarted_info(), walindex.BACKFILL_OFFSET)
        return restarted
    finally:
        unlock(shm, WAL_READ_LOCK_0 + 1, readers)


def _safe_frame(shm: int, max_frame: int, marks: tuple[int, ...]) -> int:
    """The last frame no reader may still need from the log rather than
    the database file; read marks no one holds are moved up or freed."""
    safe = max_frame
    for i in range(1, walindex.READ_MARKS):
        mark = marks[i]
        if safe <= mark:
            continue
        if try_lock(shm, WAL_READ_LOCK_0 + i):
            value = safe if i == 1 else walindex.READMARK_NOT_USED
            os.pwrite(shm, struct.pack("=I", value), walindex.read_mark_offset(i))
            unlock(shm, WAL_READ_LOCK_0 + i)
        else:
            safe = mark
    return safe


def _copy_frames(
    log: WriteAheadLog, db_fd: int, done: int, safe: int, index: walindex.IndexHeader
) -> None:
    """Each page's latest frame, when it lies in (done, safe]; a page whose
    latest frame is later stays in the log for now."""
    chain = log.chain
    assert chain is not None
    page_size = chain.header.page_size
    frame_size = chain.header.frame_size
    with open(log.path, "rb") as wal:
        for pgno, offset in sorted(log.pages.items()):
            frame = (offset - FRAME_HEADER_SIZE - HEADER_SIZE) // frame_size + 1
            if done < frame <= safe and pgno <= index.page_count:
                os.pwrite(db_fd, os.pread(wal.fileno(), page_size, offset), (pgno - 1) * page_size)
    if safe == index.max_frame:
        os.ftruncate(db_fd, index.page_count * page_size)
    os.fdatasync(db_fd)


def _write_log(log: WriteAheadLog, data: bytes, offset: int) -> None:
    fd = os.open(log.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _salt(chain: FrameChain) -> bytes:
    return struct.pack(">II", chain.header.salt1, chain.header.salt2)


def _new_salt(old: bytes) -> bytes:
    """SQLite's choice for a restarted log: the first salt counts up, the
    second is new."""
    return ((int.from_bytes(old[:4], "big") + 1) & 0xFFFFFFFF).to_bytes(4, "big") + os.urandom(4)
