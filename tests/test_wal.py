"""WAL mode on the primary: every transaction SQLite commits to the WAL
becomes one LTX file, checkpoints change nothing, and the history rebuilds
the database byte for byte."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from conftest import StartNode, litefs_cli
from node_process import NodeProcess
from test_primary import position_of

from litefs import ltx

pytestmark = pytest.mark.fuse


def connect(node: NodeProcess, db: str = "my.db", **pragmas: object) -> sqlite3.Connection:
    conn = sqlite3.connect(node.mount_dir / db, isolation_level=None, timeout=30)
    for name, value in pragmas.items():
        conn.execute(f"PRAGMA {name}={value}")
    return conn


def checkpoint(node: NodeProcess, db: str = "my.db") -> None:
    conn = connect(node, db)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
    finally:
        conn.close()


def assert_history_rebuilds_checkpointed(node: NodeProcess, db: str, tmp_path: Path) -> None:
    """After a full checkpoint the database file is the committed state; the
    LTX files rebuild it exactly and the position's checksum is its checksum."""
    checkpoint(node, db)
    files = [str(p) for p in node.ltx_files(db)]
    litefs_cli("ltx", "verify", *files)
    rebuilt = tmp_path / f"rebuilt-{db.replace('/', '_')}"
    rebuilt.unlink(missing_ok=True)
    litefs_cli("ltx", "apply", "-db", str(rebuilt), *files)
    assert rebuilt.read_bytes() == (node.db_dir(db) / "database").read_bytes()
    assert position_of(node, db)[1] == ltx.database_checksum(node.db_dir(db) / "database")


def test_each_wal_commit_writes_one_ltx_file(primary: NodeProcess, tmp_path: Path) -> None:
    conn = connect(primary, journal_mode="WAL", wal_autocheckpoint=0)
    conn.execute("CREATE TABLE t (x)")
    before = position_of(primary, "my.db")[0]
    for i in range(5):
        conn.execute("INSERT INTO t VALUES (?)", (i,))
    assert position_of(primary, "my.db")[0] == before + 5
    assert (primary.db_dir("my.db") / "wal").stat().st_size > 0
    conn.close()
    assert_history_rebuilds_checkpointed(primary, "my.db", tmp_path)


@pytest.mark.parametrize("synchronous", ["OFF", "NORMAL", "FULL"])
def test_commit_is_captured_whatever_the_sync_setting(
    primary: NodeProcess, tmp_path: Path, synchronous: str
) -> None:
    conn = connect(primary, journal_mode="WAL", synchronous=synchronous)
    conn.execute("CREATE TABLE t (x)")
    txid = position_of(primary, "my.db")[0]
    conn.execute("INSERT INTO t VALUES (1)")
    assert position_of(primary, "my.db")[0] == txid + 1
    conn.close()
    assert_history_rebuilds_checkpointed(primary, "my.db", tmp_path)


@pytest.mark.parametrize("page_size", [512, 4096, 65536])
def test_wal_at_every_page_size(primary: NodeProcess, tmp_path: Path, page_size: int) -> None:
    conn = connect(primary, page_size=page_size, journal_mode="WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [(b"x" * 700,)] * 50)
    conn.execute("DELETE FROM t WHERE rowid % 2")
    conn.close()
    assert_history_rebuilds_checkpointed(primary, "my.db", tmp_path)


def test_rolled_back_wal_transaction_writes_nothing(primary: NodeProcess, tmp_path: Path) -> None:
    conn = connect(primary, journal_mode="WAL", cache_size=5)
    conn.execute("CREATE TABLE t (x)")
    txid = position_of(primary, "my.db")[0]
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t VALUES (?)", [(b"y" * 3000,)] * 200)  # spills to the WAL
    conn.execute("ROLLBACK")
    assert position_of(primary, "my.db")[0] == txid
    conn.execute("INSERT INTO t VALUES (1)")
    assert position_of(primary, "my.db")[0] == txid + 1
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    conn.close()
    assert_history_rebuilds_checkpointed(primary, "my.db", tmp_path)


def test_large_transaction_that_spills_and_rewrites_frames(
    primary: NodeProcess, tmp_path: Path
) -> None:
    conn = connect(primary, journal_mode="WAL", cache_size=10)
    conn.execute("CREATE TABLE t (x)")
    txid = position_of(primary, "my.db")[0]
    conn.execute("BEGIN")
    for round_ in range(3):
        conn.executemany("INSERT INTO t VALUES (?)", [(bytes([round_]) * 2000,)] * 300)
        conn.execute("UPDATE t SET x = randomblob(2000) WHERE rowid % 7 = ?", (round_,))
    conn.execute("COMMIT")
    assert position_of(primary, "my.db")[0] == txid + 1
    conn.close()
    assert_history_rebuilds_checkpointed(primary, "my.db", tmp_path)


@pytest.mark.parametrize("mode", ["PASSIVE", "FULL", "RESTART", "TRUNCATE"])
def test_checkpoints_write_no_ltx_file(primary: NodeProcess, tmp_path: Path, mode: str) -> None:
    conn = connect(primary, journal_mode="WAL", wal_autocheckpoint=0)
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(100)])
    position = position_of(primary, "my.db")
    conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    assert position_of(primary, "my.db") == position
    conn.execute("INSERT INTO t VALUES (-1)")  # restarts the WAL after a complete checkpoint
    conn.execute("INSERT INTO t VALUES (-2)")
    assert position_of(primary, "my.db")[0] == position[0] + 2
    conn.close()
    assert_history_rebuilds_checkpointed(primary, "my.db", tmp_path)


def test_automatic_checkpoints_and_restarts(primary: NodeProcess, tmp_path: Path) -> None:
    conn = connect(primary, journal_mode="WAL", wal_autocheckpoint=10)
    conn.execute("CREATE TABLE t (x)")
    txid = position_of(primary, "my.db")[0]
    for i in range(300):
        conn.execute("INSERT INTO t VALUES (?)", (b"z" * 500 + str(i).encode(),))
    assert position_of(primary, "my.db")[0] == txid + 300
    conn.close()
    assert_history_rebuilds_checkpointed(primary, "my.db", tmp_path)


def test_switching_to_wal_and_back(primary: NodeProcess, tmp_path: Path) -> None:
    primary.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES (1);")
    assert primary.sqlite("my.db", "PRAGMA journal_mode=WAL;").stdout.strip() == "wal"
    header = (primary.db_dir("my.db") / "database").read_bytes()[:20]
    assert header[18:20] == b"\x02\x02"
    primary.sqlite("my.db", "INSERT INTO t VALUES (2);")
    assert primary.sqlite("my.db", "PRAGMA journal_mode=DELETE;").stdout.strip() == "delete"
    header = (primary.db_dir("my.db") / "database").read_bytes()[:20]
    assert header[18:20] == b"\x01\x01"
    primary.sqlite("my.db", "INSERT INTO t VALUES (3);")
    assert primary.sqlite("my.db", "SELECT group_concat(x) FROM t;").stdout.strip() == "1,2,3"
    assert_history_rebuilds_checkpointed(primary, "my.db", tmp_path)


def test_new_database_created_in_wal_mode(primary: NodeProcess, tmp_path: Path) -> None:
    primary.sqlite(
        "new.db", "PRAGMA journal_mode=WAL; CREATE TABLE t (x); INSERT INTO t VALUES (1);"
    )
    assert primary.ltx_files("new.db")[0].name.startswith("0000000000000001-")
    assert_history_rebuilds_checkpointed(primary, "new.db", tmp_path)


def test_readers_keep_their_snapshot_while_a_writer_commits(primary: NodeProcess) -> None:
    writer = connect(primary, journal_mode="WAL")
    writer.execute("CREATE TABLE t (x)")
    writer.execute("INSERT INTO t VALUES (1)")
    readers = [connect(primary) for _ in range(4)]
    for reader in readers:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    for i in range(20):
        writer.execute("INSERT INTO t VALUES (?)", (i,))
    for reader in readers:
        assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 1
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 21
        reader.close()
    writer.close()


def test_concurrent_writers_and_readers(primary: NodeProcess, tmp_path: Path) -> None:
    setup = connect(primary, journal_mode="WAL")
    setup.execute("CREATE TABLE t (writer, n)")
    setup.close()
    errors: list[BaseException] = []
    stop = time.monotonic() + 3

    def write(number: int) -> None:
        try:
            conn = connect(primary, busy_timeout=10000)
            for n in range(100):
                conn.execute("INSERT INTO t VALUES (?, ?)", (number, n))
            conn.close()
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        try:
            conn = connect(primary)
            while time.monotonic() < stop:
                conn.execute("SELECT count(*), sum(n) FROM t").fetchone()
            conn.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert primary.sqlite("my.db", "SELECT count(*) FROM t;").stdout.strip() == "300"
    assert_history_rebuilds_checkpointed(primary, "my.db", tmp_path)


def test_restart_with_uncheckpointed_wal(start_node: StartNode, tmp_path: Path) -> None:
    node = start_node("primary")
    conn = connect(node, journal_mode="WAL", wal_autocheckpoint=0)
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(10)])
    position = position_of(node, "my.db")
    conn.close()
    node.stop()
    node.start()
    assert position_of(node, "my.db") == position
    assert node.sqlite("my.db", "SELECT count(*) FROM t;").stdout.strip() == "10"
    node.sqlite("my.db", "INSERT INTO t VALUES (10);")
    assert position_of(node, "my.db")[0] == position[0] + 1
    assert_history_rebuilds_checkpointed(node, "my.db", tmp_path)


def test_exclusive_locking_mode_keeps_the_wal_index_in_memory(
    primary: NodeProcess, tmp_path: Path
) -> None:
    result = primary.sqlite(
        "my.db",
        "PRAGMA locking_mode=EXCLUSIVE; PRAGMA journal_mode=WAL; CREATE TABLE t (x);"
        "INSERT INTO t VALUES (1); INSERT INTO t VALUES (2); SELECT count(*) FROM t;",
    )
    assert result.stdout.split() == ["exclusive", "wal", "2"]
    assert not (primary.db_dir("my.db") / "shm").exists()
    txid = position_of(primary, "my.db")[0]
    primary.sqlite("my.db", "INSERT INTO t VALUES (3);")
    assert position_of(primary, "my.db")[0] == txid + 1
    assert_history_rebuilds_checkpointed(primary, "my.db", tmp_path)
