"""The kernel caches writes to the mount: capture must stay exact.

SQLite syncs the database before it ends a rollback journal unless
`synchronous=OFF`; with OFF the kernel may still hold the transaction's
pages when the journal ends, and the daemon must fetch them before it
records the transaction. Each test keeps its connection open, so nothing
is flushed by a close, and checks that the history captured after every
commit rebuilds exactly what SQLite committed.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from conftest import litefs_cli
from node_process import NodeProcess
from test_primary import position_of
from test_replication import wait_caught_up

pytestmark = pytest.mark.fuse


@contextmanager
def connection(node: NodeProcess, db: str, *pragmas: str) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(node.mount_dir / db, isolation_level=None, timeout=30)) as conn:
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}").fetchall()
        yield conn


def rebuilt_rows(node: NodeProcess, db: str, tmp_path: Path) -> list[tuple[int, bytes]]:
    """The rows of the database the LTX history rebuilds."""
    rebuilt = tmp_path / "rebuilt.db"
    rebuilt.unlink(missing_ok=True)
    litefs_cli("ltx", "apply", "-db", str(rebuilt), *map(str, node.ltx_files(db)))
    with closing(sqlite3.connect(rebuilt)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return conn.execute("SELECT id, v FROM t ORDER BY id").fetchall()


def rewrite_rows(conn: sqlite3.Connection, rng: random.Random) -> None:
    """One transaction changing about 40 pages of a 100-page table."""
    conn.execute("BEGIN")
    for row_id in rng.sample(range(1, 101), 20):
        conn.execute("UPDATE t SET v = ? WHERE id = ?", (rng.randbytes(3000), row_id))
    conn.execute("COMMIT")


def fill(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t (v) VALUES (?)", ((bytes(3000),) for _ in range(100)))
    conn.execute("COMMIT")


@pytest.mark.parametrize("journal_mode", ["DELETE", "TRUNCATE"])
def test_synchronous_off_commits_are_captured_whole_at_the_journals_end(
    primary: NodeProcess, tmp_path: Path, journal_mode: str
) -> None:
    rng = random.Random(7)
    with connection(primary, "off.db", f"journal_mode={journal_mode}", "synchronous=OFF") as conn:
        fill(conn)
        for n in range(5):
            rewrite_rows(conn, rng)
            expected = conn.execute("SELECT id, v FROM t ORDER BY id").fetchall()
            assert rebuilt_rows(primary, "off.db", tmp_path) == expected, f"commit {n + 1}"
        assert position_of(primary, "off.db")[0] == 7


def test_synchronous_off_rollbacks_leave_the_history_alone(
    primary: NodeProcess, tmp_path: Path
) -> None:
    rng = random.Random(8)
    with connection(primary, "off.db", "synchronous=OFF", "cache_size=5") as conn:
        fill(conn)
        position = position_of(primary, "off.db")
        conn.execute("BEGIN")
        for row_id in range(1, 101):  # more than the cache holds: pages spill to the file
            conn.execute("UPDATE t SET v = ? WHERE id = ?", (rng.randbytes(3000), row_id))
        conn.execute("ROLLBACK")
        assert position_of(primary, "off.db") == position
        expected = conn.execute("SELECT id, v FROM t ORDER BY id").fetchall()
        assert rebuilt_rows(primary, "off.db", tmp_path) == expected


def test_wal_checkpoints_under_synchronous_off_keep_the_history_whole(
    primary: NodeProcess, tmp_path: Path
) -> None:
    """A checkpoint copies pages into the database file without syncing it;
    restarting the WAL afterwards must not lose them."""
    rng = random.Random(9)
    with connection(primary, "wal.db", "journal_mode=WAL", "synchronous=OFF") as conn:
        fill(conn)
        for _ in range(3):
            rewrite_rows(conn, rng)
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            rewrite_rows(conn, rng)  # restarts the WAL
            expected = conn.execute("SELECT id, v FROM t ORDER BY id").fetchall()
            assert rebuilt_rows(primary, "wal.db", tmp_path) == expected
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        assert primary.committed_checksum("wal.db") == position_of(primary, "wal.db")[1]


def test_replica_sees_a_database_grow_behind_the_kernels_cache(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    primary, replica = pair
    primary.sqlite("grow.db", "CREATE TABLE t (v); INSERT INTO t VALUES (1);")
    wait_caught_up(primary, replica, "grow.db")
    assert replica.sqlite("grow.db", "SELECT count(*) FROM t;").stdout.strip() == "1"
    with open(replica.mount_dir / "grow.db", "rb") as held:  # keeps the kernel's inode
        primary.sqlite("grow.db", "INSERT INTO t SELECT randomblob(5000) FROM t, t, t, t, t;")
        wait_caught_up(primary, replica, "grow.db")
        size = (primary.mount_dir / "grow.db").stat().st_size
        assert (replica.mount_dir / "grow.db").stat().st_size == size
        assert len(held.read()) == size
    result = replica.sqlite("grow.db", "PRAGMA integrity_check; SELECT count(*) FROM t;")
    assert result.stdout.split() == ["ok", "2"]
