"""SQLite workloads on a plain directory and through a primary's mount.

Both run in the same process, one after the other, so the ratio (plain time
divided by mount time; 1.0 means no cost) compares like with like on a noisy
machine. Each workload runs three times and the best time counts.
"""

from __future__ import annotations

import random
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from litefs.cluster import LocalNode

REPEATS = 3
Row = tuple[Any, ...]


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def small_inserts(directory: Path, run: int) -> float:
    """(a) 1,000 autocommit INSERTs, journal DELETE, synchronous FULL."""
    conn = _connect(directory / f"a{run}.db")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    start = time.perf_counter()
    for _ in range(1000):
        conn.execute("INSERT INTO t (v) VALUES (?)", (b"x" * 100,))
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def large_transaction(directory: Path, run: int) -> float:
    """(b) one transaction of 200,000 rows of 100 bytes."""
    conn = _connect(directory / f"b{run}.db")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    rows = [(random.randbytes(100),) for _ in range(200_000)]
    start = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t (v) VALUES (?)", rows)
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def point_selects(directory: Path, run: int) -> float:
    """(c) 50,000 point SELECTs, each its own read transaction, on 20,000 rows."""
    path = directory / "c.db"
    if not path.exists():
        conn = _connect(path)
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t (v) VALUES (?)", [(b"v" * 100,) for _ in range(20_000)])
        conn.execute("COMMIT")
        conn.close()
    conn = _connect(path)
    ids = [random.randint(1, 20_000) for _ in range(50_000)]
    query = "SELECT v FROM t WHERE id = ?"
    start = time.perf_counter()
    for i in ids:
        conn.execute(query, (i,)).fetchone()
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


WORKLOADS: tuple[tuple[str, Callable[[Path, int], float], float], ...] = (
    ("(a) 1k autocommit inserts", small_inserts, 0.35),
    ("(b) 200k-row transaction", large_transaction, 0.5),
    ("(c) 50k point selects", point_selects, 0.9),
)


def best_time(workload: Callable[[Path, int], float], directory: Path) -> float:
    return min(workload(directory, run) for run in range(REPEATS))


def peak_rss_writing_1gb(node: LocalNode) -> float:
    """Peak resident memory of the daemon (MB) while a 1 GB database is written."""
    conn = _connect(node.mount_dir / "big.db")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    blob = random.randbytes(1000)
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_mb(node.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for _ in range(20):
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO t (v) VALUES (?)", ((blob,) for _ in range(50_000)))
            conn.execute("COMMIT")
    finally:
        done.set()
        sampler.join()
        conn.close()
    return max(peak, _peak_rss_mb(node.pid))


def _rss_mb(pid: int | None) -> float:
    return _status_field(pid, "VmRSS:")


def _peak_rss_mb(pid: int | None) -> float:
    return _status_field(pid, "VmHWM:")


def _status_field(pid: int | None, field: str) -> float:
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


def run() -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="litefs-bench-") as tmp:
        root = Path(tmp)
        plain = root / "plain"
        plain.mkdir()
        node = LocalNode(root, "primary")
        node.start()
        try:
            for name, workload, target in WORKLOADS:
                plain_time = best_time(workload, plain)
                mount_time = best_time(workload, node.mount_dir)
                rows.append((f"{name}: plain", plain_time * 1000, "ms"))
                rows.append((f"{name}: mount", mount_time * 1000, "ms"))
                rows.append((f"{name}: ratio", plain_time / mount_time, "x plain", target))
            rows.append(
                ("daemon peak RSS writing 1 GB", peak_rss_writing_1gb(node), "MB", 100.0, "max")
            )
        finally:
            node.cleanup()
    return rows
