"""Replication: lag, snapshot throughput, replica reads, and daemon memory.

A primary and a replica run as real daemons on this machine. Lag is measured
from the moment a commit returns on the primary to the moment a SQLite reader
on the replica first sees its row, with both clocks in this one process.
It is measured twice: with the database in DELETE journal mode and in WAL
mode. The WAL measurement runs on a primary and replica of their own, so a
mount that cannot do WAL yet costs only its rows: a failure there is reported
as an infinite lag (MISSED) with a note on stderr instead of ending the suite.
"""

from __future__ import annotations

import math
import random
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.primary import (
    _peak_rss_mb,
    best_time,
    note_failure,
    point_selects,
    running,
    set_journal_mode,
)
from localcluster import LocalNode

Row = tuple[Any, ...]

LAG_TRANSACTIONS = 1000
LAG_RATE = 200.0
SNAPSHOT_ROWS = 1_000_000  # of 1,000 bytes: a database of about 1 GB


def _position(node: LocalNode, db: str) -> str:
    try:
        return (node.mount_dir / f"{db}-pos").read_text()
    except OSError:
        return ""


def wait_caught_up(primary: LocalNode, replica: LocalNode, db: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while _position(replica, db) != _position(primary, db) or not _position(primary, db):
        if time.monotonic() > deadline:
            raise RuntimeError(f"replica did not catch up on {db}")
        time.sleep(0.005)


def replication_lag(
    primary: LocalNode, replica: LocalNode, db: str = "lag.db", journal_mode: str = "DELETE"
) -> list[float]:
    """Milliseconds from commit to visibility, one figure per transaction.

    The primary's database is put in `journal_mode` before its table is made.
    An error of the replica's reader is raised here once the writer is done.
    """
    writer = sqlite3.connect(primary.mount_dir / db, isolation_level=None)
    try:
        set_journal_mode(writer, journal_mode)
        writer.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        wait_caught_up(primary, replica, db)
        committed: dict[int, float] = {}
        seen: dict[int, float] = {}
        failed: list[Exception] = []
        done = threading.Event()

        def read() -> None:
            try:
                reader = sqlite3.connect(replica.mount_dir / db, timeout=30, isolation_level=None)
                try:
                    last = 0
                    while last < LAG_TRANSACTIONS and not done.is_set():
                        newest = reader.execute("SELECT max(id) FROM t").fetchone()[0] or 0
                        if newest > last:
                            now = time.perf_counter()
                            for i in range(last + 1, newest + 1):
                                seen[i] = now
                            last = newest
                finally:
                    reader.close()
            except Exception as error:
                failed.append(error)

        thread = threading.Thread(target=read)
        thread.start()
        interval = 1 / LAG_RATE
        start = time.perf_counter()
        try:
            for i in range(1, LAG_TRANSACTIONS + 1):
                time.sleep(max(0.0, start + i * interval - time.perf_counter()))
                writer.execute("INSERT INTO t (id, v) VALUES (?, ?)", (i, b"x" * 100))
                committed[i] = time.perf_counter()
            thread.join(30)
        finally:
            done.set()
            thread.join()
    finally:
        writer.close()
    if failed:
        raise failed[0]
    if not seen:
        raise RuntimeError(f"the replica never saw a row of {db}")
    return [max(0.0, seen[i] - committed[i]) * 1000 for i in committed if i in seen]


def lag_rows(label: str, lags: list[float] | None) -> list[Row]:
    """p50 and p99 against their targets; no figures (a failure) miss both."""
    p50 = statistics.median(lags) if lags else math.inf
    p99 = percentile(lags, 0.99) if lags else math.inf
    return [
        (f"{label}: p50", p50, "ms", 1.5, "max"),
        (f"{label}: p99", p99, "ms", 4.0, "max"),
    ]


def wal_replication_lag(root: Path) -> list[float] | None:
    """Lag for a WAL database on a fresh primary and replica; None if it fails."""
    with (
        running(LocalNode(root, "wal-primary")) as primary,
        running(LocalNode(root, "wal-replica", candidate=False, primary=primary)) as replica,
    ):
        try:
            return replication_lag(primary, replica, "lag-wal.db", "WAL")
        except (sqlite3.Error, RuntimeError) as error:
            note_failure(__name__, "WAL lag", error)
            return None


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def write_big_database(primary: LocalNode) -> int:
    conn = sqlite3.connect(primary.mount_dir / "big.db", isolation_level=None)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    blob = random.randbytes(1000)
    per = 50_000
    for _ in range(SNAPSHOT_ROWS // per):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t (v) VALUES (?)", ((blob,) for _ in range(per)))
        conn.execute("COMMIT")
    conn.close()
    return (primary.db_dir("big.db") / "database").stat().st_size


def run() -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="litefs-bench-") as tmp:
        root = Path(tmp)
        primary = LocalNode(root, "primary")
        replica = LocalNode(root, "replica", candidate=False, primary=primary)
        primary.start()
        replica.start()
        try:
            rows += lag_rows("lag at 200 tx/s", replication_lag(primary, replica))
            rows += lag_rows("WAL lag at 200 tx/s", wal_replication_lag(root))

            plain = root / "plain"
            plain.mkdir()
            point_selects(plain, 0)
            conn = sqlite3.connect(primary.mount_dir / "c.db", isolation_level=None)
            source = sqlite3.connect(plain / "c.db")
            source.backup(conn)
            source.close()
            conn.close()
            wait_caught_up(primary, replica, "c.db")
            plain_time = best_time(point_selects, plain)
            replica_time = best_time(point_selects, replica.mount_dir)
            rows.append(("replica 50k point selects: plain", plain_time * 1000, "ms"))
            rows.append(("replica 50k point selects: mount", replica_time * 1000, "ms"))
            rows.append(("replica point selects: ratio", plain_time / replica_time, "x plain", 0.9))

            size = write_big_database(primary)
            late = LocalNode(root, "late", candidate=False, primary=primary)
            started = time.perf_counter()
            late.start()
            try:
                wait_caught_up(primary, late, "big.db")
                elapsed = time.perf_counter() - started
                rows.append(("snapshot of 1 GB database", size / elapsed / 1e6, "MB/s", 100.0))
                rows.append(("new replica peak RSS", _peak_rss_mb(late.pid), "MB", 100.0, "max"))
            finally:
                late.cleanup()
            rows.append(("primary peak RSS", _peak_rss_mb(primary.pid), "MB", 100.0, "max"))
            rows.append(("replica peak RSS", _peak_rss_mb(replica.pid), "MB", 100.0, "max"))
        finally:
            replica.cleanup()
            primary.cleanup()
    return rows
