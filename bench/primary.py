"""SQLite workloads on a plain directory and through a primary's mount.

Both run in the same process, one after the other, so the ratio (plain time
divided by mount time; 1.0 means no cost) compares like with like on a noisy
machine. Each workload runs three times and the best time counts.

The WAL workloads run on a daemon of their own, after the others, so that a
mount that cannot do WAL yet costs only their rows: a run through the mount
that raises sqlite3.Error is reported as a ratio of 0 (MISSED) with a note on
stderr instead of ending the suite.
"""

from __future__ import annotations

import random
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from localcluster import LocalNode

REPEATS = 3
Row = tuple[Any, ...]


def _connect(
    path: Path, journal_mode: str = "DELETE", synchronous: str = "FULL"
) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        set_journal_mode(conn, journal_mode)
        conn.execute(f"PRAGMA synchronous={synchronous}")
    except BaseException:
        conn.close()
        raise
    return conn


def set_journal_mode(conn: sqlite3.Connection, mode: str) -> None:
    """Switch the journal mode; SQLite refusing it quietly is an error too."""
    actual = conn.execute(f"PRAGMA journal_mode={mode}").fetchone()[0]
    if str(actual).upper() != mode.upper():
        raise sqlite3.OperationalError(f"journal_mode is {actual}, not {mode}")


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


MEDIUM_ROWS = 400
MEDIUM_BLOB = 6000  # bytes: one overflow page and half a leaf page per row
MEDIUM_TRANSACTIONS = 40
MEDIUM_ROWS_PER_TRANSACTION = 60  # about 115 pages go through the journal


def _medium_transactions(path: Path, run: int, end: str) -> float:
    """40 transactions rewriting 60 of 400 rows of 6 kB each, ending in `end`.

    The table (about 2.4 MB) is written before the clock starts; which rows
    each transaction rewrites depends only on `run`, so the plain directory
    and the mount do the same work.
    """
    conn = _connect(path)
    try:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO t (v) VALUES (?)",
            ((random.randbytes(MEDIUM_BLOB),) for _ in range(MEDIUM_ROWS)),
        )
        conn.execute("COMMIT")
        rng = random.Random(run)
        batches = [
            [
                (rng.randbytes(MEDIUM_BLOB), row_id)
                for row_id in rng.sample(range(1, MEDIUM_ROWS + 1), MEDIUM_ROWS_PER_TRANSACTION)
            ]
            for _ in range(MEDIUM_TRANSACTIONS)
        ]
        start = time.perf_counter()
        for batch in batches:
            conn.execute("BEGIN")
            conn.executemany("UPDATE t SET v = ? WHERE id = ?", batch)
            conn.execute(end)
        return time.perf_counter() - start
    finally:
        conn.close()


def medium_commits(directory: Path, run: int) -> float:
    """(d) 40 transactions of about 100 pages each, committed."""
    return _medium_transactions(directory / f"d{run}.db", run, "COMMIT")


def medium_rollbacks(directory: Path, run: int) -> float:
    """(e) the same 40 transactions, each rolled back."""
    return _medium_transactions(directory / f"e{run}.db", run, "ROLLBACK")


def _wal_inserts(path: Path, synchronous: str) -> float:
    """2,000 autocommit INSERTs of 100 bytes in journal_mode=WAL."""
    conn = _connect(path, "WAL", synchronous)
    try:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        start = time.perf_counter()
        for _ in range(2000):
            conn.execute("INSERT INTO t (v) VALUES (?)", (b"x" * 100,))
        return time.perf_counter() - start
    finally:
        conn.close()


def wal_inserts_normal(directory: Path, run: int) -> float:
    """(f) 2k autocommit INSERTs, journal WAL, synchronous NORMAL."""
    return _wal_inserts(directory / f"f{run}.db", "NORMAL")


def wal_inserts_full(directory: Path, run: int) -> float:
    """(g) 2k autocommit INSERTs, journal WAL, synchronous FULL."""
    return _wal_inserts(directory / f"g{run}.db", "FULL")


Workload = Callable[[Path, int], float]

WORKLOADS: tuple[tuple[str, Workload, float], ...] = (
    ("(a) 1k autocommit inserts", small_inserts, 0.35),
    ("(b) 200k-row transaction", large_transaction, 0.5),
    ("(c) 50k point selects", point_selects, 0.9),
    ("(d) medium txs, committed", medium_commits, 0.3),
    ("(e) medium txs, rolled back", medium_rollbacks, 0.3),
)

WAL_WORKLOADS: tuple[tuple[str, Workload, float], ...] = (
    ("(f) 2k WAL inserts, NORMAL", wal_inserts_normal, 0.3),
    ("(g) 2k WAL inserts, FULL", wal_inserts_full, 0.3),
)
"""Run on a daemon of their own; a mount failure is reported, not raised."""


def best_time(workload: Workload, directory: Path) -> float:
    return min(workload(directory, run) for run in range(REPEATS))


def note_failure(module: str, name: str, error: BaseException) -> None:
    """One line on stderr for a workload whose run through the mount failed."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{module}: {name}: failed through the mount ({message})", file=sys.stderr)


def compare(
    name: str, workload: Workload, target: float, plain: Path, mount: Path, *, fallible: bool
) -> list[Row]:
    """Plain and mount times and their ratio; with `fallible`, a mount run
    raising sqlite3.Error gives a ratio of 0 (and a note) instead."""
    plain_time = best_time(workload, plain)
    rows: list[Row] = [(f"{name}: plain", plain_time * 1000, "ms")]
    try:
        mount_time = best_time(workload, mount)
    except sqlite3.Error as error:
        if not fallible:
            raise
        note_failure(__name__, name, error)
        return [*rows, (f"{name}: ratio", 0.0, "x plain", target)]
    rows.append((f"{name}: mount", mount_time * 1000, "ms"))
    rows.append((f"{name}: ratio", plain_time / mount_time, "x plain", target))
    return rows


@contextmanager
def running(node: LocalNode) -> Iterator[LocalNode]:
    """A started daemon, stopped and unmounted however the block ends."""
    try:
        node.start()
        yield node
    finally:
        node.cleanup()


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


def restart_ready_seconds(node: LocalNode) -> float:
    """Seconds from starting a cleanly stopped node, on the 1 GB database
    written before, to its first answered read of that database."""
    node.stop()
    start = time.perf_counter()
    node.start(wait=False)
    node.wait_mounted()
    conn = sqlite3.connect(f"file:{node.mount_dir / 'big.db'}?mode=ro", uri=True, timeout=30)
    try:
        conn.execute("SELECT v FROM t WHERE id = 1").fetchone()
    finally:
        conn.close()
    return time.perf_counter() - start


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
        with running(LocalNode(root, "primary")) as node:
            for name, workload, target in WORKLOADS:
                rows += compare(name, workload, target, plain, node.mount_dir, fallible=False)
            peak = peak_rss_writing_1gb(node)
            restart = restart_ready_seconds(node)
        with running(LocalNode(root, "wal")) as node:
            for name, workload, target in WAL_WORKLOADS:
                rows += compare(name, workload, target, plain, node.mount_dir, fallible=True)
        rows.append(("daemon peak RSS writing 1 GB", peak, "MB", 100.0, "max"))
        rows.append(("restart on 1 GB, first read", restart * 1000, "ms", 2000.0, "max"))
    return rows
