"""Crashes again and again: a daemon killed at every step of a commit, round
after round, and killed -9 at random while it commits or applies under load.

After every crash the node comes back by itself, its database passes
`PRAGMA integrity_check`, and its LTX files rebuild it byte for byte. The
suite runs a few rounds; `LITEFS_CRASH_LOOPS=200` runs as many as asked
(for example `LITEFS_CRASH_LOOPS=200 .venv/bin/python -m pytest -q
tests/test_crash_loop.py --timeout 0`).
"""

from __future__ import annotations

import array
import os
import random
import threading
import time
from pathlib import Path

import pytest
from conftest import StartNode
from node_process import NodeProcess
from test_crash import insert_until
from test_primary import assert_history_rebuilds, position_of
from test_replication import wait_caught_up

from litefs import ltx
from litefs.capture import COMMIT_STEPS, CRASH_POINT_ENV, CRASH_STATUS

pytestmark = pytest.mark.fuse

LOOPS_ENV = "LITEFS_CRASH_LOOPS"
STEP_LOOPS = int(os.environ.get(LOOPS_ENV, "2"))
KILL_LOOPS = int(os.environ.get(LOOPS_ENV, "4"))
DB = "crash.db"
ROWS = 50
BIG_INSERT = (
    "PRAGMA wal_autocheckpoint=0; INSERT INTO t SELECT randomblob(3000) FROM "
    f"(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < {ROWS}) "
    "SELECT i FROM n);"
)
STEPS = {
    "DELETE": COMMIT_STEPS,
    "WAL": ("before-ltx", "mid-ltx", "before-ltx-sync"),
}
LOST_IN = {
    "DELETE": {"before-ltx", "mid-ltx"},
    "WAL": set(),  # the commit frame is in the WAL: SQLite's recovery keeps it
}
"""Steps at which the transaction in flight does not survive."""


def rows(node: NodeProcess) -> int:
    return int(node.sqlite(DB, "SELECT count(*) FROM t;").stdout)


def assert_consistent(node: NodeProcess, tmp_path: Path) -> None:
    assert node.sqlite(DB, "PRAGMA integrity_check;").stdout.strip() == "ok"
    node.sqlite(DB, "PRAGMA wal_checkpoint(TRUNCATE);")
    assert_history_rebuilds(node, DB, tmp_path)


def assert_long_history_rebuilds(node: NodeProcess, tmp_path: Path) -> None:
    """As `assert_history_rebuilds`, in this process: a long run leaves more
    LTX files than one command line holds. Each file must continue the
    state the ones before it built (its pre-apply checksum)."""
    rebuilt = tmp_path / f"rebuilt-{node.name}"
    rebuilt.unlink(missing_ok=True)
    fd = os.open(rebuilt, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        checksums: array.array[int] = array.array("Q")
        for path in node.ltx_files(DB):
            with open(path, "rb") as f:
                ltx.apply_file(f, fd, checksums=checksums, sync=False)
    finally:
        os.close(fd)
    assert rebuilt.read_bytes() == (node.db_dir(DB) / "database").read_bytes()
    assert position_of(node, DB)[1] == ltx.checksum_of(checksums)


@pytest.mark.parametrize("journal_mode", ["DELETE", "WAL"])
def test_crash_at_every_commit_step_round_after_round(
    start_node: StartNode, tmp_path: Path, journal_mode: str
) -> None:
    node = start_node("primary")
    node.sqlite(DB, f"PRAGMA journal_mode={journal_mode}; CREATE TABLE t (x);")
    count = 0
    for _ in range(STEP_LOOPS):
        for step in STEPS[journal_mode]:
            assert node.stop() == 0
            txid = position_of_stopped(node)
            node.start(env={CRASH_POINT_ENV: step})
            node.sqlite(DB, BIG_INSERT, check=False)
            assert node.wait_exit() == CRASH_STATUS, step

            node.start()
            kept = step not in LOST_IN[journal_mode]
            assert rows(node) == count + (ROWS if kept else 0), step
            assert position_of(node, DB)[0] == txid + kept, step
            count = rows(node)
            assert_consistent(node, tmp_path)


def position_of_stopped(node: NodeProcess) -> int:
    """The TXID of the newest LTX file, read while the node is down."""
    files = node.ltx_files(DB)
    return int(files[-1].stem.split("-")[1], 16)


def test_kill_9_at_random_while_committing_and_applying(
    start_node: StartNode, tmp_path: Path
) -> None:
    """Each round a writer commits on the primary and the replica applies
    what it receives; then one of them, chosen at random, is killed -9 at a
    random moment and restarted. Every acknowledged commit survives on the
    primary, and the replica ends identical to it."""
    primary = start_node("primary")
    replica = start_node("replica", candidate=False, primary=primary)
    primary.sqlite(DB, "PRAGMA journal_mode=WAL; CREATE TABLE t (i INTEGER PRIMARY KEY, x);")
    rng = random.Random(11)
    acknowledged = 0
    for round_number in range(KILL_LOOPS):
        stop = threading.Event()
        done: list[int] = []
        first = 1_000_000 * (round_number + 1)
        writer = threading.Thread(
            target=insert_until, args=(primary.mount_dir / DB, first, 2000, stop, done)
        )
        writer.start()
        time.sleep(rng.uniform(0.2, 0.8))
        victim = rng.choice([primary, replica])
        victim.kill()
        time.sleep(0.05)
        stop.set()
        writer.join(30)
        victim.start()

        assert done, "the writer committed nothing"
        count = rows(primary)
        acknowledged += len(done)
        assert acknowledged <= count <= acknowledged + 1, primary.log()[-3000:]
        acknowledged = count
        wait_caught_up(primary, replica, DB)
        assert rows(replica) == count
        assert replica.sqlite(DB, "PRAGMA integrity_check;").stdout.strip() == "ok"
    assert primary.sqlite(DB, "PRAGMA integrity_check;").stdout.strip() == "ok"
    primary.sqlite(DB, "PRAGMA wal_checkpoint(TRUNCATE);")
    assert_long_history_rebuilds(primary, tmp_path)
    wait_caught_up(primary, replica, DB)
    assert replica.sqlite(DB, "PRAGMA integrity_check;").stdout.strip() == "ok"
    assert_long_history_rebuilds(replica, tmp_path)
    assert replica.committed_database(DB) == primary.committed_database(DB)
