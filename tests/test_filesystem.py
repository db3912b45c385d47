"""The mount behaves as the local filesystem SQLite expects."""

from __future__ import annotations

import errno
import os
import pwd
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import StartNode
from node_process import NodeProcess

pytestmark = pytest.mark.fuse


def test_inode_numbers_are_stable_unique_and_agree_with_fstat(primary: NodeProcess) -> None:
    primary.sqlite("a.db", "CREATE TABLE t (x);")
    primary.sqlite("b.db", "CREATE TABLE t (x);")
    a, b = primary.mount_dir / "a.db", primary.mount_dir / "b.db"
    assert a.stat().st_ino != b.stat().st_ino
    assert a.stat().st_ino == a.stat().st_ino
    fd = os.open(a, os.O_RDONLY)
    try:
        assert os.fstat(fd).st_ino == a.stat().st_ino
    finally:
        os.close(fd)
    listed = {entry.name: entry.inode() for entry in os.scandir(primary.mount_dir)}
    assert listed["a.db"] == a.stat().st_ino


def test_link_counts(primary: NodeProcess) -> None:
    primary.sqlite("a.db", "CREATE TABLE t (x);")
    (primary.mount_dir / "sub").mkdir()
    (primary.mount_dir / "sub" / "inner").mkdir()
    assert (primary.mount_dir / "a.db").stat().st_nlink == 1
    assert (primary.mount_dir / "sub").stat().st_nlink == 3
    assert primary.mount_dir.stat().st_nlink == 3


def test_unlinked_open_file_reports_zero_links(primary: NodeProcess) -> None:
    path = primary.mount_dir / "scratch"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"data")
        os.unlink(path)
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 4, 0) == b"data"
        assert not path.exists()
    finally:
        os.close(fd)


def test_exclusive_create(primary: NodeProcess) -> None:
    path = primary.mount_dir / "x.db"
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644))
    with pytest.raises(FileExistsError):
        os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)


def test_chmod_chown_and_utimens(primary: NodeProcess) -> None:
    path = primary.mount_dir / "x.db"
    primary.sqlite("x.db", "CREATE TABLE t (x);")
    os.chmod(path, 0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chown(path, 1234, 5678)
    assert (path.stat().st_uid, path.stat().st_gid) == (1234, 5678)
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    assert path.stat().st_mtime_ns == 2_000_000_000


def test_directories_and_rename(primary: NodeProcess) -> None:
    (primary.mount_dir / "a").mkdir()
    (primary.mount_dir / "a" / "notes").write_text("x")
    os.rename(primary.mount_dir / "a", primary.mount_dir / "b")
    assert (primary.mount_dir / "b" / "notes").read_text() == "x"
    os.rename(primary.mount_dir / "b" / "notes", primary.mount_dir / "b" / "renamed")
    assert sorted(os.listdir(primary.mount_dir / "b")) == ["renamed"]
    with pytest.raises(OSError) as raised:
        os.rmdir(primary.mount_dir / "b")
    assert raised.value.errno == errno.ENOTEMPTY
    os.unlink(primary.mount_dir / "b" / "renamed")
    os.rmdir(primary.mount_dir / "b")
    assert os.listdir(primary.mount_dir) == []


def test_replicated_database_cannot_be_renamed(primary: NodeProcess) -> None:
    primary.sqlite("x.db", "CREATE TABLE t (x);")
    with pytest.raises(OSError) as raised:
        os.rename(primary.mount_dir / "x.db", primary.mount_dir / "y.db")
    assert raised.value.errno == errno.EPERM


def test_deleting_a_database_removes_it(primary: NodeProcess) -> None:
    primary.sqlite("x.db", "CREATE TABLE t (x);")
    os.unlink(primary.mount_dir / "x.db")
    assert not (primary.mount_dir / "x.db").exists()
    assert not primary.db_dir("x.db").exists()
    primary.sqlite("x.db", "CREATE TABLE u (y);")
    assert (primary.mount_dir / "x.db-pos").read_text().startswith("0000000000000001/")


def test_fsync_of_files_and_directories(primary: NodeProcess) -> None:
    fd = os.open(primary.mount_dir / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(primary.mount_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def test_position_file_is_read_only(primary: NodeProcess) -> None:
    primary.sqlite("x.db", "CREATE TABLE t (x);")
    with pytest.raises(PermissionError):
        open(primary.mount_dir / "x.db-pos", "w").close()


def run_as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    nobody = pwd.getpwnam("nobody")
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_permission_checks_apply_to_other_users(start_node: StartNode) -> None:
    with tempfile.TemporaryDirectory(prefix="litefs-perm-") as root:
        os.chmod(root, 0o755)
        node = start_node("node", root=Path(root), settings={"fuse": {"allow-other": True}})
        try:
            os.chmod(node.dir, 0o755)
            node.sqlite("private.db", "CREATE TABLE t (x); INSERT INTO t VALUES (42);")
            os.chmod(node.mount_dir, 0o755)
            os.chmod(node.mount_dir / "private.db", 0o600)
            query = ("sqlite3", str(node.mount_dir / "private.db"), "SELECT * FROM t;")
            denied = run_as_nobody(*query)
            assert denied.returncode != 0
            os.chmod(node.mount_dir / "private.db", 0o644)
            allowed = run_as_nobody(*query)
            assert allowed.stdout.strip() == "42", allowed.stderr
            refused = run_as_nobody("touch", str(node.mount_dir / "new.db"))
            assert refused.returncode != 0
        finally:
            node.cleanup()


def test_opening_with_o_trunc_truncates(primary: NodeProcess) -> None:
    notes = primary.mount_dir / "notes.txt"
    notes.write_text("a longer first version\n")
    notes.write_text("short\n")  # open(O_WRONLY | O_TRUNC) of an existing file
    assert notes.read_text() == "short\n"
    assert notes.stat().st_size == 6


def test_database_deleted_with_its_journal_names_then_made_again(primary: NodeProcess) -> None:
    """The kernel's cached entries for the deleted database's journal and
    position file go with it, so SQLite can create them afresh."""
    primary.sqlite("my.db", "PRAGMA journal_mode=PERSIST; CREATE TABLE t (x);")
    assert (primary.mount_dir / "my.db-journal").exists()
    (primary.mount_dir / "my.db").unlink()
    primary.sqlite(
        "my.db", "PRAGMA journal_mode=PERSIST; CREATE TABLE u (x); INSERT INTO u VALUES (1);"
    )
    assert primary.sqlite("my.db", "SELECT count(*) FROM u;").stdout.strip() == "1"
    assert (primary.mount_dir / "my.db-pos").read_text().startswith("0000000000000002/")
    (primary.mount_dir / "my.db").unlink()
    deadline = time.monotonic() + 2
    while (primary.mount_dir / "my.db-journal").exists():
        assert time.monotonic() < deadline, "the journal's name outlived its database"
        time.sleep(0.01)
