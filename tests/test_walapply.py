"""A replica's WAL writer, without a mount: transactions appended by
`walapply` to a log and wal-index that real SQLite connections in this
process map and read, through checkpoints and restarts of the log."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest

from litefs import walapply, walindex
from litefs.capture import NO_CRASH
from litefs.capture.wal import WriteAheadLog

if TYPE_CHECKING:
    from litefs.db import Database

PAGE_SIZE = 4096


class Replica:
    """`x.db` in WAL mode, kept in step with a rollback-mode source `src.db`
    by appending the source's pages, as a replica appends LTX files."""

    def __init__(self, tmp_path: Path) -> None:
        self.source = sqlite3.connect(tmp_path / "src.db", isolation_level=None)
        self.source.execute(f"PRAGMA page_size={PAGE_SIZE}")
        self.source.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        self.source_path = tmp_path / "src.db"
        self.path = tmp_path / "x.db"
        self.path.write_bytes(self.pages_bytes())
        self.reader = self.connect()
        assert self.reader.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        self.reader.execute("SELECT count(*) FROM t").fetchone()
        self.shm = os.open(f"{self.path}-shm", os.O_RDWR)
        self.log = WriteAheadLog(cast("Database", _Directory(tmp_path)), NO_CRASH)
        self.log.path = Path(f"{self.path}-wal")
        self.fd = os.open(self.path, os.O_RDWR)

    def connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None)

    def pages_bytes(self) -> bytes:
        data = bytearray(self.source_path.read_bytes())
        data[18:20] = b"\x02\x02"
        return bytes(data)

    def write(self, sql: str, *args: object) -> None:
        """Run `sql` on the source and append every page of the result."""
        self.source.execute(sql, args)
        data = self.pages_bytes()
        pages = [
            (i // PAGE_SIZE + 1, data[i : i + PAGE_SIZE]) for i in range(0, len(data), PAGE_SIZE)
        ]
        assert walapply.append(self.log, self.shm, pages, len(pages))

    def index(self) -> tuple[walindex.IndexHeader, walindex.CheckpointInfo]:
        parsed = walindex.parse(os.pread(self.shm, walindex.INFO_SIZE, 0))
        assert parsed is not None
        return parsed

    def backfill(self) -> int:
        return walapply.backfill(self.log, self.shm, self.fd, lambda: None, force=True)

    def close(self) -> None:
        os.close(self.shm)
        os.close(self.fd)
        self.reader.close()
        self.source.close()


class _Directory:
    def __init__(self, path: Path) -> None:
        self.path = path


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[Replica]:
    made = Replica(tmp_path)
    yield made
    made.close()


def count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM t").fetchone()[0]


def test_appended_transactions_reach_open_and_new_connections(replica: Replica) -> None:
    for i in range(5):
        replica.write("INSERT INTO t (v) VALUES (?)", b"x" * 100)
        assert count(replica.reader) == i + 1
    assert count(replica.connect()) == 5
    assert replica.index()[0].max_frame == 5 * 2


def test_a_read_transaction_keeps_its_snapshot_across_appends(replica: Replica) -> None:
    replica.write("INSERT INTO t (v) VALUES (1)")
    replica.reader.execute("BEGIN")
    assert count(replica.reader) == 1
    replica.write("INSERT INTO t (v) VALUES (2)")
    assert count(replica.connect()) == 2
    assert count(replica.reader) == 1
    replica.reader.execute("COMMIT")
    assert count(replica.reader) == 2


def test_backfill_stops_at_a_reader_and_the_log_restarts_once_none_uses_it(
    replica: Replica,
) -> None:
    replica.write("INSERT INTO t (v) VALUES (1)")
    replica.reader.execute("BEGIN")
    count(replica.reader)  # holds a read mark at the first transaction
    replica.write("INSERT INTO t (v) VALUES (2)")
    first = replica.index()[0].max_frame
    assert replica.backfill() < replica.index()[0].max_frame
    replica.reader.execute("COMMIT")
    assert replica.backfill() == replica.index()[0].max_frame > first // 2
    replica.write("INSERT INTO t (v) VALUES (3)")
    header, info = replica.index()
    assert (header.max_frame, info.backfill) == (2, 0)  # a new generation
    assert count(replica.reader) == count(replica.connect()) == 3


def test_thousands_of_frames_span_several_hash_regions(replica: Replica) -> None:
    blob = os.urandom(3000)
    for _ in range(300):  # about 30 pages each: some 9,000 frames, three regions
        replica.write("INSERT INTO t (v) VALUES (?)", blob)
        replica.reader.execute("BEGIN")
        count(replica.reader)
        replica.reader.execute("COMMIT")
    assert replica.index()[0].max_frame > 2 * walindex.REGION_FRAMES
    fresh = replica.connect()
    assert count(fresh) == 300
    assert fresh.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_sqlite_recovers_the_index_from_an_appended_log(replica: Replica, tmp_path: Path) -> None:
    for i in range(20):
        replica.write("INSERT INTO t (v) VALUES (?)", i)
    copy = tmp_path / "copy.db"
    copy.write_bytes(replica.path.read_bytes())
    Path(f"{copy}-wal").write_bytes(replica.log.path.read_bytes())
    conn = sqlite3.connect(copy)
    assert count(conn) == 20
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_an_index_that_does_not_describe_the_log_is_declined(replica: Replica) -> None:
    replica.write("INSERT INTO t (v) VALUES (1)")
    replica.log.forget()  # the daemon no longer knows the log's frames
    before = os.pread(replica.shm, walindex.INFO_SIZE, 0)
    assert not walapply.append(replica.log, replica.shm, [(2, bytes(PAGE_SIZE))], 2)
    assert os.pread(replica.shm, walindex.INFO_SIZE, 0) == before
