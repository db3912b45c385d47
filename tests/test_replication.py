"""Replication: replicas stream LTX from the primary and follow it exactly."""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from conftest import StartNode
from node_process import NodeProcess
from waiting import wait_for

from litefs import ltx

pytestmark = pytest.mark.fuse

CATCH_UP_TIMEOUT = 60.0


def position(node: NodeProcess, db: str) -> str:
    try:
        return (node.mount_dir / f"{db}-pos").read_text().strip()
    except OSError:
        return ""


def wait_caught_up(primary: NodeProcess, replica: NodeProcess, db: str) -> None:
    wait_for(
        lambda: position(replica, db) == position(primary, db) != "",
        CATCH_UP_TIMEOUT,
        f"{replica.name} to catch up on {db}",
    )


def assert_identical(primary: NodeProcess, replica: NodeProcess, db: str) -> None:
    wait_caught_up(primary, replica, db)
    assert (replica.db_dir(db) / "database").read_bytes() == (
        primary.db_dir(db) / "database"
    ).read_bytes()
    assert ltx.database_checksum(replica.db_dir(db) / "database") == int(
        position(primary, db).split("/")[1], 16
    )


def test_writes_on_the_primary_appear_on_the_replica(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    primary, replica = pair
    primary.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES ('hello');")
    assert_identical(primary, replica, "my.db")
    assert replica.sqlite("my.db", "SELECT x FROM t;").stdout.strip() == "hello"
    primary.sqlite("my.db", "INSERT INTO t VALUES ('again');")
    assert_identical(primary, replica, "my.db")
    assert replica.sqlite("my.db", "SELECT count(*) FROM t;").stdout.strip() == "2"


def test_replica_refuses_writes_and_changes_nothing(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    primary, replica = pair
    primary.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES (1);")
    assert_identical(primary, replica, "my.db")
    before = (replica.db_dir("my.db") / "database").read_bytes()

    result = replica.sqlite("my.db", "INSERT INTO t VALUES (2);", check=False)
    assert result.returncode != 0
    assert "attempt to write a readonly database" in result.stderr
    with pytest.raises(OSError) as raised:
        os.open(replica.mount_dir / "new.db", os.O_RDWR | os.O_CREAT, 0o644)
    assert raised.value.errno == errno.EROFS
    with pytest.raises(OSError):
        (replica.mount_dir / "dir").mkdir()
    with pytest.raises(OSError):
        os.unlink(replica.mount_dir / "my.db")

    assert (replica.db_dir("my.db") / "database").read_bytes() == before
    assert not (replica.db_dir("new.db")).exists()
    assert position(replica, "my.db") == position(primary, "my.db")


def test_primary_file_names_the_primary_on_replicas_only(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    primary, replica = pair
    assert (replica.mount_dir / ".primary").read_text() == "primary\n"
    assert not (primary.mount_dir / ".primary").exists()
    assert ".primary" in os.listdir(replica.mount_dir)


def test_stopped_replica_catches_up_from_ltx_files(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    primary, replica = pair
    primary.sqlite("my.db", "CREATE TABLE t (x);")
    assert_identical(primary, replica, "my.db")
    assert replica.stop() == 0

    conn = sqlite3.connect(primary.mount_dir / "my.db", isolation_level=None)
    for i in range(1000):
        conn.execute("INSERT INTO t VALUES (?)", (i,))
    conn.close()

    replica.start()
    assert_identical(primary, replica, "my.db")
    assert position(replica, "my.db").startswith(f"{1001:016x}/")
    assert "a snapshot" not in primary.log()


def test_replica_behind_retention_gets_a_snapshot(start_node: StartNode) -> None:
    primary = start_node(
        "primary", settings={"data": {"retention": "1s", "retention-monitor-interval": "100ms"}}
    )
    replica = start_node("replica", candidate=False, primary=primary)
    primary.sqlite("my.db", "CREATE TABLE t (x);")
    assert_identical(primary, replica, "my.db")
    assert replica.stop() == 0
    for i in range(5):
        primary.sqlite("my.db", f"INSERT INTO t VALUES ({i});")
    wait_for(lambda: len(primary.ltx_files("my.db")) == 1, timeout=15)

    replica.start()
    assert_identical(primary, replica, "my.db")
    assert "sending my.db a snapshot" in primary.log()
    assert replica.sqlite("my.db", "SELECT count(*) FROM t;").stdout.strip() == "5"


def test_diverged_replica_is_reseeded(start_node: StartNode, tmp_path: Path) -> None:
    primary = start_node("primary")
    replica = start_node("replica", candidate=False, primary=primary)
    primary.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES ('shared');")
    assert_identical(primary, replica, "my.db")
    assert replica.stop() == 0

    # The replica's data directory, run as a primary of its own, commits a
    # transaction the real primary never sees: same TXID, other checksum.
    rogue = NodeProcess(tmp_path, "replica")
    rogue.start()
    rogue.sqlite("my.db", "INSERT INTO t VALUES ('rogue');")
    assert rogue.stop() == 0
    primary.sqlite("my.db", "INSERT INTO t VALUES ('real');")
    assert position(primary, "my.db").split("/")[0] == f"{3:016x}"

    replica = NodeProcess(tmp_path, "replica", candidate=False, primary=primary)
    replica.start()
    try:
        assert_identical(primary, replica, "my.db")
        rows = replica.sqlite("my.db", "SELECT x FROM t ORDER BY rowid;").stdout.split()
        assert rows == ["shared", "real"]
        assert (
            "the local transaction 3 differs from the primary's and is discarded" in replica.log()
        )
    finally:
        replica.cleanup()


def test_replica_ahead_of_the_primary_is_reseeded(start_node: StartNode, tmp_path: Path) -> None:
    primary = start_node("primary")
    replica = start_node("replica", candidate=False, primary=primary)
    primary.sqlite("my.db", "CREATE TABLE t (x);")
    assert_identical(primary, replica, "my.db")
    assert replica.stop() == 0
    rogue = NodeProcess(tmp_path, "replica")
    rogue.start()
    for i in range(3):
        rogue.sqlite("my.db", f"INSERT INTO t VALUES ({i});")
    assert rogue.stop() == 0

    replica = NodeProcess(tmp_path, "replica", candidate=False, primary=primary)
    replica.start()
    try:
        assert_identical(primary, replica, "my.db")
        assert replica.sqlite("my.db", "SELECT count(*) FROM t;").stdout.strip() == "0"
        assert "3 local transactions after TXID 1 are discarded" in replica.log()
    finally:
        replica.cleanup()


def test_several_databases_replicate_and_deletions_follow(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    primary, replica = pair
    (primary.mount_dir / "sub").mkdir()
    for name in ("a.db", "b.db", "sub/c.db"):
        primary.sqlite(name, f"CREATE TABLE t (x); INSERT INTO t VALUES ('{name}');")
    for name in ("a.db", "b.db", "sub/c.db"):
        assert_identical(primary, replica, name)
        assert replica.sqlite(name, "SELECT x FROM t;").stdout.strip() == name

    os.unlink(primary.mount_dir / "b.db")
    wait_for(lambda: not (replica.mount_dir / "b.db").exists(), timeout=CATCH_UP_TIMEOUT)
    assert not replica.db_dir("b.db").exists()
    assert sorted(os.listdir(replica.mount_dir)) == [".primary", "a.db", "sub"]


@pytest.mark.parametrize(("journal_mode", "readers"), [("DELETE", 1), ("WAL", 3)])
def test_readers_on_the_replica_never_see_a_partial_transaction(
    pair: tuple[NodeProcess, NodeProcess], journal_mode: str, readers: int
) -> None:
    primary, replica = pair
    accounts = 20
    primary.sqlite(
        "bank.db",
        f"PRAGMA journal_mode={journal_mode};"
        "CREATE TABLE account (id INTEGER PRIMARY KEY, balance INTEGER);"
        + "".join(f"INSERT INTO account VALUES ({i}, 100);" for i in range(accounts)),
    )
    assert_identical(primary, replica, "bank.db")
    stop = threading.Event()
    sums: list[int] = []
    failures: list[BaseException] = []

    def read() -> None:
        try:
            conn = sqlite3.connect(replica.mount_dir / "bank.db", timeout=30, isolation_level=None)
            while not stop.is_set():
                sums.append(conn.execute("SELECT sum(balance) FROM account").fetchone()[0])
            conn.close()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=read) for _ in range(readers)]
    for thread in threads:
        thread.start()
    try:
        conn = sqlite3.connect(primary.mount_dir / "bank.db", isolation_level=None)
        for i in range(1000):
            a, b = i % accounts, (i * 7 + 3) % accounts
            conn.execute("BEGIN")
            conn.execute("UPDATE account SET balance = balance - 5 WHERE id = ?", (a,))
            conn.execute("UPDATE account SET balance = balance + 5 WHERE id = ?", (b,))
            conn.execute("COMMIT")
        conn.close()
        wait_caught_up(primary, replica, "bank.db")
        assert replica.committed_checksum("bank.db") == int(
            position(primary, "bank.db").split("/")[1], 16
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not failures
    assert len(sums) > 100
    assert set(sums) == {100 * accounts}


@pytest.mark.parametrize("page_size", [1024, 4096, 16384])
def test_what_the_kernel_caches_on_a_replica_matches_its_disk_across_applies(
    pair: tuple[NodeProcess, NodeProcess], page_size: int
) -> None:
    """Small transactions reach the kernel's cache as pages stored into it;
    larger ones, and those that shrink the file, have it drop everything.
    Whichever, the file read through the mount is the file on disk."""
    primary, replica = pair
    primary.sqlite(
        "my.db",
        f"PRAGMA page_size={page_size}; CREATE TABLE t (id INTEGER PRIMARY KEY, v);"
        "INSERT INTO t SELECT value, randomblob(900) FROM generate_series(1, 300);",
    )
    wait_caught_up(primary, replica, "my.db")
    reader = sqlite3.connect(replica.mount_dir / "my.db")
    try:
        statements = [
            "UPDATE t SET v = 'small' WHERE id = 7;",
            "INSERT INTO t (v) VALUES (randomblob(5000));",
            "UPDATE t SET v = randomblob(1200);",  # more pages than are handed over
            "DELETE FROM t WHERE id > 20; VACUUM;",  # the file shrinks
            "UPDATE t SET v = 'last' WHERE id = 3;",
        ]
        for statement in statements:
            before = reader.execute("SELECT count(*), sum(length(v)) FROM t").fetchone()
            (replica.mount_dir / "my.db").read_bytes()  # every page cached
            primary.sqlite("my.db", statement)
            assert_identical(primary, replica, "my.db")
            after = reader.execute("SELECT count(*), sum(length(v)) FROM t").fetchone()
            expected = primary.sqlite("my.db", "SELECT count(*), sum(length(v)) FROM t;")
            assert "|".join(map(str, after)) == expected.stdout.strip(), statement
            assert after != before, statement
            on_disk = (replica.db_dir("my.db") / "database").read_bytes()
            through_mount = (replica.mount_dir / "my.db").read_bytes()
            assert through_mount[: len(on_disk)] == on_disk, statement
        assert reader.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        reader.close()


def test_replication_lag_is_milliseconds(pair: tuple[NodeProcess, NodeProcess]) -> None:
    primary, replica = pair
    primary.sqlite("my.db", "CREATE TABLE t (x);")
    assert_identical(primary, replica, "my.db")
    conn = sqlite3.connect(primary.mount_dir / "my.db", isolation_level=None)
    for i in range(20):
        conn.execute("INSERT INTO t VALUES (?)", (i,))
        wait_for(lambda i=i: position(replica, "my.db") == position(primary, "my.db"), 5)
    conn.close()


def test_large_snapshot_streams_to_a_new_replica(start_node: StartNode) -> None:
    primary = start_node("primary")
    primary.sqlite(
        "big.db",
        "CREATE TABLE t (x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n "
        "WHERE i < 100000) INSERT INTO t SELECT randomblob(1000) FROM n;",
    )
    replica = start_node("replica", candidate=False, primary=primary)
    assert_identical(primary, replica, "big.db")
    assert replica.sqlite("big.db", "SELECT count(*) FROM t;").stdout.strip() == "100000"
