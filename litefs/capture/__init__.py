"""Commit capture: learning from what SQLite does to a database's files when
a transaction commits, so that each one becomes exactly one LTX file.

Each journal family has its module: `rollback` for DELETE, TRUNCATE and
PERSIST, `wal` for WAL. Both are driven by the mount with the file
operations SQLite issues (write, truncate, unlink) and tell it which of them
may commit, so the mount runs those in a worker thread. They can equally be
driven directly, which is how their tests run without a mount.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Protocol

log = logging.getLogger("litefs.capture")

COMMIT_STEPS = (
    "before-ltx",
    "mid-ltx",
    "before-ltx-sync",
    "before-journal-removal",
    "after-journal-removal",
)
"""The steps of a commit at which a crash can be injected."""

CRASH_STATUS = 86
CRASH_POINT_ENV = "LITEFS_CRASH_AT"
"""Names the step at which a daemon exits as if it crashed (tests only)."""


class SQLiteFile(Protocol):
    """One of the files SQLite keeps for a database, as the mount drives it.

    Each `*_blocks` answer says whether that operation may take long (it
    records a large transaction, or must wait for the database's lock), so
    the mount runs it in a worker thread. Other operations run on the
    mount's event loop with `wait=False`: one that would have to wait for
    the database's lock raises WouldBlock before changing anything, and is
    then run in a worker thread after all.
    """

    path: Path

    def check_writable(self) -> None:
        """Raise ReadOnlyError if this node may not open the file for writing."""
        ...

    def write(self, fd: int, offset: int, data: bytes, wait: bool = True) -> int: ...

    def write_blocks(self, offset: int, data: bytes) -> bool: ...

    def truncate(self, size: int, wait: bool = True) -> None: ...

    def truncate_blocks(self, size: int) -> bool: ...

    def exists(self) -> bool:
        """Whether SQLite sees the file."""
        ...

    def create(self, mode: int, uid: int, gid: int) -> bool:
        """Make the file, empty, as open(O_CREAT | O_EXCL) would; True when
        that made a new name in its directory, which a directory sync must
        make durable."""
        ...

    def remove(self, wait: bool = True, *, in_use: bool = False) -> None:
        """Delete the file; `in_use` when it is open still, and what was
        written must stay readable there."""
        ...

    def remove_blocks(self) -> bool: ...

    def settle(self, wait: bool = True) -> None:
        """Record what was written outside any transaction; the mount calls
        it when a writer closes the file."""
        ...

    def synced(self, wait: bool = True) -> None:
        """An application synced the file: the kernel has written back
        every page of it it cached. Records as `settle` does."""
        ...


class Sync(Enum):
    """When an LTX file reaches the disk. Any choice recovers consistently
    from a power cut (see `recover`): they differ in what it costs at
    commit and in whether a lost file comes back as itself or inside a
    snapshot."""

    NOW = "now"
    """Before the transaction goes ahead."""
    FILESYSTEM = "when the filesystem writes it back"
    """Captured commits: a file a power cut loses or tears leaves a hot
    journal (rolled back), a WAL that still holds the transaction (recorded
    again), or a database ahead of its history (recorded as a snapshot),
    and never a database behind a history it cannot reach. One fsync less
    per commit, and no pause to sync a thousand files when a WAL restarts."""


class WouldBlock(Exception):
    """The operation would wait for a database's lock: run it in a worker
    thread instead. Raised before anything has changed."""


SMALL_TRANSACTION = 64 * 1024
"""Bytes of pages up to which a transaction is recorded on the mount's event
loop: a hop to a worker thread costs more than writing such a file."""


class CrashPoints:
    """Where a commit stops as if the process had crashed.

    The daemon injects a crash with `exit_at`; in-process tests pass a
    callback that raises instead, and check what a restart makes of it.
    """

    __slots__ = ("_crash", "step")

    def __init__(self, step: str | None = None, crash: Callable[[str], None] | None = None) -> None:
        if step is not None and step not in COMMIT_STEPS:
            raise ValueError(f"unknown crash step {step!r}; known: {', '.join(COMMIT_STEPS)}")
        self.step = step
        self._crash = crash or _exit

    @classmethod
    def from_environment(cls) -> CrashPoints:
        step = os.environ.get(CRASH_POINT_ENV) or None
        if step not in COMMIT_STEPS:
            if step is not None:
                log.warning("ignoring %s=%s: not a commit step", CRASH_POINT_ENV, step)
            return NO_CRASH
        return cls(step)

    def __call__(self, step: str) -> None:
        if self.step == step:
            self._crash(step)


def _exit(step: str) -> None:
    os._exit(CRASH_STATUS)


NO_CRASH = CrashPoints()


def read_page_at(fd: int, page_size: int, offset: int) -> bytes:
    """A page read from `offset`, with zeros for whatever lies past the end
    of the file (a database file may be shorter than its WAL says)."""
    data = os.pread(fd, page_size, offset)
    return data if len(data) == page_size else data.ljust(page_size, b"\0")


def create_file(path: Path, mode: int, uid: int, gid: int) -> None:
    """An empty file, new, owned as the process that asked for it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # as asked: the daemon's own umask is not the caller's
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)
