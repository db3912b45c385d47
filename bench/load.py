"""Loading a large database: one bulk transaction through SQLite, `litefs
import`, and `cp` into the mount, each against its plain-directory
equivalent; then how a new replica catches up afterwards.

The size is LITEFS_BENCH_LOAD_MB megabytes (default 256) of random 4,000-byte
rows, so compression cannot flatter the figures. A load must leave a short
history (a handful of LTX files, not one per page or per chunk), and a
replica that joins afterwards catches up from it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.primary import running
from bench.replication import wait_caught_up
from localcluster import LocalNode

Row = tuple[Any, ...]

ROW_BYTES = 4000
SPEED_TARGET = 0.5
"""A load through the mount at no less than half a plain directory's speed."""
MAX_LTX_FILES = 2


def _megabytes() -> int:
    return int(os.environ.get("LITEFS_BENCH_LOAD_MB", "256"))


def _bulk_load_sql(megabytes: int) -> str:
    rows = megabytes * 1024 * 1024 // ROW_BYTES
    return (
        "PRAGMA page_size=4096; CREATE TABLE t (b BLOB); BEGIN; "
        f"WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {rows}) "
        f"INSERT INTO t SELECT randomblob({ROW_BYTES}) FROM c; COMMIT;"
    )


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _sqlite(path: Path, sql: str) -> None:
    subprocess.run(["sqlite3", str(path)], input=sql, text=True, check=True, timeout=3600)


def _litefs(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "litefs", *args], check=True, capture_output=True, timeout=3600
    )


def _ltx_files(node: LocalNode, db: str) -> int:
    return len(list((node.db_dir(db) / "ltx").glob("*.ltx")))


def run() -> list[Row]:
    megabytes = _megabytes()
    sql = _bulk_load_sql(megabytes)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="litefs-bench-load-") as tmp:
        root = Path(tmp)
        plain = root / "plain"
        plain.mkdir()
        quiet = {"log": {"debug": False}}
        primary = LocalNode(root, "primary", settings=quiet)
        with running(primary):
            bulk_plain = _timed(lambda: _sqlite(plain / "src.db", sql))
            bulk_mount = _timed(lambda: _sqlite(primary.mount_dir / "bulk.db", sql))
            rows += [
                (
                    f"bulk load {megabytes} MB: speed vs plain",
                    bulk_plain / bulk_mount,
                    "x",
                    SPEED_TARGET,
                ),
                ("bulk load: LTX files", _ltx_files(primary, "bulk.db"), "", MAX_LTX_FILES, "max"),
            ]
            copy_plain = _timed(lambda: shutil.copyfile(plain / "src.db", plain / "copy.db"))
            imported = _timed(
                lambda: _litefs(
                    "import", "-name", "imp.db", str(plain / "src.db"), "-url", primary.url
                )
            )
            copied = _timed(lambda: shutil.copyfile(plain / "src.db", primary.mount_dir / "cp.db"))
            rows += [
                (f"import {megabytes} MB", imported, "s"),
                ("import: speed vs cp to plain", copy_plain / imported, "x", SPEED_TARGET),
                ("import: LTX files", _ltx_files(primary, "imp.db"), "", 1, "max"),
                ("cp into the mount: speed vs plain", copy_plain / copied, "x", SPEED_TARGET),
            ]
            replica = LocalNode(root, "replica", candidate=False, primary=primary, settings=quiet)
            started = time.perf_counter()
            with running(replica):
                for db in ("bulk.db", "imp.db", "cp.db"):
                    wait_caught_up(primary, replica, db, timeout=3600)
                joined = time.perf_counter() - started
                applied = sum(_ltx_files(replica, db) for db in ("bulk.db", "imp.db", "cp.db"))
            # Recorded at the close the kernel sends after cp has exited:
            # counted once the replica has it.
            rows.append(
                ("cp into the mount: LTX files", _ltx_files(primary, "cp.db"), "", 1, "max")
            )
            rows += [
                (f"new replica catches up on 3 x {megabytes} MB", joined, "s"),
                ("new replica: LTX files applied", applied, "", MAX_LTX_FILES + 2, "max"),
            ]
    return rows
