"""Throughput of the LTX hot paths on a ~100 MB SQLite database.

Figures are MB of database per second (decimal megabytes), best of a few
runs, so a noisy neighbour on a shared machine costs less than a real
regression would.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from litefs import ltx

DATABASE_MB = 100
PAGE_SIZE = 4096
REPEATS = 3
CRC_BUFFER = 256 << 20

ENCODE_TARGET = 200.0
DECODE_TARGET = 300.0
CRC_TARGET = 1.0


def build_database(path: Path, megabytes: int = DATABASE_MB) -> int:
    """A database shaped like application data: text that partly repeats, an index, some blobs."""
    con = sqlite3.connect(path)
    try:
        con.execute(f"PRAGMA page_size={PAGE_SIZE}")
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        con.execute(
            "CREATE TABLE events(id INTEGER PRIMARY KEY, kind TEXT, who TEXT, body TEXT, n INT)"
        )
        con.execute("CREATE INDEX events_kind ON events(kind, n)")
        rows = megabytes * 1_000_000 // 430
        con.execute(
            """
            WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT ?)
            INSERT INTO events(kind, who, body, n)
            SELECT
                'kind-' || (x % 17),
                'user' || (x * 7919 % 100003) || '@example.com',
                printf('order %d shipped to warehouse %d; note: ', x, x % 97)
                    || hex(randomblob(120))
                    || ' status=delivered priority=normal region=eu-west-' || (x % 3),
                x * 31 % 1000
            FROM c
            """,
            (rows,),
        )
        con.commit()
    finally:
        con.close()
    return path.stat().st_size


def _best(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run() -> list[tuple[str, float, str] | tuple[str, float, str, float]]:
    with tempfile.TemporaryDirectory(prefix="litefs-bench-") as tmp:
        db = Path(tmp) / "bench.db"
        snap = Path(tmp) / "snapshot.ltx"
        size = build_database(db)
        mb = size / 1e6

        def encode() -> None:
            with open(snap, "wb") as out:
                ltx.encode_snapshot(db, out, timestamp=0)

        def verify() -> None:
            with open(snap, "rb") as f:
                ltx.verify(f)

        def decode() -> None:
            with open(snap, "rb") as f:
                for _ in ltx.Decoder(f).pages():
                    pass

        def checksum() -> None:
            ltx.database_checksum(db)

        encode_s = _best(encode)
        verify_s = _best(verify)
        decode_s = _best(decode)
        checksum_s = _best(checksum)
        ratio = snap.stat().st_size / size

        buf = os.urandom(CRC_BUFFER)
        crc_s = _best(lambda: ltx.crc64(buf))

    return [
        (f"database size ({size // PAGE_SIZE} pages)", mb, "MB"),
        ("snapshot size / database size", ratio * 100, "%"),
        ("encode_snapshot", mb / encode_s, "MB/s", ENCODE_TARGET),
        ("verify", mb / verify_s, "MB/s", DECODE_TARGET),
        ("Decoder.pages()", mb / decode_s, "MB/s", DECODE_TARGET),
        ("database_checksum", mb / checksum_s, "MB/s"),
        ("crc64", CRC_BUFFER / crc_s / 1e9, "GB/s", CRC_TARGET),
    ]
