"""A full data directory: commits fail cleanly and resume once space is freed.

Each node whose disk fills keeps its data directory on a small tmpfs of its
own. A filler file takes all the space but a chosen amount: none at all, or
enough for SQLite's own writes (journal, WAL, database pages) but not for the
transaction's LTX file, or on a replica enough to receive a file but not to
apply it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import StartNode
from node_process import NodeProcess
from test_primary import assert_history_rebuilds, position_of
from test_replication import wait_caught_up, wait_for

pytestmark = pytest.mark.fuse

DB = "full.db"
DISK = "16m"
ROWS = 50
"""One transaction of ROWS rows of 3000 random bytes: about 200 KiB of pages."""
BIG_INSERT = (
    "INSERT INTO t SELECT randomblob(3000) FROM (WITH RECURSIVE n(i) AS "
    f"(SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < {ROWS}) SELECT i FROM n);"
)
DISK_FULL = ("database or disk is full", "disk I/O error")
ROOM_FOR_SQLITE_NOT_LTX = 300 << 10
JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")


class SmallDisk:
    """A tmpfs mounted on a node's data directory, and a file that fills it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self, leave: int) -> None:
        """Take all the space but `leave` bytes."""
        with open(self.filler, "ab", buffering=0) as f:
            for block in (bytes(1 << 16), bytes(4096)):
                with contextlib.suppress(OSError):
                    while f.write(block):
                        pass
        size = self.filler.stat().st_size
        os.truncate(self.filler, max(0, size - leave))

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@contextlib.contextmanager
def small_disk(node_dir: Path) -> Iterator[SmallDisk]:
    data = node_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(data)], check=True)
    try:
        yield SmallDisk(data)
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def rows(node: NodeProcess) -> int:
    return int(node.sqlite(DB, "SELECT count(*) FROM t;").stdout)


def assert_intact(node: NodeProcess, tmp_path: Path) -> None:
    assert node.sqlite(DB, "PRAGMA integrity_check;").stdout.strip() == "ok"
    node.sqlite(DB, "PRAGMA wal_checkpoint(TRUNCATE);")
    assert_history_rebuilds(node, DB, tmp_path)


@pytest.mark.parametrize("journal_mode", ["DELETE", "WAL"])
@pytest.mark.parametrize("room", [0, ROOM_FOR_SQLITE_NOT_LTX], ids=["no-room", "room-for-sqlite"])
def test_commit_on_a_full_disk_fails_changes_nothing_and_writes_resume_once_space_is_freed(
    start_node: StartNode, tmp_path: Path, journal_mode: str, room: int
) -> None:
    with small_disk(tmp_path / "primary") as disk:
        primary = start_node("primary")
        replica = start_node("replica", candidate=False, primary=primary)
        try:
            primary.sqlite(DB, f"PRAGMA journal_mode={journal_mode}; CREATE TABLE t (x);")
            primary.sqlite(DB, "INSERT INTO t VALUES (1);")
            before = position_of(primary, DB)
            files = [path.name for path in primary.ltx_files(DB)]

            disk.fill(leave=room)
            failed = primary.sqlite(DB, BIG_INSERT, check=False)
            assert failed.returncode != 0
            assert any(message in failed.stderr for message in DISK_FULL), failed.stderr
            assert position_of(primary, DB) == before
            assert [path.name for path in primary.ltx_files(DB)] == files
            assert not list((disk.path / "tmp").glob("*"))

            disk.free()  # a WAL database cannot even be read on a full disk: -shm needs room
            assert rows(primary) == 1
            assert primary.sqlite(DB, "PRAGMA integrity_check;").stdout.strip() == "ok"
            assert position_of(primary, DB) == before
            primary.sqlite(DB, BIG_INSERT)
            assert rows(primary) == 1 + ROWS
            assert position_of(primary, DB)[0] == before[0] + 1
            wait_caught_up(primary, replica, DB)
            assert rows(replica) == 1 + ROWS
            assert_intact(primary, tmp_path)
        finally:
            replica.cleanup()
            primary.cleanup()


def test_replica_with_a_full_disk_never_applies_half_a_file_and_catches_up_once_freed(
    start_node: StartNode, tmp_path: Path
) -> None:
    """Room to receive the file, none to grow the database by it: the apply
    fails before the first page, the replica keeps its old state for its
    readers, and retries until it succeeds."""
    with small_disk(tmp_path / "replica") as disk:
        primary = start_node("primary")
        replica = start_node("replica", candidate=False, primary=primary)
        try:
            primary.sqlite(DB, "CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            wait_caught_up(primary, replica, DB)
            before = position_of(replica, DB)

            disk.fill(leave=ROOM_FOR_SQLITE_NOT_LTX)
            primary.sqlite(DB, BIG_INSERT)
            wait_for(lambda: replica.log().count("cannot apply the LTX file") >= 2, timeout=30)
            assert position_of(replica, DB) == before
            assert rows(replica) == 1
            assert replica.sqlite(DB, "PRAGMA integrity_check;").stdout.strip() == "ok"

            disk.free()
            wait_caught_up(primary, replica, DB)
            assert rows(replica) == 1 + ROWS
            assert (replica.db_dir(DB) / "database").read_bytes() == (
                primary.db_dir(DB) / "database"
            ).read_bytes()
            primary.sqlite(DB, "INSERT INTO t VALUES (2);")
            wait_caught_up(primary, replica, DB)
            assert_intact(replica, tmp_path)
        finally:
            replica.cleanup()
            primary.cleanup()


def test_replica_that_cannot_even_store_a_file_retries_until_space_is_freed(
    start_node: StartNode, tmp_path: Path
) -> None:
    with small_disk(tmp_path / "replica") as disk:
        primary = start_node("primary")
        replica = start_node("replica", candidate=False, primary=primary)
        try:
            primary.sqlite(DB, "CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            wait_caught_up(primary, replica, DB)
            before = position_of(replica, DB)

            disk.fill(leave=0)
            primary.sqlite(DB, BIG_INSERT)
            wait_for(
                lambda: replica.log().count("cannot store an incoming LTX file") >= 2, timeout=30
            )
            assert position_of(replica, DB) == before
            assert rows(replica) == 1
            assert not list((disk.path / "tmp").glob("incoming-*"))

            disk.free()
            wait_caught_up(primary, replica, DB)
            assert rows(replica) == 1 + ROWS
        finally:
            replica.cleanup()
            primary.cleanup()


def test_a_journal_write_that_failed_on_a_full_disk_is_not_read_back_as_a_hot_journal(
    start_node: StartNode, tmp_path: Path
) -> None:
    """With the writeback cache the kernel keeps a page whose write failed.
    A journal header that never reached the disk, read back from the
    kernel's copy, would look hot to the next writer and roll back a
    database that never changed."""
    with small_disk(tmp_path / "primary") as disk:
        primary = start_node("primary")
        try:
            primary.sqlite(DB, "CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            journal = primary.mount_dir / (DB + "-journal")
            disk.fill(leave=0)
            fd = os.open(journal, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.write(fd, JOURNAL_MAGIC + bytes(4096 - len(JOURNAL_MAGIC)))
                with pytest.raises(OSError):
                    os.fsync(fd)
            finally:
                with contextlib.suppress(OSError):  # close reports the failed write again
                    os.close(fd)
            wait_for(
                lambda: not journal.read_bytes().startswith(JOURNAL_MAGIC),
                what="the failed header dropped from the kernel's cache",
            )

            disk.free()
            primary.sqlite(DB, "INSERT INTO t VALUES (2);")
            assert primary.sqlite(DB, "SELECT x FROM t;").stdout.split() == ["1", "2"]
            assert_intact(primary, tmp_path)
        finally:
            primary.cleanup()
