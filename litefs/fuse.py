"""The mount: kernel file operations translated into store and database calls.

Names in the mount map onto the data directory like this:

    <mount>/dir/                  <data>/dbs/dir/
    <mount>/dir/my.db             <data>/dbs/dir/my.db/database
    <mount>/dir/my.db-journal     <data>/dbs/dir/my.db/journal   (also -wal, -shm)
    <mount>/dir/my.db-pos         the database's position, generated
    <mount>/.primary              the primary's hostname, on replicas only
    <mount>/.lag                  milliseconds behind the primary, read by name

Every FUSE request costs tens of microseconds, so the kernel is told to cache
as much as it safely can: long entry and attribute timeouts, cached negative
lookups, `keep_cache` on open files, and writes (the writeback cache), which
reach the daemon merged, when SQLite syncs or closes a file. That is safe
because every change on a primary passes through the kernel; whatever the
daemon changes behind its back (replication) is followed by an invalidation.
The capture modules know when a commit needs pages the kernel still caches
and have it write them back. The WAL alone bypasses the cache (`direct_io`):
SQLite commits to it without syncing, and each commit must reach the daemon
as it happens.

This module decides nothing about replication: a file operation on one of
a database's files goes to the object that owns that kind of file (the
database, its rollback journal, its WAL, its shared memory), which says
whether the operation may commit a transaction; those run in a worker
thread. Whether this node may change anything is the store's answer.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import secrets
import stat
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from enum import Enum
from functools import partial, wraps
from operator import attrgetter
from pathlib import Path
from typing import TypeVar

import pyfuse3
import trio

from litefs.capture import SQLiteFile, WouldBlock
from litefs.db import (
    Database,
    DatabaseError,
    NotPermitted,
    ReadOnlyError,
)
from litefs.names import POSITION_SUFFIX, InvalidName, ReservedName, check_new_name
from litefs.store import Store

log = logging.getLogger("litefs.fuse")
T = TypeVar("T")
Ops = TypeVar("Ops", bound=pyfuse3.Operations)

ENTRY_TIMEOUT = 3600.0
ATTR_TIMEOUT = 3600.0
VIRTUAL_FILE_MODE = stat.S_IFREG | 0o444
CACHE_PAGE_SIZE = 4096


class Kind(Enum):
    DIRECTORY = "directory"
    DATABASE = "database"
    JOURNAL = "journal"
    WAL = "wal"
    SHM = "shm"
    POSITION = "position"
    PRIMARY = "primary"
    LAG = "lag"


SUFFIXES = (
    ("-journal", Kind.JOURNAL),
    ("-wal", Kind.WAL),
    ("-shm", Kind.SHM),
    ("-pos", Kind.POSITION),
)
BACKING_NAMES = {Kind.JOURNAL: "journal", Kind.WAL: "wal", Kind.SHM: "shm"}
OWNERS: dict[Kind, Callable[[Database], SQLiteFile]] = {
    Kind.DATABASE: attrgetter("main_file"),
    Kind.JOURNAL: attrgetter("journal"),
    Kind.WAL: attrgetter("wal"),
    Kind.SHM: attrgetter("shm"),
}
"""Which object of a database owns each kind of file."""
GENERATED = (Kind.POSITION, Kind.PRIMARY, Kind.LAG)
"""Files the mount makes up: read-only, never created, removed or changed."""
PRIMARY_FILE = ".primary"
LAG_FILE = ".lag"


class Inode:
    """One inode of the mount. Inode numbers are never reused while the
    daemon runs, and a path keeps its inode for as long as it exists."""

    __slots__ = ("backing", "db_name", "ino", "kind", "lookups", "opens", "path", "unlinked")

    def __init__(self, ino: int, kind: Kind, path: str, db_name: str) -> None:
        self.ino = ino
        self.kind = kind
        self.path = path
        self.db_name = db_name
        self.lookups = 0
        self.opens = 0
        self.unlinked = False
        self.backing: str | None = None
        """The file in the data directory, once asked for (a path joined on
        every request costs more than the request's system call)."""


class Handle:
    """An open file: the node, its backing descriptor, and the object that
    owns the file (None for generated files)."""

    __slots__ = ("fd", "file", "node", "pid", "writable")

    def __init__(
        self, node: Inode, fd: int, file: SQLiteFile | None, pid: int, writable: bool
    ) -> None:
        self.node = node
        self.fd = fd
        self.file = file
        self.pid = pid
        self.writable = writable


class DirectoryListing:
    """An open directory. Its entries are read at the first `readdir`:
    SQLite opens a directory only to sync it."""

    __slots__ = ("directory", "entries", "path")

    def __init__(self, directory: Inode) -> None:
        self.directory = directory
        self.path = directory.path
        self.entries: list[tuple[bytes, Inode]] | None = None


def _error(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _answering_eio(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """A handler's exception other than FUSEError ends pyfuse3's session,
    and with it the mount, for every application using it: a bug in one
    operation is logged and that operation answered EIO instead."""

    @wraps(handler)
    async def guarded(*args: object) -> T:
        try:
            return await handler(*args)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("file operation %s failed", handler.__name__)
            raise _error(errno.EIO) from None

    return guarded


def _logging_errors(handler: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """For the operations the kernel expects no answer to (forget)."""

    @wraps(handler)
    async def guarded(*args: object) -> None:
        try:
            await handler(*args)
        except Exception:
            log.exception("file operation %s failed", handler.__name__)

    return guarded


def _guard_handlers(cls: type[Ops]) -> type[Ops]:
    for name in vars(pyfuse3.Operations):
        handler = vars(cls).get(name)
        if inspect.iscoroutinefunction(handler):
            guard = _logging_errors if name == "forget" else _answering_eio
            setattr(cls, name, guard(handler))
    return cls


@_guard_handlers
class FileSystem(pyfuse3.Operations):
    """pyfuse3 operations over a `Store`."""

    supports_dot_lookup = False
    enable_writeback_cache = True
    enable_acl = False

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        self.dbs_dir = store.dbs_dir
        self._nodes: dict[int, Inode] = {}
        self._paths: dict[str, Inode] = {}
        self._handles: dict[int, Handle | DirectoryListing] = {}
        self._changed_directories: set[str] = set()
        """Directories of the mount with entries not yet synced."""
        self._subdirectory_counts: dict[str, int] = {}
        """Each directory's number of subdirectories, its link count less two:
        counting scans the directory, and the kernel asks for a directory's
        attributes again after every file made or deleted in it."""
        self._unsynced_names: set[str] = set()
        """Databases whose journal or WAL got a new name not yet synced."""
        self._forgetting: dict[int, bool] = {}
        """Inodes whose cached pages are being dropped after a failed write:
        whether another write failed since the drop began."""
        self._forgetting_lock = threading.Lock()
        self._next_ino = _first_inode_number()
        self._next_fh = 1
        root = Inode(pyfuse3.ROOT_INODE, Kind.DIRECTORY, "", "")
        root.lookups = 1
        self._nodes[root.ino] = root
        self._paths[""] = root

    # -- nodes ------------------------------------------------------------

    def _node_for(self, path: str, kind: Kind, db_name: str) -> Inode:
        node = self._paths.get(path)
        if node is None or node.kind is not kind:
            node = Inode(self._next_ino, kind, path, db_name)
            self._next_ino += 1
            self._nodes[node.ino] = node
            self._paths[path] = node
        return node

    def _node(self, inode: int) -> Inode:
        try:
            return self._nodes[inode]
        except KeyError:
            raise _error(errno.ENOENT) from None

    def _directory(self, inode: int) -> Inode:
        node = self._node(inode)
        if node.kind is not Kind.DIRECTORY:
            raise _error(errno.ENOTDIR)
        return node

    def _classify(self, parent: str, name: str) -> tuple[Kind, str, str] | None:
        """What `name` in directory `parent` is: (kind, path, database name)."""
        path = _join(parent, name)
        store = self.store
        if not parent and name == PRIMARY_FILE:
            if store.is_primary or store.primary is None:
                return None
            return Kind.PRIMARY, path, ""
        if not parent and name == LAG_FILE:
            return Kind.LAG, path, ""
        for suffix, kind in SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                base = path[: -len(suffix)]
                db = store.database(base)
                if db is None:
                    break
                if kind is Kind.POSITION or OWNERS[kind](db).exists():
                    return kind, path, base
                break  # a database may bear the name (made while `base` did not exist)
        if store.database(path) is not None:
            return Kind.DATABASE, path, path
        if os.path.isdir(self.dbs_dir / path):
            return Kind.DIRECTORY, path, ""
        return None

    def _backing(self, node: Inode) -> str:
        backing = node.backing
        if backing is None:
            kind = node.kind
            if kind is Kind.DATABASE:
                path = self.dbs_dir / node.path / "database"
            elif kind is Kind.DIRECTORY:
                path = self.dbs_dir / node.path
            else:
                path = self.dbs_dir / node.db_name / BACKING_NAMES[kind]
            backing = node.backing = str(path)
        return backing

    def _database(self, node: Inode) -> Database:
        return self._database_named(node.db_name)

    def _database_named(self, name: str) -> Database:
        db = self.store.database(name)
        if db is None:
            raise _error(errno.ENOENT)
        return db

    def _owner(self, node: Inode) -> SQLiteFile:
        """The object that owns a database's file."""
        return OWNERS[node.kind](self._database(node))

    # -- attributes -------------------------------------------------------

    def _attributes(self, node: Inode) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.ino
        attrs.entry_timeout = ENTRY_TIMEOUT
        attrs.attr_timeout = ATTR_TIMEOUT
        kind = node.kind
        if kind is Kind.POSITION or kind is Kind.PRIMARY or kind is Kind.LAG:
            return self._virtual_attributes(node, attrs)
        st = self._stat(node)
        attrs.st_mode = st.st_mode
        attrs.st_nlink = 0 if node.unlinked else st.st_nlink
        if kind is Kind.DIRECTORY:
            attrs.st_nlink = 2 + self._subdirectory_count(node.path)
        attrs.st_uid = st.st_uid
        attrs.st_gid = st.st_gid
        attrs.st_size = st.st_size
        attrs.st_blksize = st.st_blksize
        attrs.st_blocks = st.st_blocks
        attrs.st_atime_ns = st.st_atime_ns
        attrs.st_mtime_ns = st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        return attrs

    def _stat(self, node: Inode) -> os.stat_result:
        if not node.unlinked:
            try:
                return os.stat(self._backing(node))
            except FileNotFoundError:
                pass
        for handle in self._handles.values():
            if isinstance(handle, Handle) and handle.node is node:
                return os.fstat(handle.fd)
        raise _error(errno.ENOENT)

    def _backing_or_descriptor(self, node: Inode) -> str | int:
        """Where to change a file's metadata: an unlinked file (the kernel
        sends its cached times when it is closed) through an open descriptor."""
        if node.unlinked:
            for handle in self._handles.values():
                if isinstance(handle, Handle) and handle.node is node and handle.fd >= 0:
                    return handle.fd
        return self._backing(node)

    def _virtual_attributes(
        self, node: Inode, attrs: pyfuse3.EntryAttributes
    ) -> pyfuse3.EntryAttributes:
        content = self._virtual_content(node)
        attrs.st_mode = VIRTUAL_FILE_MODE
        attrs.st_nlink = 1
        attrs.st_size = len(content)
        attrs.st_blksize = 4096
        attrs.st_blocks = 1
        if node.kind is Kind.LAG:
            attrs.attr_timeout = 0  # its size changes with every reading
        if node.kind is Kind.POSITION:
            db = self.store.database(node.db_name)
            if db is not None and db.fd >= 0:
                st = os.fstat(db.fd)
                attrs.st_uid, attrs.st_gid = st.st_uid, st.st_gid
                attrs.st_mtime_ns = attrs.st_ctime_ns = attrs.st_atime_ns = st.st_mtime_ns
        return attrs

    def _virtual_content(self, node: Inode) -> bytes:
        if node.kind is Kind.POSITION:
            db = self.store.database(node.db_name)
            if db is None:
                raise _error(errno.ENOENT)
            return f"{db.position}\n".encode()
        if node.kind is Kind.LAG:
            return f"{round(self.store.lag() * 1000)}\n".encode()
        primary = self.store.primary
        if self.store.is_primary or primary is None:
            raise _error(errno.ENOENT)
        return f"{primary.hostname}\n".encode()

    def _subdirectory_count(self, path: str) -> int:
        count = self._subdirectory_counts.get(path)
        if count is None:
            count = self._subdirectory_counts[path] = sum(1 for _ in self._subdirectories(path))
        return count

    def _entries_changed(self, *directories: str) -> None:
        """Databases or directories came or went in these directories."""
        self._changed_directories.update(directories)
        self._subdirectory_counts.clear()

    def _subdirectories(self, path: str) -> Iterator[str]:
        try:
            entries = list(os.scandir(self.dbs_dir / path))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and not os.path.isfile(
                os.path.join(entry.path, "database")
            ):
                yield entry.name

    # -- lookups ----------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._directory(parent_inode)
        found = self._classify(parent.path, os.fsdecode(name))
        if found is None:
            attrs = pyfuse3.EntryAttributes()
            attrs.st_ino = 0
            attrs.entry_timeout = ENTRY_TIMEOUT
            return attrs
        kind, path, db_name = found
        node = self._node_for(path, kind, db_name)
        attrs = self._attributes(node)
        node.lookups += 1
        return attrs

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            node = self._nodes.get(inode)
            if node is None:
                continue
            node.lookups -= count
            if node.lookups <= 0 and node.opens <= 0 and node.unlinked:
                del self._nodes[inode]

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(self._node(inode))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.kind in GENERATED:
            raise _error(errno.EPERM)
        if fields.update_size:
            await self._truncate(node, attr.st_size)
        path = self._backing_or_descriptor(node)
        try:
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(
                    path,
                    attr.st_uid if fields.update_uid else -1,
                    attr.st_gid if fields.update_gid else -1,
                )
            if fields.update_atime or fields.update_mtime:
                st = os.stat(path)
                os.utime(
                    path,
                    ns=(
                        attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                        attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns,
                    ),
                )
        except OSError as exc:
            raise _error(exc.errno or errno.EIO) from None
        return self._attributes(node)

    async def _truncate(self, node: Inode, size: int) -> None:
        if node.kind is Kind.DIRECTORY:
            raise _error(errno.EISDIR)
        file = self._owner(node)
        with _as_fuse_errors():
            await _carry_out(file.truncate_blocks(size), file.truncate, size)

    # -- directories ------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._directory(inode)
        if not os.path.isdir(self._backing(node)):
            raise _error(errno.ENOENT)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = DirectoryListing(node)
        return fh

    def _list(self, directory: Inode) -> list[tuple[bytes, Inode]]:
        entries: list[tuple[bytes, Inode]] = []
        parent = directory.path
        try:
            scanned = sorted(os.scandir(self.dbs_dir / parent), key=lambda e: e.name)
        except FileNotFoundError:
            raise _error(errno.ENOENT) from None
        for entry in scanned:
            if not entry.is_dir(follow_symlinks=False):
                continue
            path = _join(parent, entry.name)
            db = self.store.database(path)
            if db is None:
                entries.append((os.fsencode(entry.name), self._node_for(path, Kind.DIRECTORY, "")))
                continue
            entries.append((os.fsencode(entry.name), self._node_for(path, Kind.DATABASE, path)))
            for suffix, kind in SUFFIXES:
                # `-pos` is found by name but not listed, so that copying
                # `my.db*` copies SQLite's files and no generated one.
                if kind is not Kind.POSITION and OWNERS[kind](db).exists():
                    name = entry.name + suffix
                    node = self._node_for(_join(parent, name), kind, path)
                    entries.append((os.fsencode(name), node))
        if not parent and not self.store.is_primary and self.store.primary is not None:
            node = self._node_for(PRIMARY_FILE, Kind.PRIMARY, "")
            entries.append((PRIMARY_FILE.encode(), node))
        return entries

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._handles[fh]
        assert isinstance(listing, DirectoryListing)
        entries = listing.entries
        if entries is None:
            entries = listing.entries = self._list(listing.directory)
        for index in range(start_id, len(entries)):
            name, node = entries[index]
            try:
                attrs = self._attributes(node)
            except pyfuse3.FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Make the directory's entries durable: SQLite asks for this right
        after creating a journal or WAL, which lives in its database's
        directory. The mount's directory is synced only when a database or
        directory in it came or went since, which a journal's creation does
        not do; a journal's directory only when the journal got a new name
        (an emptied journal is reused, and its name is durable already)."""
        listing = self._handles.get(fh)
        if not isinstance(listing, DirectoryListing):
            return
        directories = []
        if listing.path in self._changed_directories:
            self._changed_directories.discard(listing.path)
            directories.append(self.dbs_dir / listing.path)
        names = [n for n in self._unsynced_names if n.rpartition("/")[0] == listing.path]
        directories += [self.dbs_dir / name for name in names]
        with _as_fuse_errors():
            _sync_directories(directories)
        self._unsynced_names.difference_update(names)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._directory(parent_inode)
        with _as_fuse_errors():
            self.store.check_writable()
        text = os.fsdecode(name)
        if self._classify(parent.path, text) is not None:
            raise _error(errno.EEXIST)
        path = _join(parent.path, text)
        backing = self.dbs_dir / path
        with _as_fuse_errors():
            check_new_name(path)
            os.mkdir(backing, stat.S_IMODE(mode) & ~ctx.umask)
            os.chown(backing, ctx.uid, ctx.gid)
        self._entries_changed(parent.path)
        node = self._node_for(path, Kind.DIRECTORY, "")
        attrs = self._attributes(node)
        node.lookups += 1
        return attrs

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._directory(parent_inode)
        found = self._classify(parent.path, os.fsdecode(name))
        if found is None:
            raise _error(errno.ENOENT)
        kind, path, _ = found
        if kind is not Kind.DIRECTORY:
            raise _error(errno.ENOTDIR)
        with _as_fuse_errors():
            self.store.check_writable()
            os.rmdir(self.dbs_dir / path)
        self._entries_changed(parent.path)
        self._detach(path)

    # -- files ------------------------------------------------------------

    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._directory(parent_inode)
        text = os.fsdecode(name)
        if self._classify(parent.path, text) is not None:
            raise _error(errno.EEXIST)
        kind, path, db_name = self._new_entry(parent.path, text)
        permissions = stat.S_IMODE(mode) & ~ctx.umask
        with _as_fuse_errors():
            if kind is Kind.DATABASE:
                db = self.store.create_database(path, permissions)
                os.fchown(db.fd, ctx.uid, ctx.gid)
                self._entries_changed(parent.path)
                self._forget_missing_position(parent.ino, text)
            else:
                file = OWNERS[kind](self._database_named(db_name))
                file.check_writable()
                if file.create(permissions, ctx.uid, ctx.gid):
                    self._unsynced_names.add(db_name)
        node = self._node_for(path, kind, db_name)
        node.unlinked = False
        fh = self._open_handle(node, flags, ctx)
        attrs = self._attributes(node)
        node.lookups += 1
        return _file_info(fh, kind), attrs

    @staticmethod
    def _forget_missing_position(parent_inode: int, name: str) -> None:
        """A new database brings its position file: the kernel may have
        cached that name as missing. It holds the directory's lock until
        the creating request returns, so the name is dropped afterwards."""
        entry = os.fsencode(name + POSITION_SUFFIX)
        threading.Thread(
            target=_quietly, args=(pyfuse3.invalidate_entry, parent_inode, entry), daemon=True
        ).start()

    def _new_entry(self, parent: str, name: str) -> tuple[Kind, str, str]:
        path = _join(parent, name)
        for suffix, kind in SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                base = path[: -len(suffix)]
                if self.store.database(base) is None:
                    break
                if kind is Kind.POSITION:
                    raise _error(errno.EPERM)
                return kind, path, base
        return Kind.DATABASE, path, path

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        kind = node.kind
        if kind is Kind.DIRECTORY:
            raise _error(errno.EISDIR)
        if node.unlinked:
            # Only a stale cached name leads here (its file went with its
            # database): ESTALE makes the kernel look the name up afresh.
            raise _error(errno.ESTALE)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if kind in GENERATED:
            if writing:
                raise _error(errno.EACCES)
            fh = self._open_handle(node, flags, ctx)
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if writing and not _is_own_thread(ctx.pid):
            with _as_fuse_errors():
                self._owner(node).check_writable()
        if writing and flags & os.O_TRUNC:  # the kernel leaves O_TRUNC to us (atomic_o_trunc)
            await self._truncate(node, 0)
        fh = self._open_handle(node, flags, ctx)
        return _file_info(fh, kind)

    def _open_handle(self, node: Inode, flags: int, ctx: pyfuse3.RequestContext) -> int:
        kind = node.kind
        fd = -1
        file: SQLiteFile | None = None
        if kind is Kind.POSITION:
            self._database(node)
        elif kind not in GENERATED:
            file = self._owner(node)
            access = os.O_RDWR if flags & os.O_ACCMODE != os.O_RDONLY else os.O_RDONLY
            with _as_fuse_errors():
                fd = os.open(self._backing(node), access | os.O_CLOEXEC)
        fh = self._next_fh
        self._next_fh += 1
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        self._handles[fh] = Handle(node, fd, file, ctx.pid, writable)
        node.opens += 1
        return fh

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles[fh]
        fd = handle.fd  # type: ignore[union-attr]
        if fd >= 0:
            return os.pread(fd, size, off)
        assert isinstance(handle, Handle)
        return self._virtual_content(handle.node)[off : off + size]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle: Handle = self._handles[fh]  # type: ignore[assignment]
        file: SQLiteFile = handle.file  # type: ignore[assignment]  # generated files are read-only
        try:
            if handle.node.unlinked:
                # The kernel writes back what it cached of a file after its
                # name is gone; like a disk, keep it with the open file.
                return os.pwrite(handle.fd, buf, off)
            return await _carry_out(file.write_blocks(off, buf), file.write, handle.fd, off, buf)
        except DatabaseError as exc:
            error = _fuse_error_for(exc)
        except OSError as exc:
            error = _error(exc.errno or errno.EIO)
        except Exception:
            log.exception("write to %s failed", handle.node.path)
            error = _error(errno.EIO)
        self._forget_failed_write(handle.node.ino)
        raise error

    def _forget_failed_write(self, ino: int) -> None:
        """The kernel keeps what it cached of a write that failed here
        (writeback cache), refused after a lost lease or lacking disk space:
        read back, a journal header that never reached the disk looks hot,
        and the next writer rolls the database back to what the header says.
        Dropped off the loop, which may have to serve the writes an
        invalidation flushes; a failure meanwhile has it dropped again."""
        with self._forgetting_lock:
            again = ino in self._forgetting
            self._forgetting[ino] = again
        if not again:
            threading.Thread(target=self._drop_failed_pages, args=(ino,), daemon=True).start()

    def _drop_failed_pages(self, ino: int) -> None:
        while True:
            _quietly(pyfuse3.invalidate_inode, ino, False)
            with self._forgetting_lock:
                if not self._forgetting[ino]:
                    del self._forgetting[ino]
                    return
                self._forgetting[ino] = False

    async def flush(self, fh: int) -> None:
        # ENOSYS tells the kernel never to send FLUSH again: one request less per close.
        raise _error(errno.ENOSYS)

    async def fsync(self, fh: int, datasync: bool) -> None:
        """Synced inline: handing an fsync to a worker thread costs about
        90 us here, three times what a typical journal fsync takes, and
        SQLite issues three of them per transaction."""
        handle = self._handles[fh]
        assert isinstance(handle, Handle)
        if handle.fd >= 0:
            with _as_fuse_errors():
                file = handle.file
                if file is not None:
                    file.synced()
                if datasync:
                    os.fdatasync(handle.fd)
                else:
                    os.fsync(handle.fd)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if not isinstance(handle, Handle):
            return
        file = handle.file
        if file is not None and handle.writable:
            # On the event loop, so that no other operation on the file can
            # interleave; an error here must not end the mount's session.
            try:
                file.settle()
            except Exception as exc:
                log.error("%s: writes made outside a transaction not recorded: %s", file.path, exc)
        if handle.fd >= 0:
            os.close(handle.fd)
        node = handle.node
        node.opens -= 1
        if node.opens <= 0 and node.lookups <= 0 and node.unlinked:
            self._nodes.pop(node.ino, None)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._directory(parent_inode)
        found = self._classify(parent.path, os.fsdecode(name))
        if found is None:
            raise _error(errno.ENOENT)
        kind, path, db_name = found
        if kind is Kind.DIRECTORY:
            raise _error(errno.EISDIR)
        if kind in GENERATED:
            raise _error(errno.EPERM)
        with _as_fuse_errors():
            if kind is Kind.DATABASE:
                self.store.remove_database(path)
                self._entries_changed(parent.path)
            else:
                file = OWNERS[kind](self._database_named(db_name))
                node = self._paths.get(path)
                in_use = node is not None and node.opens > 0
                await _carry_out(file.remove_blocks(), partial(file.remove, in_use=in_use))
        self._detach(path)
        if kind is Kind.DATABASE:
            for suffix, _ in SUFFIXES:
                self._detach(path + suffix)
            # The kernel forgets the name it unlinked, not the database's
            # other files, which went with it; it holds the directory's lock
            # until this request returns, so they are dropped afterwards.
            threading.Thread(target=self._invalidate_names, args=(path,), daemon=True).start()

    def _detach(self, path: str) -> None:
        node = self._paths.pop(path, None)
        if node is None:
            return
        node.unlinked = True
        if node.lookups <= 0 and node.opens <= 0:
            self._nodes.pop(node.ino, None)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old_parent = self._directory(parent_inode_old)
        new_parent = self._directory(parent_inode_new)
        found = self._classify(old_parent.path, os.fsdecode(name_old))
        if found is None:
            raise _error(errno.ENOENT)
        kind, old_path, _ = found
        new_name = os.fsdecode(name_new)
        if self._classify(new_parent.path, new_name) is not None:
            raise _error(errno.EEXIST)
        new_path = _join(new_parent.path, new_name)
        with _as_fuse_errors():
            self.store.check_writable()
            if kind is Kind.DIRECTORY:
                self.store.rename_directory(old_path, new_path)
            elif kind is Kind.DATABASE:
                if any(new_name.endswith(suffix) for suffix, _ in SUFFIXES):
                    raise _error(errno.EINVAL)
                self.store.rename_database(old_path, new_path)
            else:
                raise _error(errno.EPERM)
        self._entries_changed(old_parent.path, new_parent.path)
        self._move(old_path, new_path)

    def _move(self, old: str, new: str) -> None:
        prefix = old + "/"
        for path in [p for p in self._paths if p == old or p.startswith(prefix)]:
            node = self._paths.pop(path)
            node.path = new + path[len(old) :]
            node.backing = None
            if node.db_name == old or node.db_name.startswith(prefix):
                node.db_name = new + node.db_name[len(old) :]
            self._paths[node.path] = node

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise _error(errno.EPERM)

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise _error(errno.EPERM)

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise _error(errno.EPERM)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.dbs_dir)
        data = pyfuse3.StatvfsData()
        for field in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(data, field, getattr(st, field))
        return data

    # -- changes made behind the kernel's back (MountObserver) ---------------
    # Called from worker and HTTP threads, never from the FUSE loop's.

    def database_changed(self, name: str) -> None:
        """The database was applied to, its WAL perhaps emptied, and its
        journal perhaps played back."""
        self._drop_cached_pages(name, name + "-wal", name + "-journal")
        node = self._paths.get(name)
        if node is not None:
            self._announce_size(node)

    def pages_applied(self, name: str, pages: list[tuple[int, bytes]]) -> None:
        """Store the pages in the kernel's cache: readers keep every other
        page they had, and need no request to the daemon for these."""
        self._drop_cached_pages(name + "-journal")  # perhaps played back
        node = self._paths.get(name)
        if node is None:
            return
        for pgno, data in pages:
            _quietly(pyfuse3.notify_store, node.ino, (pgno - 1) * len(data), data)
        self._announce_size(node)

    def _announce_size(self, node: Inode) -> None:
        """With the writeback cache the kernel keeps a file's size itself
        and takes none from the daemon; storing the file's last bytes into
        its cache is what tells it the file grew. (A file that shrank keeps
        its old size there: SQLite reads the page count from the header.)"""
        db = self.store.database(node.db_name)
        if db is None or db.fd < 0:
            return
        size = os.fstat(db.fd).st_size
        if size:
            start = (size - 1) // CACHE_PAGE_SIZE * CACHE_PAGE_SIZE
            _quietly(pyfuse3.notify_store, node.ino, start, os.pread(db.fd, size - start, start))

    def database_created(self, name: str) -> None:
        self._subdirectory_counts.clear()
        self._invalidate_names(name)

    def database_removed(self, name: str) -> None:
        self._subdirectory_counts.clear()
        self._invalidate_names(name)

    def role_changed(self) -> None:
        _quietly(pyfuse3.invalidate_entry, pyfuse3.ROOT_INODE, PRIMARY_FILE.encode())

    def forget_cached_pages(self, name: str) -> None:
        """Drop what the kernel caches of a database and its journal, so
        that a node about to take writes reads them as they are: a write
        refused while it was a replica may linger there."""
        self._drop_cached_pages(name, name + "-journal")

    def pull_cached_pages(self, name: str) -> None:
        """Invalidating a file makes the kernel write back its dirty pages
        first, and wait for them: the FUSE loop must be free to serve those
        writes. (Syncing the file through the mount would keep its clean
        pages, but a path lookup can wait for the directory lock of the
        very request that asked for the pages: an unlink.)"""
        if trio.lowlevel.in_trio_run():
            raise RuntimeError("cached pages pulled from the FUSE loop would never arrive")
        self._drop_cached_pages(name)

    def _drop_cached_pages(self, *paths: str) -> None:
        """Have the kernel drop its pages of the files it knows by these paths."""
        for path in paths:
            node = self._paths.get(path)
            if node is not None:
                _quietly(pyfuse3.invalidate_inode, node.ino, False)

    def _invalidate_names(self, name: str) -> None:
        """Drop cached lookups (negative ones too) of a database, its
        journal, WAL, shared memory and position files, and of directories
        on its path that the kernel can only know as missing. A directory
        the kernel knows to exist keeps its entry: dropping it would leave
        the processes working in it with a deleted working directory."""
        parent_path = ""
        parts = name.split("/")
        for depth, part in enumerate(parts):
            parent = self._paths.get(parent_path)
            if parent is None:
                return
            path = _join(parent_path, part)
            if depth == len(parts) - 1:
                names = [part] + [part + suffix for suffix, _ in SUFFIXES]
            else:
                names = [] if path in self._paths else [part]
            for entry in names:
                _quietly(pyfuse3.invalidate_entry, parent.ino, os.fsencode(entry))
            parent_path = path

    def open_handles(self) -> list[tuple[str, int]]:
        """(path, pid) of every file applications still hold open."""
        return [
            (handle.node.path, handle.pid)
            for handle in self._handles.values()
            if isinstance(handle, Handle) and not _is_own_thread(handle.pid)
        ]


def _file_info(fh: int, kind: Kind) -> pyfuse3.FileInfo:
    if kind is Kind.WAL:
        return pyfuse3.FileInfo(fh=fh, direct_io=True)
    return pyfuse3.FileInfo(fh=fh, keep_cache=True)


async def _carry_out(blocks: bool, operation: Callable[..., T], *args: object) -> T:
    """Run a file operation on the event loop unless it may take long or
    finds its database locked; then in a worker thread."""
    if not blocks:
        try:
            return operation(*args, wait=False)
        except WouldBlock:
            pass
    return await trio.to_thread.run_sync(operation, *args)


def _first_inode_number() -> int:
    """Where this mount's inode numbers start: somewhere new each time.

    SQLite recognises a file by device and inode number, process-wide, and
    shares its locks and WAL index between the connections to it. A mount's
    device number is reused once an old mount is gone; were inode numbers
    reused too, a process still holding connections from before a daemon's
    restart would take a new database for the old one.
    """
    return pyfuse3.ROOT_INODE + 1 + (secrets.randbits(40) << 12)


def _is_own_thread(pid: int) -> bool:
    """Whether a request comes from the daemon itself (FUSE reports the
    calling thread's id), which takes SQLite's locks through the mount."""
    return os.path.exists(f"/proc/self/task/{pid}")


def _quietly(notify: Callable[..., None], *args: object) -> None:
    """Send a cache invalidation; the kernel may not have had it cached."""
    with contextlib.suppress(OSError):
        notify(*args)


def _sync_directories(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fuse_error_for(exc: DatabaseError) -> pyfuse3.FUSEError:
    if isinstance(exc, ReadOnlyError):
        return _error(errno.EROFS)
    if isinstance(exc, NotPermitted):
        return _error(errno.EPERM)
    return _error(errno.EIO)


class _as_fuse_errors:
    """Turn OS and database errors into the errno the kernel should see."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc is None or isinstance(exc, pyfuse3.FUSEError):
            return
        if isinstance(exc, DatabaseError):
            raise _fuse_error_for(exc) from None
        if isinstance(exc, FileExistsError):
            raise _error(errno.EEXIST) from None
        if isinstance(exc, OSError):
            raise _error(exc.errno or errno.EIO) from None
        if isinstance(exc, ReservedName):
            log.warning("refused: %s", exc)
            raise _error(errno.EPERM) from None
        if isinstance(exc, InvalidName):
            raise _error(errno.EINVAL) from None
        if isinstance(exc, KeyError):
            raise _error(errno.ENOENT) from None
        if isinstance(exc, Exception):
            # A handler's exception other than FUSEError ends pyfuse3's
            # session, and with it the mount: report it, answer EIO.
            log.error("file operation failed", exc_info=exc)
            raise _error(errno.EIO) from None
