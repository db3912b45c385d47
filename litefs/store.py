"""All databases of a node, the node's role, retention, and change notices.

The store is the one place that decides: the FUSE layer asks it whether a
database may be created or written, the HTTP layer asks it for positions and
LTX files, and the lease loop tells it when the role changes. It is shared by
the FUSE thread (trio), the HTTP thread (asyncio) and worker threads, so every
method is thread-safe and none of them blocks for long while holding the lock.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Protocol

from litefs import ltx, sqlitefile, walindex
from litefs.capture import NO_CRASH, CrashPoints
from litefs.db import Database, NotPermitted, PositionMismatch, ReadOnlyError
from litefs.lease import PrimaryInfo
from litefs.locking import DatabaseLock
from litefs.names import ReservedName, check_name, check_new_name
from litefs.position import Position

log = logging.getLogger("litefs.store")


class Role(Enum):
    PRIMARY = "primary"
    REPLICA = "replica"


class NotPrimary(ReadOnlyError):
    """Only the primary may do this; `primary` says where it is, if known."""

    def __init__(self, message: str, primary: PrimaryInfo | None) -> None:
        super().__init__(message)
        self.primary = primary


CURRENT_FOR = 2.0
"""Seconds a replica that has applied all it received counts as current
after it last heard from the primary, which sends a heartbeat every second
when it has nothing else to send."""


class Change(Enum):
    """What happened to a database, for the listeners that tell kinds apart
    (the commit counter); the replication stream and the proxy take any
    change as a moment to look at the position again."""

    COMMITTED = "committed"
    """A transaction captured on this node, as the primary (or imported)."""
    APPLIED = "applied"
    """A transaction or snapshot from the primary."""
    REMOVED = "removed"
    ROLE = "role"
    """This node became primary or replica: every database is announced."""


Listener = Callable[[str, Change], None]
"""Called with a database's name and what happened to it."""


class MountObserver(Protocol):
    """What the mount must hear about changes it did not make itself, so the
    kernel drops what it cached. Called from worker or HTTP threads only."""

    def database_changed(self, name: str) -> None: ...

    def pages_applied(self, name: str, pages: list[tuple[int, bytes]]) -> None:
        """These pages of the database were written, and nothing else changed."""
        ...

    def database_created(self, name: str) -> None: ...

    def database_removed(self, name: str) -> None: ...

    def role_changed(self) -> None: ...

    def pull_cached_pages(self, name: str) -> None:
        """Have the kernel write back the database's pages it caches."""
        ...

    def forget_cached_pages(self, name: str) -> None:
        """Have the kernel drop what it caches of the database and its journal."""
        ...


class NullObserver:
    def database_changed(self, name: str) -> None:
        return None

    def pages_applied(self, name: str, pages: list[tuple[int, bytes]]) -> None:
        return None

    def database_created(self, name: str) -> None:
        return None

    def database_removed(self, name: str) -> None:
        return None

    def role_changed(self) -> None:
        return None

    def pull_cached_pages(self, name: str) -> None:
        return None

    def forget_cached_pages(self, name: str) -> None:
        return None


def _reset_wal_index(shm: int, db: Database) -> None:
    """Rewrite the wal-index through the mount, where readers map it."""
    index = walindex.reset(
        os.pread(shm, walindex.INFO_SIZE, 0), os.fstat(db.fd).st_size // (db.page_size or 1)
    )
    if index is not None:
        os.pwrite(shm, index, 0)


class Store:
    """The databases under `<data>/dbs` and what this node is allowed to do.

    Two parties hear of changes. The mount (`observer`), which the store
    drives: the kernel must drop what it cached of a file changed behind
    it, and give back dirty pages before a commit is captured. And
    listeners (`add_listener`), told the name of each database whose
    position changed and why: the replication streams, the proxy, the
    commit counter.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        retention: float = 600.0,
        mount_dir: Path | None = None,
        crash: CrashPoints = NO_CRASH,
    ) -> None:
        self.data_dir = data_dir
        self.crash = crash
        self.dbs_dir = data_dir / "dbs"
        self.trash_dir = data_dir / "trash"
        self.tmp_dir = data_dir / "tmp"
        self.mount_dir = mount_dir
        self.observer: MountObserver = NullObserver()
        self._locks: dict[str, DatabaseLock] = {}
        self.retention = retention
        self.role = Role.REPLICA
        self.primary: PrimaryInfo | None = None
        self._dbs: dict[str, Database] = {}
        self._lock = threading.RLock()
        self._listeners: list[Listener] = []
        self._listeners_lock = threading.Lock()
        self.commit_deadline = math.inf
        """Monotonic time after which the lease may have passed to another
        node: a commit after it is refused even if the lease loop is late."""
        self._heard_at = -math.inf
        self._current = False
        self._current_at = time.monotonic()

    # -- life cycle -------------------------------------------------------

    def open(self) -> None:
        """Load every database on disk, recovering any a crash interrupted."""
        self.dbs_dir.mkdir(parents=True, exist_ok=True)
        for scratch in (self.trash_dir, self.tmp_dir):
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(exist_ok=True)
        for name, path in self._scan(self.dbs_dir, ""):
            db = self._database(name, path)
            db.open()
            db.writable = self.role is Role.PRIMARY
            self._dbs[name] = db
            log.info("database %s: opened at %s", name, db.position)
            self._warn_if_reserved(name)

    def _warn_if_reserved(self, name: str) -> None:
        """A database made before its name was reserved is kept, but the
        generated file of the same name hides it: say how to move it."""
        try:
            check_new_name(name)
        except ReservedName as exc:
            log.warning(
                "database %s: %s, so the mount may not show it; copy it out with "
                "`litefs export -name %s FILE`, then remove %s while the node is stopped",
                name,
                exc,
                name,
                self.dbs_dir / name,
            )

    def _scan(self, directory: Path, prefix: str) -> Iterator[tuple[str, Path]]:
        for entry in os.scandir(directory):
            if not entry.is_dir(follow_symlinks=False):
                continue
            name = f"{prefix}{entry.name}"
            path = Path(entry.path)
            if (path / "database").is_file():
                yield name, path
            else:
                yield from self._scan(path, f"{name}/")

    def release_locks(self) -> None:
        """Close the descriptors held through the mount; before it goes away."""
        with self._lock:
            locks, self._locks = list(self._locks.values()), {}
        for lock in locks:
            with contextlib.suppress(OSError):
                lock.close()

    def close(self) -> None:
        self.release_locks()
        with self._lock:
            for db in self._dbs.values():
                db.close()

    # -- role -------------------------------------------------------------

    @property
    def is_primary(self) -> bool:
        return self.role is Role.PRIMARY

    def set_role(self, role: Role, primary: PrimaryInfo | None) -> None:
        if role is Role.PRIMARY and not self.is_primary:
            for db in self.databases():
                self.observer.forget_cached_pages(db.name)
        with self._lock:
            changed = (role, primary) != (self.role, self.primary)
            self.role = role
            self.primary = primary
            if role is Role.PRIMARY:
                self.commit_deadline = math.inf
            if changed:
                self._current, self._current_at = False, time.monotonic()
            for db in self._dbs.values():
                with db.lock:  # a commit under way finishes first
                    db.writable = role is Role.PRIMARY
        self.observer.role_changed()
        for db in self.databases():
            self._notify(db.name, Change.ROLE)
        if not changed:
            return
        log.info(
            "node is now %s%s",
            role.value,
            f" (primary: {primary.hostname})" if primary and role is Role.REPLICA else "",
        )

    def replica_heard(self, *, current: bool) -> None:
        """The replica's stream delivered a frame; `current` when nothing the
        primary sent is left to apply."""
        now = time.monotonic()
        self._heard_at = now
        self._current = current
        if current:
            self._current_at = now

    def lag(self) -> float:
        """Seconds this node is behind the primary: 0 on the primary and on a
        replica whose stream is live with nothing left to apply; otherwise
        the time since it last was (or since start-up, if never)."""
        if self.is_primary:
            return 0.0
        now = time.monotonic()
        if self._current and now - self._heard_at <= CURRENT_FOR:
            return 0.0
        return now - self._current_at

    # -- databases --------------------------------------------------------

    def database(self, name: str) -> Database | None:
        return self._dbs.get(name)

    def databases(self) -> list[Database]:
        with self._lock:
            return list(self._dbs.values())

    def path_of(self, name: str) -> Path:
        return self.dbs_dir / check_name(name)

    def create_database(self, name: str, mode: int = 0o644) -> Database:
        """Create an empty database; only the primary may."""
        check_new_name(name)
        with self._lock:
            if not self.is_primary:
                raise ReadOnlyError(f"cannot create database {name}: this node is a replica")
            if name in self._dbs:
                raise FileExistsError(name)
            db = Database.create(name, self.path_of(name), mode, crash=self.crash, events=self)
            self._dbs[name] = db
        return db

    def remove_database(self, name: str) -> None:
        with self._lock:
            if not self.is_primary:
                raise ReadOnlyError(f"cannot remove database {name}: this node is a replica")
            db = self._dbs.pop(name)
        db.remove(self.trash_dir)
        log.info("database %s: removed", name)
        self._notify(name, Change.REMOVED)

    def rename_database(self, old: str, new: str) -> None:
        """Rename a database that has no replicated history (TXID 0)."""
        check_new_name(new)
        with self._lock:
            db = self._dbs[old]
            if db.position.txid:
                raise NotPermitted(f"cannot rename replicated database {old}")
            os.rename(db.path, self.path_of(new))
            db.close()
            del self._dbs[old]
            moved = self._database(new, self.path_of(new))
            moved.open()
            moved.writable = self.is_primary
            self._dbs[new] = moved

    def rename_directory(self, old: str, new: str) -> None:
        """Rename a directory; refused when it holds replicated databases."""
        check_new_name(new)
        with self._lock:
            prefix = old + "/"
            inside = [name for name in self._dbs if name.startswith(prefix)]
            if any(self._dbs[name].position.txid for name in inside):
                raise NotPermitted(f"cannot rename {old}: it holds replicated databases")
            os.rename(self.path_of(old), self.path_of(new))
            for name in inside:
                db = self._dbs.pop(name)
                db.close()
                renamed = new + name[len(old) :]
                moved = self._database(renamed, self.path_of(renamed))
                moved.open()
                moved.writable = self.is_primary
                self._dbs[renamed] = moved

    def _database(self, name: str, path: Path) -> Database:
        return Database(name, path, crash=self.crash, events=self)

    def check_writable(self) -> None:
        """Raise ReadOnlyError unless this node may change the mount's tree."""
        if not self.is_primary:
            raise ReadOnlyError("this node is a replica")

    # -- commits (CommitEvents) ---------------------------------------------

    def commit_allowed(self) -> bool:
        """Past the deadline the lease may be another node's: the commit is
        refused in place. The role itself changes in the lease loop, never
        inside a request: invalidating the kernel's entries from within one
        deadlocks."""
        return time.monotonic() < self.commit_deadline

    def committed(self, name: str) -> None:
        self._notify(name, Change.COMMITTED)

    def pull_cached_pages(self, name: str) -> None:
        self.observer.pull_cached_pages(name)

    # -- replication ------------------------------------------------------

    def positions(self) -> dict[str, Position]:
        with self._lock:
            return {name: db.position for name, db in self._dbs.items() if db.position.txid}

    def _sqlite_lock(self, name: str) -> DatabaseLock | None:
        if self.mount_dir is None:
            return None
        with self._lock:
            lock = self._locks.get(name)
            if lock is None:
                lock = self._locks[name] = DatabaseLock(self.mount_dir / name)
            return lock

    def write_snapshot(self, name: str) -> tuple[Path, Position]:
        """A snapshot LTX file of `name` in the scratch directory; the caller
        deletes it once sent. Runs in a worker thread."""
        db = self._dbs.get(name)
        if db is None:
            raise KeyError(name)
        lock = self._sqlite_lock(name)
        out = self.tmp_dir / f"snapshot-{os.getpid()}-{time.monotonic_ns()}.ltx"
        read_lock = lock.shared() if lock else contextlib.nullcontext()
        try:
            position = db.write_snapshot(out, read_lock)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        return out, position

    def export_database(self, name: str) -> tuple[Path, Position]:
        """A consistent copy of `name` in the scratch directory, on any node;
        the caller deletes it once sent. Runs in a worker thread."""
        db = self._dbs.get(name)
        if db is None or db.position.txid == 0:
            raise KeyError(name)
        lock = self._sqlite_lock(name)
        out = self.scratch_path("export")
        try:
            position = db.copy_committed(out, lock.shared() if lock else contextlib.nullcontext())
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        return out, position

    def import_database(self, name: str, source: Path) -> Position:
        """Replace or create `name` with the SQLite file `source`, as one
        snapshot LTX file that replicas receive like any other (primary
        only). `source` is checked in full first, and consumed.

        Runs in a worker thread: it waits for SQLite's EXCLUSIVE lock
        through the mount, as a replica applying a file does.
        """
        check_new_name(name)
        self._check_primary(f"cannot import {name}")
        sqlitefile.check(source)
        db = self._dbs.get(name)
        if db is None:
            position = self._import_new(name, source)
        else:
            position = self._import_over(db, name, source)
        log.info("database %s: imported at %s", name, position)
        self.committed(name)
        return position

    def _import_new(self, name: str, source: Path) -> Position:
        """The file becomes the database, in a directory made aside and
        moved into place whole."""
        staging = self.scratch_path("new")
        try:
            made = Database.from_sqlite_file(name, staging, source)
            made.close()
            return self._install(name, staging, writable=True, importing=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _import_over(self, db: Database, name: str, source: Path) -> Position:
        """Replaced as a replica applies a snapshot: under SQLite's
        EXCLUSIVE lock, so readers see the old contents or the new."""
        ltx_path = self.scratch_path("import")
        try:
            sqlitefile.follow_change_counter(source, os.pread(db.fd, 100, 0))
            txid = db.position.txid + 1
            with open(source, "rb") as src, open(ltx_path, "wb") as out:
                ltx.encode_snapshot(src, out, txid=txid)
            with self._lock:
                self._check_importable(name)
                if self._dbs.get(name) is not db:
                    raise FileExistsError(f"database {name} changed while it was being imported")
            return db.apply_ltx(ltx_path, self._exclusive(db, self._sqlite_lock(name)))
        finally:
            ltx_path.unlink(missing_ok=True)

    def _check_importable(self, name: str) -> None:
        self._check_primary(f"cannot import {name}")
        if not self.commit_allowed():
            raise ReadOnlyError(f"cannot import {name}: the lease is about to pass")

    def _check_primary(self, what: str) -> None:
        if not self.is_primary:
            primary = self.primary
            where = f"; the primary is {primary.hostname}" if primary else ""
            raise NotPrimary(f"{what}: this node is a replica{where}", primary)

    def scratch_path(self, purpose: str) -> Path:
        return self.tmp_dir / f"{purpose}-{threading.get_ident()}-{time.monotonic_ns()}"

    def incoming_path(self, name: str) -> Path:
        """Where a replica writes an LTX file for `name` while it arrives:
        a file made ahead of time when the database has one ready."""
        db = self._dbs.get(name)
        spare = db.incoming_path() if db is not None else None
        if spare is not None:
            return spare
        return self.tmp_dir / f"incoming-{threading.get_ident()}-{time.monotonic_ns()}.ltx"

    def apply_ltx(self, name: str, path: Path) -> Position:
        """Apply an LTX file received from the primary (replicas only).

        Runs in a worker thread: it waits for SQLite's EXCLUSIVE lock through
        the mount, and tells the kernel to drop cached pages before readers
        may look again.
        """
        check_name(name)
        with self._lock:
            if self.is_primary:
                raise NotPermitted(f"refusing to apply {name}: this node is the primary")
            db = self._dbs.get(name)
        if db is None:
            position = self._create_from(name, path)
        else:
            lock = self._sqlite_lock(name)
            writer = lock.wal_writer() if lock is not None else None
            position = db.apply_ltx(path, self._exclusive(db, lock), writer)
        self._notify(name, Change.APPLIED)
        if db is not None and lock is not None:
            self._backfill(db, lock)
        return position

    def _backfill(self, db: Database, lock: DatabaseLock, *, force: bool = False) -> None:
        """Move what a replica appended to a WAL into the database file,
        as SQLite's automatic checkpoint would; readers are never waited for."""
        if not db.wal_mode or db.wal.chain is None:
            return
        with lock.wal_writer() as shm:
            if shm >= 0:
                db.backfill(shm, lambda: self.observer.database_changed(db.name), force=force)

    def _create_from(self, name: str, path: Path, *, writable: bool = False) -> Position:
        """A database this node does not have yet, made from a snapshot
        aside and moved into place whole: no reader ever sees it empty."""
        with open(path, "rb") as f:  # the apply checks the rest before writing a page
            header = ltx.Header.unpack(f.read(ltx.HEADER_SIZE))
        if not header.is_snapshot:
            raise PositionMismatch(
                f"database {name}: a new database must start with a snapshot, "
                f"got TXIDs {header.min_txid}-{header.max_txid}"
            )
        staging = self.tmp_dir / f"new-{threading.get_ident()}-{time.monotonic_ns()}"
        try:
            made = Database.create(name, staging, crash=self.crash, events=self)
            made.writable = False
            try:
                made.apply_ltx(path, contextlib.nullcontext())
            finally:
                made.close()
            return self._install(name, staging, writable=writable)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _install(
        self, name: str, staging: Path, *, writable: bool, importing: bool = False
    ) -> Position:
        """Move a database made aside into place and open it."""
        with self._lock:
            if importing:
                self._check_importable(name)
            if name in self._dbs:
                raise FileExistsError(f"database {name} appeared while it was being made")
            final = self.path_of(name)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, final)
            db = self._database(name, final)
            db.open()
            db.writable = writable
            self._dbs[name] = db
        self.observer.database_created(name)
        return db.position

    @contextlib.contextmanager
    def _exclusive(self, db: Database, lock: DatabaseLock | None) -> Iterator[None]:
        """Keep readers out while an LTX file is applied, then make them
        drop what they cached: the kernel its pages, and in WAL mode every
        connection its page cache, through a new wal-index header."""
        if lock is None:
            yield
            self._announce_apply(db)
            return
        if not db.uses_wal():
            with lock.exclusive():
                yield
                self._announce_apply(db)
            return
        with lock.exclusive_wal() as shm:
            yield
            self.observer.database_changed(db.name)
            if shm >= 0:
                _reset_wal_index(shm, db)

    def _announce_apply(self, db: Database) -> None:
        """Hand the kernel the pages a small apply wrote, or have it drop
        every page it caches of the database."""
        pages, db.applied_pages = db.applied_pages, None
        if pages is None:
            self.observer.database_changed(db.name)
        else:
            self.observer.pages_applied(db.name, pages)

    def drop_database(self, name: str) -> None:
        """Remove a database the primary no longer has (replicas only)."""
        with self._lock:
            db = self._dbs.pop(name, None)
            lock = self._locks.pop(name, None)
        if lock is not None:
            lock.close()
        if db is None:
            return
        db.remove(self.trash_dir)
        self.observer.database_removed(name)
        log.info("database %s: dropped, as on the primary", name)
        self._notify(name, Change.REMOVED)

    # -- retention --------------------------------------------------------

    def enforce_retention(self) -> int:
        removed = 0
        for db in self.databases():
            removed += db.enforce_retention(self.retention)
        return removed

    # -- change notices ---------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        with self._listeners_lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._listeners_lock:
            self._listeners.remove(listener)

    def _notify(self, name: str, change: Change) -> None:
        """Listeners only schedule work (they may be called with a database's
        lock held), so they run under a lock of their own."""
        with self._listeners_lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(name, change)
