"""Crash safety: a daemon killed at any step of a commit restarts consistent.

After every crash the restarted node must have a database that passes
`PRAGMA integrity_check`, whose checksum equals its position, and whose LTX
files rebuild it byte for byte.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from conftest import StartNode
from node_process import NodeProcess
from test_primary import assert_history_rebuilds, position_of

from litefs.capture import COMMIT_STEPS, CRASH_POINT_ENV, CRASH_STATUS

pytestmark = pytest.mark.fuse

# A complete LTX file decides: once it is written the transaction survives a crash.
ROLLED_BACK = {"before-ltx", "mid-ltx"}


def insert_until(
    path: Path,
    first_id: int,
    blob_size: int,
    stop: threading.Event,
    done: list[int],
    synchronous: str | None = None,
) -> None:
    """Autocommit rows `first_id`, `first_id + 1`, ... until `stop` is set or
    the daemon dies under the writer; `done` gets every acknowledged id."""
    i = first_id
    try:
        conn = sqlite3.connect(path, timeout=5, isolation_level=None)
        if synchronous is not None:
            conn.execute(f"PRAGMA synchronous={synchronous}")
        while not stop.is_set():
            conn.execute("INSERT INTO t VALUES (?, randomblob(?))", (i, blob_size))
            done.append(i)
            i += 1
    except sqlite3.Error:
        pass


def assert_consistent(node: NodeProcess, db: str, tmp_path: Path) -> None:
    result = node.sqlite(db, "PRAGMA integrity_check;")
    assert result.stdout.strip() == "ok"
    assert_history_rebuilds(node, db, tmp_path)


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_crash_at_each_commit_step(start_node: StartNode, tmp_path: Path, step: str) -> None:
    node = start_node("primary")
    node.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES (1);")
    assert node.stop() == 0

    node.start(env={CRASH_POINT_ENV: step})
    result = node.sqlite(
        "my.db",
        "INSERT INTO t SELECT randomblob(3000) FROM (WITH RECURSIVE n(i) AS "
        "(SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 50) SELECT i FROM n);",
        check=False,
    )
    assert node.wait_exit() == CRASH_STATUS
    assert result.returncode != 0 or step == "after-journal-removal"

    node.start()
    assert "clearing a stale mount" in node.log()
    count = int(node.sqlite("my.db", "SELECT count(*) FROM t;").stdout)
    if step in ROLLED_BACK:
        assert (count, position_of(node, "my.db")[0]) == (1, 2)
    else:
        assert (count, position_of(node, "my.db")[0]) == (51, 3)
    assert_consistent(node, "my.db", tmp_path)
    node.sqlite("my.db", "INSERT INTO t VALUES (2);")
    assert_consistent(node, "my.db", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("journal_mode", ["DELETE", "WAL"])
def test_repeated_kill_9_under_write_load(
    start_node: StartNode, tmp_path: Path, journal_mode: str
) -> None:
    """Every acknowledged transaction survives, recorded exactly once; the
    one in flight may or may not."""
    node = start_node("primary")
    node.sqlite(
        "my.db", f"PRAGMA journal_mode={journal_mode}; CREATE TABLE t (i INTEGER PRIMARY KEY, x);"
    )
    base = position_of(node, "my.db")[0]
    count = 0
    rng = random.Random(7)
    for round_number in range(5):
        stop = threading.Event()
        done: list[int] = []
        first_id = 1_000_000 * (round_number + 1)
        writer = threading.Thread(
            target=insert_until,
            args=(node.mount_dir / "my.db", first_id, 200, stop, done),
            kwargs={"synchronous": "NORMAL"},
        )
        writer.start()
        time.sleep(rng.uniform(0.3, 1.0))
        node.kill()
        stop.set()
        writer.join(30)

        node.start()
        before, count = count, int(node.sqlite("my.db", "SELECT count(*) FROM t;").stdout)
        assert done, "the writer committed nothing before the kill"
        assert before + len(done) <= count <= before + len(done) + 1, node.log()[-3000:]
        assert position_of(node, "my.db")[0] == base + count
    node.sqlite("my.db", "PRAGMA wal_checkpoint(TRUNCATE);")
    assert_consistent(node, "my.db", tmp_path)


def test_lost_newest_ltx_file_is_replaced_by_a_snapshot(
    start_node: StartNode, tmp_path: Path
) -> None:
    node = start_node("primary")
    node.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES (1); INSERT INTO t VALUES (2);")
    before = position_of(node, "my.db")
    assert node.stop() == 0
    node.ltx_files("my.db")[-1].unlink()  # as a power cut could, before the entry was durable

    node.start()
    assert "recording them as a snapshot at TXID 3" in node.log()
    assert position_of(node, "my.db") == before
    assert node.ltx_files("my.db")[-1].name == "0000000000000001-0000000000000003.ltx"
    assert node.sqlite("my.db", "SELECT count(*) FROM t;").stdout.strip() == "2"
    assert_consistent(node, "my.db", tmp_path)


def test_torn_newest_ltx_file_is_replaced_by_a_snapshot(
    start_node: StartNode, tmp_path: Path
) -> None:
    """Rollback-journal LTX files are left to the filesystem to sync: a
    power cut can tear the newest one after SQLite made its transaction
    durable."""
    node = start_node("primary")
    node.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES (1); INSERT INTO t VALUES (2);")
    before = position_of(node, "my.db")
    assert node.stop() == 0
    newest = node.ltx_files("my.db")[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    node.start()
    assert "removing incomplete LTX file" in node.log()
    assert position_of(node, "my.db") == before
    assert node.sqlite("my.db", "SELECT count(*) FROM t;").stdout.strip() == "2"
    assert_consistent(node, "my.db", tmp_path)


WAL_STEPS = ("before-ltx", "mid-ltx", "before-ltx-sync")


@pytest.mark.parametrize("step", WAL_STEPS)
def test_crash_between_wal_commit_and_ltx_sync(
    start_node: StartNode, tmp_path: Path, step: str
) -> None:
    """The commit frame reached the WAL before the daemon died: SQLite's
    recovery will keep the transaction, so the restarted node records it,
    exactly once."""
    node = start_node("primary")
    node.sqlite("my.db", "PRAGMA journal_mode=WAL; CREATE TABLE t (x); INSERT INTO t VALUES (1);")
    txid = position_of(node, "my.db")[0]
    assert node.stop() == 0

    node.start(env={CRASH_POINT_ENV: step})
    node.sqlite(
        "my.db",
        "PRAGMA wal_autocheckpoint=0; INSERT INTO t SELECT randomblob(3000) FROM "
        "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 50) "
        "SELECT i FROM n);",
        check=False,
    )
    assert node.wait_exit() == CRASH_STATUS

    node.start()
    assert (
        int(node.sqlite("my.db", "SELECT count(*) FROM t;").stdout),
        position_of(node, "my.db")[0],
    ) == (51, txid + 1)
    node.sqlite("my.db", "INSERT INTO t VALUES (2);")
    assert position_of(node, "my.db")[0] == txid + 2
    node.sqlite("my.db", "PRAGMA wal_checkpoint(TRUNCATE);")
    assert_consistent(node, "my.db", tmp_path)
