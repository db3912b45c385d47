"""WAL databases on replicas: applied transactions reach readers that keep
their connections open in WAL mode, whole or not at all."""

from __future__ import annotations

import contextlib
import random
import sqlite3
import threading
import time

import pytest
from node_process import NodeProcess
from test_crash import insert_until
from test_replication import position, wait_caught_up
from test_wal import checkpoint, connect

pytestmark = pytest.mark.fuse


def replica_checksum_matches(replica: NodeProcess, db: str) -> None:
    _txid, checksum = position(replica, db).split("/")
    assert replica.committed_checksum(db) == int(checksum, 16)


def test_wal_transactions_reach_open_replica_connections(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    primary, replica = pair
    writer = connect(primary, journal_mode="WAL", synchronous="NORMAL")
    writer.execute("CREATE TABLE t (x)")
    writer.execute("INSERT INTO t VALUES (0)")
    wait_caught_up(primary, replica, "my.db")
    readers = [connect(replica) for _ in range(3)]
    for reader in readers:
        assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    for i in range(1, 30):
        writer.execute("INSERT INTO t VALUES (?)", (i,))
        wait_caught_up(primary, replica, "my.db")
        replica_checksum_matches(replica, "my.db")
        for reader in readers:
            assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == i + 1
    for reader in readers:
        reader.close()
    writer.close()
    checkpoint(primary)
    assert (
        replica.committed_database("my.db") == (primary.db_dir("my.db") / "database").read_bytes()
    )


def test_replica_reader_keeps_its_snapshot_while_replication_goes_on(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    primary, replica = pair
    writer = connect(primary, journal_mode="WAL")
    writer.execute("CREATE TABLE t (x)")
    writer.execute("INSERT INTO t VALUES (0)")
    wait_caught_up(primary, replica, "my.db")
    reader = connect(replica)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    writer.execute("INSERT INTO t VALUES (1)")
    wait_caught_up(primary, replica, "my.db")  # the read transaction holds nothing up
    assert connect(replica).execute("SELECT count(*) FROM t").fetchone()[0] == 2
    assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    reader.execute("COMMIT")
    assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 2
    reader.close()
    writer.close()


def test_switching_to_wal_and_back_replicates(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    primary, replica = pair
    primary.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES (1);")
    wait_caught_up(primary, replica, "my.db")
    held = connect(replica)  # a connection open across both switches
    assert held.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    primary.sqlite("my.db", "PRAGMA journal_mode=WAL; INSERT INTO t VALUES (2);")
    wait_caught_up(primary, replica, "my.db")
    assert (replica.db_dir("my.db") / "database").read_bytes()[18:20] == b"\x02\x02"
    assert held.execute("SELECT count(*) FROM t").fetchone()[0] == 2
    assert replica.sqlite("my.db", "SELECT count(*) FROM t;").stdout.strip() == "2"
    primary.sqlite("my.db", "PRAGMA journal_mode=DELETE; INSERT INTO t VALUES (3);")
    wait_caught_up(primary, replica, "my.db")
    assert (replica.db_dir("my.db") / "database").read_bytes()[18:20] == b"\x01\x01"
    assert held.execute("SELECT count(*) FROM t").fetchone()[0] == 3
    held.close()
    assert replica.sqlite("my.db", "SELECT count(*) FROM t;").stdout.strip() == "3"
    replica_checksum_matches(replica, "my.db")


def test_replica_killed_while_appending_to_its_wal_comes_back_identical(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    """An open reader keeps the replica's wal-index alive, so transactions
    are appended to its log; killed -9 in the middle, the replica finishes
    the interrupted apply and follows the primary again."""
    primary, replica = pair
    writer = connect(primary, journal_mode="WAL")
    writer.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, x)")
    writer.close()
    wait_caught_up(primary, replica, "my.db")
    rng = random.Random(5)
    for round_number in range(3):
        reader = connect(replica)
        reader.execute("SELECT count(*) FROM t").fetchone()
        stop = threading.Event()
        done: list[int] = []
        thread = threading.Thread(
            target=insert_until,
            args=(primary.mount_dir / "my.db", 1_000_000 * (round_number + 1), 300, stop, done),
        )
        thread.start()
        time.sleep(rng.uniform(0.2, 0.5))
        replica.kill()
        stop.set()
        thread.join(30)
        with contextlib.suppress(sqlite3.Error):
            reader.close()
        replica.start()
        assert done
        wait_caught_up(primary, replica, "my.db")
        assert replica.sqlite("my.db", "PRAGMA integrity_check;").stdout.strip() == "ok"
        replica_checksum_matches(replica, "my.db")
    assert replica.committed_database("my.db") == primary.committed_database("my.db")
