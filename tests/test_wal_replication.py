"""WAL databases on replicas: applied transactions reach readers that keep
their connections open in WAL mode, whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest
from node_process import NodeProcess
from test_replication import position, wait_caught_up
from test_wal import checkpoint, committed_copy, connect

from litefs import ltx

pytestmark = pytest.mark.fuse


def replica_checksum_matches(replica: NodeProcess, db: str, scratch: Path) -> None:
    _txid, checksum = position(replica, db).split("/")
    assert ltx.database_checksum(committed_copy(replica, db, scratch)) == int(checksum, 16)


def test_wal_transactions_reach_open_replica_connections(
    pair: tuple[NodeProcess, NodeProcess], tmp_path: Path
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
        replica_checksum_matches(replica, "my.db", tmp_path)
        for reader in readers:
            assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == i + 1
    for reader in readers:
        reader.close()
    writer.close()
    checkpoint(primary)
    assert (
        committed_copy(replica, "my.db", tmp_path).read_bytes()
        == (primary.db_dir("my.db") / "database").read_bytes()
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
    pair: tuple[NodeProcess, NodeProcess], tmp_path: Path
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
    replica_checksum_matches(replica, "my.db", tmp_path)
