"""All databases of a node, the node's role, retention, and change notices.

The store is the one place that decides: the FUSE layer asks it whether a
database may be created or written, the HTTP layer asks it for positions and
LTX files, and the lease loop tells it when the role changes. It is shared by
the FUSE thread (trio), the HTTP thread (asyncio) and worker threads, so every
method is thread-safe and none of them blocks for long while holding the lock.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path, PurePosixPath

from litefs.db import Database, NotPermitted, Position, ReadOnlyError
from litefs.lease import PrimaryInfo

log = logging.getLogger("litefs.store")


class Role(Enum):
    PRIMARY = "primary"
    REPLICA = "replica"


class InvalidName(ValueError):
    """A database name that could escape the data directory or is malformed."""


def check_name(name: str) -> str:
    """Validate a database name: a relative path without `.`/`..` parts."""
    path = PurePosixPath(name)
    if (
        not name
        or path.is_absolute()
        or "\x00" in name
        or any(part in ("", ".", "..") for part in name.split("/"))
        or len(name.encode()) > 1024
    ):
        raise InvalidName(f"invalid database name: {name!r}")
    return name


Listener = Callable[[str], None]
"""Called with a database name after it changed (commit, creation, removal)."""


class Store:
    """The databases under `<data>/dbs` and what this node is allowed to do."""

    def __init__(self, data_dir: Path, *, retention: float = 600.0) -> None:
        self.data_dir = data_dir
        self.dbs_dir = data_dir / "dbs"
        self.trash_dir = data_dir / "trash"
        self.retention = retention
        self.role = Role.REPLICA
        self.primary: PrimaryInfo | None = None
        self._dbs: dict[str, Database] = {}
        self._lock = threading.RLock()
        self._listeners: list[Listener] = []

    # -- life cycle -------------------------------------------------------

    def open(self) -> None:
        """Load every database on disk, recovering any a crash interrupted."""
        self.dbs_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.trash_dir, ignore_errors=True)
        self.trash_dir.mkdir(exist_ok=True)
        for name, path in self._scan(self.dbs_dir, ""):
            db = Database(name, path)
            db.open()
            db.writable = self.role is Role.PRIMARY
            self._dbs[name] = db
            log.info("database %s: opened at %s", name, db.position)

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

    def close(self) -> None:
        with self._lock:
            for db in self._dbs.values():
                db.close()

    # -- role -------------------------------------------------------------

    @property
    def is_primary(self) -> bool:
        return self.role is Role.PRIMARY

    def set_role(self, role: Role, primary: PrimaryInfo | None) -> None:
        with self._lock:
            self.role = role
            self.primary = primary
            for db in self._dbs.values():
                db.writable = role is Role.PRIMARY
        log.info(
            "node is now %s%s",
            role.value,
            f" (primary: {primary.hostname})" if primary and role is Role.REPLICA else "",
        )

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
        with self._lock:
            if not self.is_primary:
                raise ReadOnlyError(f"cannot create database {name}: this node is a replica")
            if name in self._dbs:
                raise FileExistsError(name)
            db = Database.create(name, self.path_of(name), mode)
            self._dbs[name] = db
        return db

    def remove_database(self, name: str) -> None:
        with self._lock:
            if not self.is_primary:
                raise ReadOnlyError(f"cannot remove database {name}: this node is a replica")
            db = self._dbs.pop(name)
        db.remove(self.trash_dir)
        log.info("database %s: removed", name)
        self._notify(name)

    def rename_database(self, old: str, new: str) -> None:
        """Rename a database that has no replicated history (TXID 0)."""
        with self._lock:
            db = self._dbs[old]
            if db.position.txid:
                raise NotPermitted(f"cannot rename replicated database {old}")
            os.rename(db.path, self.path_of(new))
            db.close()
            del self._dbs[old]
            moved = Database(new, self.path_of(new))
            moved.open()
            moved.writable = self.is_primary
            self._dbs[new] = moved

    def rename_directory(self, old: str, new: str) -> None:
        """Rename a directory; refused when it holds replicated databases."""
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
                moved = Database(renamed, self.path_of(renamed))
                moved.open()
                moved.writable = self.is_primary
                self._dbs[renamed] = moved

    def commit(self, db: Database) -> Position | None:
        """Capture the transaction that just ended on `db`; see `Database.commit`."""
        position = db.commit()
        if position is not None:
            self._notify(db.name)
        return position

    # -- retention --------------------------------------------------------

    def enforce_retention(self) -> int:
        removed = 0
        for db in self.databases():
            removed += db.enforce_retention(self.retention)
        return removed

    # -- change notices ---------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.remove(listener)

    def _notify(self, name: str) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(name)
