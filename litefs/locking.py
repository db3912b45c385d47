"""SQLite's own locks, taken by the daemon through its mount.

SQLite locks a database with POSIX byte-range locks on the bytes around
offset 0x40000000. Our filesystem implements no lock operations, so the
kernel keeps those locks itself, for the file as seen through the mount. To
stop readers while a replica applies a transaction, the daemon therefore
takes the same locks on a descriptor it opened *through the mount*. Locks are
open-file-description locks, so no other descriptor of the daemon can drop
them, and all waiting happens in worker threads, never on an event loop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from litefs.ltx import PENDING_BYTE

RESERVED_BYTE = PENDING_BYTE + 1
SHARED_FIRST = PENDING_BYTE + 2
SHARED_SIZE = 510
WAL_LOCKS_FIRST = 120
WAL_LOCKS_SIZE = 8
"""The `-shm` bytes SQLite locks in WAL mode: write, checkpoint, recover and
the five read marks."""
WAL_WRITE_LOCK = WAL_LOCKS_FIRST
WAL_CHECKPOINT_LOCK = WAL_LOCKS_FIRST + 1
WAL_READ_LOCK_0 = WAL_LOCKS_FIRST + 3
WAL_DMS_LOCK = WAL_LOCKS_FIRST + WAL_LOCKS_SIZE
"""Held shared by every process that has `-shm` open; the first to open it
(the one that gets it exclusively) empties it."""

_FLOCK = struct.Struct("@hhqqi4x")


def _lock(fd: int, kind: int, start: int, length: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))


def try_lock(fd: int, start: int, length: int = 1) -> bool:
    """Take a write lock only if no one holds any part of it."""
    try:
        fcntl.fcntl(
            fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        )
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def unlock(fd: int, start: int, length: int = 1) -> None:
    _lock(fd, fcntl.F_UNLCK, start, length)


class DatabaseLock:
    """SQLite's locks on one database, through one long-lived descriptor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shm_path = path.with_name(path.name + "-shm")
        self._fd = -1
        self._shm = -1
        self._mutex = threading.Lock()

    def _descriptor(self) -> int:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            _learn_no_flush(self.path)
        return self._fd

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold SQLite's EXCLUSIVE lock: no reader is inside a transaction.

        PENDING comes first so that new readers wait while the ones already
        reading finish, as SQLite's own writers do.
        """
        with self._mutex:
            fd = self._descriptor()
            _lock(fd, fcntl.F_WRLCK, PENDING_BYTE, 1)
            try:
                _lock(fd, fcntl.F_WRLCK, SHARED_FIRST, SHARED_SIZE)
                try:
                    yield
                finally:
                    _lock(fd, fcntl.F_UNLCK, SHARED_FIRST, SHARED_SIZE)
            finally:
                _lock(fd, fcntl.F_UNLCK, PENDING_BYTE, 1)

    @contextlib.contextmanager
    def exclusive_wal(self) -> Iterator[int]:
        """Hold what keeps every reader of a WAL database out; yields a
        descriptor of its `-shm` through the mount, or -1 if none exists.

        WAL readers hold SHARED on the database for as long as they are
        connected, so EXCLUSIVE is never to be had. PENDING stops new
        connections instead, and the WAL's own locks (every read mark among
        them) wait for the read transactions under way to end.
        """
        with self._mutex:
            fd = self._descriptor()
            _lock(fd, fcntl.F_WRLCK, PENDING_BYTE, 1)
            try:
                try:
                    shm = os.open(self.shm_path, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    shm = -1
                try:
                    if shm >= 0:
                        _lock(shm, fcntl.F_WRLCK, WAL_LOCKS_FIRST, WAL_LOCKS_SIZE)
                    yield shm
                finally:
                    if shm >= 0:
                        os.close(shm)  # releases its locks
            finally:
                _lock(fd, fcntl.F_UNLCK, PENDING_BYTE, 1)

    @contextlib.contextmanager
    def wal_writer(self) -> Iterator[int]:
        """Hold SQLite's WAL write lock, which readers never take; yields a
        descriptor of `-shm` through the mount, or -1 if none exists.

        The descriptor stays open and holds the shared lock every connection
        holds, so no reader ever takes the index for abandoned and empties it
        under the writer. Taking that lock first, like SQLite, empties it.
        """
        with self._mutex:
            shm = self._shared_memory()
            if shm < 0:
                yield -1
                return
            _lock(shm, fcntl.F_WRLCK, WAL_WRITE_LOCK, 1)
            try:
                yield shm
            finally:
                _lock(shm, fcntl.F_UNLCK, WAL_WRITE_LOCK, 1)

    def _shared_memory(self) -> int:
        if self._shm >= 0 and os.fstat(self._shm).st_nlink == 0:
            os.close(self._shm)  # removed while this node was primary
            self._shm = -1
        if self._shm < 0:
            try:
                shm = os.open(self.shm_path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                return -1
            if try_lock(shm, WAL_DMS_LOCK):
                os.ftruncate(shm, 0)
            _lock(shm, fcntl.F_RDLCK, WAL_DMS_LOCK, 1)
            self._shm = shm
        return self._shm

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Hold SQLite's SHARED lock: no writer can be changing the file."""
        with self._mutex:
            fd = self._descriptor()
            _lock(fd, fcntl.F_RDLCK, PENDING_BYTE, 1)
            try:
                _lock(fd, fcntl.F_RDLCK, SHARED_FIRST, SHARED_SIZE)
            finally:
                _lock(fd, fcntl.F_UNLCK, PENDING_BYTE, 1)
            try:
                yield
            finally:
                _lock(fd, fcntl.F_UNLCK, SHARED_FIRST, SHARED_SIZE)

    def close(self) -> None:
        """Close the descriptor, unless a thread still waits for a lock on it:
        that thread's lock request must not be pulled from under it, and the
        process is about to exit, which releases everything anyway."""
        if not self._mutex.acquire(timeout=1.0):
            return
        try:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._shm >= 0:
                os.close(self._shm)
                self._shm = -1
        finally:
            self._mutex.release()


def _learn_no_flush(path: Path) -> None:
    """Close one descriptor of the mount while the mount still answers.

    The kernel sends FLUSH on a close until the mount has once answered
    that it does not implement it. A daemon killed -9 closes its own
    descriptors of its mount as it exits, when nothing answers any more:
    were that the mount's first FLUSH, the daemon would wait for itself in
    the kernel forever, and never come back. The descriptor's locks are
    open-file-description locks, which this other descriptor cannot drop.
    """
    os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
