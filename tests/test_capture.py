"""Commit capture without a mount: the capture modules are fed the file
operations SQLite issues, in the order it issues them, and the LTX files
they write are checked against the database SQLite produced."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from litefs import ltx, walfile
from litefs.capture import CrashPoints, WouldBlock
from litefs.capture.rollback import JOURNAL_MAGIC
from litefs.db import Database, ReadOnlyError

PAGE = 4096


class SimulatedCrash(BaseException):
    """Stands for the process dying: no code path handles it."""

    pass


def raise_crash(step: str) -> None:
    raise SimulatedCrash(step)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.create("my.db", tmp_path / "dbs" / "my.db")
    yield database
    database.close()


def rebuild(db: Database, tmp_path: Path) -> bytes:
    """The database the LTX history describes."""
    target = tmp_path / "rebuilt.db"
    target.unlink(missing_ok=True)
    fd = os.open(target, os.O_RDWR | os.O_CREAT)
    try:
        for _min, _max, path in db.ltx_files():
            with open(path, "rb") as f:
                ltx.apply_file(f, fd, sync=False)
    finally:
        os.close(fd)
    return target.read_bytes()


def sqlite_states(tmp_path: Path, *statements: str) -> list[bytes]:
    """A database's bytes after each statement, made by SQLite on a plain disk."""
    path = tmp_path / "plain.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size={PAGE}")
    states = []
    for statement in statements:
        conn.executescript(statement)
        states.append(path.read_bytes())
    conn.close()
    return states


# -- rollback journal ------------------------------------------------------


def journal_transaction(db: Database, before: bytes, after: bytes, end: str) -> None:
    """What SQLite does for one transaction: journal header, changed pages,
    then delete, truncate or zero the journal."""
    journal = db.journal
    fd = os.open(journal.path, os.O_RDWR | os.O_CREAT)
    try:
        journal.write(fd, 0, JOURNAL_MAGIC + bytes(20))
        for offset in range(0, max(len(before), len(after)), PAGE):
            page = after[offset : offset + PAGE]
            if page != before[offset : offset + PAGE] and page:
                db.write(offset, page)
        if len(after) < len(before):
            db.truncate(len(after))
        if end == "PERSIST":
            journal.write(fd, 0, bytes(28))
        elif end == "TRUNCATE":
            journal.truncate(0)
    finally:
        os.close(fd)
    if end == "DELETE":
        journal.remove()


@pytest.mark.parametrize("end", ["DELETE", "TRUNCATE", "PERSIST"])
def test_rollback_transactions_become_ltx_files(db: Database, tmp_path: Path, end: str) -> None:
    states = sqlite_states(
        tmp_path,
        "CREATE TABLE t (x)",
        "INSERT INTO t VALUES (randomblob(5000))",
        "DELETE FROM t; VACUUM",
    )
    before = b""
    for txid, state in enumerate(states, start=1):
        journal_transaction(db, before, state, end)
        assert db.position.txid == txid
        assert rebuild(db, tmp_path) == state
        before = state


def test_rolled_back_journal_transaction_writes_nothing(db: Database, tmp_path: Path) -> None:
    (state,) = sqlite_states(tmp_path, "CREATE TABLE t (x)")
    journal_transaction(db, b"", state, "DELETE")
    changed = bytearray(state)
    changed[PAGE + 100] ^= 1
    journal_transaction(db, state, bytes(changed), "PERSIST")  # written...
    assert db.position.txid == 2
    journal_transaction(db, bytes(changed), bytes(changed), "DELETE")  # ...and written back
    assert db.position.txid == 2


def test_replica_refuses_to_begin_a_journal_transaction(db: Database) -> None:
    db.writable = False
    fd = os.open(db.journal.path, os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(ReadOnlyError):
            db.journal.write(fd, 0, JOURNAL_MAGIC + bytes(20))
    finally:
        os.close(fd)


def test_a_deleted_journal_is_kept_emptied_and_reused_by_the_next_transaction(
    db: Database, tmp_path: Path
) -> None:
    first, second = sqlite_states(tmp_path, "CREATE TABLE t (x)", "INSERT INTO t VALUES (1)")
    journal = db.journal
    assert not journal.exists()
    assert journal.create(0o640, os.getuid(), os.getgid())  # a new name, to be synced
    journal_transaction(db, b"", first, "DELETE")
    assert not journal.exists()
    assert journal.path.stat().st_size == 0
    assert not journal.is_hot()

    assert not journal.create(0o600, os.getuid(), os.getgid())  # its name is durable already
    assert journal.exists()
    assert journal.path.stat().st_mode & 0o777 == 0o600
    journal_transaction(db, first, second, "DELETE")
    assert db.position.txid == 2
    assert rebuild(db, tmp_path) == second


def test_an_emptied_journal_is_not_there_after_a_restart(db: Database, tmp_path: Path) -> None:
    (state,) = sqlite_states(tmp_path, "CREATE TABLE t (x)")
    db.journal.create(0o644, os.getuid(), os.getgid())
    journal_transaction(db, b"", state, "DELETE")
    db.journal.create(0o644, os.getuid(), os.getgid())  # SQLite died right after creating it
    assert db.journal.exists()
    db.close()

    reopened = Database("my.db", db.path)
    reopened.open()
    try:
        assert not reopened.journal.exists()
        assert reopened.position.txid == 1
    finally:
        reopened.close()


def test_a_journal_deleted_while_still_open_goes_with_its_contents(
    db: Database, tmp_path: Path
) -> None:
    """A process that has the journal open keeps reading what it held, as
    on a disk: the file is deleted, not emptied for the next transaction."""
    (state,) = sqlite_states(tmp_path, "CREATE TABLE t (x)")
    db.journal.create(0o644, os.getuid(), os.getgid())
    reader = os.open(db.journal.path, os.O_RDONLY)
    try:
        journal_transaction(db, b"", state, "PERSIST")
        db.journal.remove(in_use=True)
        assert not db.journal.path.exists()
        assert os.pread(reader, 8, 0) == bytes(8)
        assert os.fstat(reader).st_size > 0
    finally:
        os.close(reader)
    assert db.journal.create(0o644, os.getuid(), os.getgid())


@pytest.mark.parametrize("step", ["before-ltx", "mid-ltx", "before-ltx-sync"])
def test_injected_crash_leaves_no_ltx_file_and_a_hot_journal(tmp_path: Path, step: str) -> None:
    db = Database.create("my.db", tmp_path / "dbs" / "my.db", crash=CrashPoints(step, raise_crash))
    (state,) = sqlite_states(
        tmp_path, "CREATE TABLE t (x); INSERT INTO t VALUES (randomblob(9000))"
    )
    with pytest.raises(SimulatedCrash):
        journal_transaction(db, b"", state, "DELETE")
    assert db.ltx_files() == []
    assert db.journal.is_hot()
    db.close()


# -- WAL -------------------------------------------------------------------


def sqlite_wal(tmp_path: Path, *statements: str, page_size: int = PAGE) -> tuple[bytes, bytes]:
    """The WAL SQLite writes for the statements (no checkpoint), and the
    database after a full checkpoint."""
    directory = tmp_path / "plain"
    directory.mkdir(exist_ok=True)
    path = directory / "wal.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size={page_size}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    for statement in statements:
        conn.executescript(statement)
    wal = (directory / "wal.db-wal").read_bytes()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return wal, path.read_bytes()


def feed_wal(db: Database, wal: bytes, start: int = 0) -> None:
    """Write a WAL from `start` as SQLite does: the header, then each
    frame's header and page as two writes."""
    log = db.wal
    fd = os.open(log.path, os.O_RDWR | os.O_CREAT)
    try:
        if start == 0:
            log.write(fd, 0, wal[: walfile.HEADER_SIZE])
        page_size = walfile.parse_header(wal).page_size
        offset = max(start, walfile.HEADER_SIZE)
        while offset < len(wal):
            log.write(fd, offset, wal[offset : offset + walfile.FRAME_HEADER_SIZE])
            offset += walfile.FRAME_HEADER_SIZE
            log.write(fd, offset, wal[offset : offset + page_size])
            offset += page_size
    finally:
        os.close(fd)


def commit_count(wal: bytes) -> int:
    chain = walfile.FrameChain(walfile.parse_header(wal))
    return len(walfile.transactions(chain, memoryview(wal)[walfile.HEADER_SIZE :]))


@pytest.mark.parametrize("page_size", [512, 4096, 65536])
def test_each_wal_commit_becomes_one_ltx_file(db: Database, tmp_path: Path, page_size: int) -> None:
    wal, final = sqlite_wal(
        tmp_path,
        "CREATE TABLE t (x)",
        "INSERT INTO t VALUES (randomblob(3000))",
        "BEGIN; INSERT INTO t SELECT randomblob(700) FROM t; UPDATE t SET x = 1; COMMIT",
        "DELETE FROM t",
        page_size=page_size,
    )
    feed_wal(db, wal)
    assert db.position.txid == commit_count(wal) == 4
    assert rebuild(db, tmp_path) == final
    assert db.checksum == ltx.database_checksum(tmp_path / "plain" / "wal.db")


def test_frames_after_the_last_commit_produce_nothing(db: Database, tmp_path: Path) -> None:
    wal, _ = sqlite_wal(tmp_path, "CREATE TABLE t (x)", "INSERT INTO t VALUES (1)")
    page_size = walfile.parse_header(wal).page_size
    frame = walfile.FRAME_HEADER_SIZE + page_size
    last = len(wal) - frame
    uncommitted = bytearray(wal[last:])
    uncommitted[4:8] = bytes(4)  # the same frame, without a commit size
    feed_wal(db, wal[:last] + bytes(uncommitted))
    assert db.position.txid == 1


def test_a_frame_with_a_bad_checksum_is_not_committed(db: Database, tmp_path: Path) -> None:
    wal, _ = sqlite_wal(tmp_path, "CREATE TABLE t (x)", "INSERT INTO t VALUES (1)")
    damaged = bytearray(wal)
    damaged[-10] ^= 0xFF  # inside the second transaction's last page
    feed_wal(db, bytes(damaged))
    assert db.position.txid == 1


def test_commit_frame_counts_only_once_its_checksum_is_rewritten(
    db: Database, tmp_path: Path
) -> None:
    """SQLite writes a spilled transaction's commit frame with zero salts and
    checksum, then rewrites the headers: only the rewrite commits."""
    wal, final = sqlite_wal(tmp_path, "CREATE TABLE t (x)")
    page_size = walfile.parse_header(wal).page_size
    frame = walfile.FRAME_HEADER_SIZE + page_size
    last = len(wal) - frame
    blank = bytearray(wal[last:])
    blank[8:24] = bytes(16)
    feed_wal(db, wal[:last] + bytes(blank))
    assert db.position.txid == 0
    fd = os.open(db.wal.path, os.O_RDWR)
    try:
        header = wal[last : last + walfile.FRAME_HEADER_SIZE]
        db.wal.write(fd, last, header)
    finally:
        os.close(fd)
    assert db.position.txid == 1
    assert rebuild(db, tmp_path) == final


def test_restart_with_new_salts_continues_the_history(db: Database, tmp_path: Path) -> None:
    first, _ = sqlite_wal(tmp_path, "CREATE TABLE t (x)", "INSERT INTO t VALUES (1)")
    feed_wal(db, first)
    # A checkpoint copies the committed pages into the database file...
    for pgno in sorted(db.wal.pages):
        db.write((pgno - 1) * PAGE, db.read_page(pgno))
    assert db.position.txid == 2
    # ...then a writer restarts the log with other salts.
    directory = tmp_path / "plain"
    conn = sqlite3.connect(directory / "wal.db", isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("INSERT INTO t VALUES (2)")
    second = (directory / "wal.db-wal").read_bytes()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    assert walfile.parse_header(second).salt1 != walfile.parse_header(first).salt1
    feed_wal(db, second)
    assert db.position.txid == 3
    assert rebuild(db, tmp_path) == (directory / "wal.db").read_bytes()


def test_replica_refuses_wal_frames(db: Database, tmp_path: Path) -> None:
    wal, _ = sqlite_wal(tmp_path, "CREATE TABLE t (x)")
    db.writable = False
    with pytest.raises(ReadOnlyError):
        feed_wal(db, wal)
    assert db.ltx_files() == []


def test_refused_commit_is_invalidated_in_the_wal(db: Database, tmp_path: Path) -> None:
    """A commit the node may no longer record must not be found committed
    by SQLite's recovery later."""
    wal, _ = sqlite_wal(tmp_path, "CREATE TABLE t (x)", "INSERT INTO t VALUES (1)")
    first = walfile.HEADER_SIZE + 2 * (walfile.FRAME_HEADER_SIZE + PAGE)
    feed_wal(db, wal[:first])  # the first transaction's two frames
    txid = db.position.txid

    class Deadline:
        def commit_allowed(self) -> bool:
            return False

        def committed(self, name: str) -> None:
            return None

    db.events = Deadline()
    with pytest.raises(ReadOnlyError):
        feed_wal(db, wal, first)
    assert db.position.txid == txid
    on_disk = db.wal.path.read_bytes()
    chain = walfile.FrameChain(walfile.parse_header(on_disk))
    assert len(walfile.transactions(chain, memoryview(on_disk)[walfile.HEADER_SIZE :])) == 1


def test_recovery_records_wal_transactions_the_history_lacks(tmp_path: Path) -> None:
    path = tmp_path / "dbs" / "my.db"
    crash = CrashPoints(None, raise_crash)
    db = Database.create("my.db", path, crash=crash)
    wal, final = sqlite_wal(tmp_path, "CREATE TABLE t (x)", "INSERT INTO t VALUES (1)")
    second = walfile.HEADER_SIZE + len(
        walfile.transactions(
            walfile.FrameChain(walfile.parse_header(wal)), memoryview(wal)[walfile.HEADER_SIZE :]
        )[0]
    ) * (walfile.FRAME_HEADER_SIZE + PAGE)
    feed_wal(db, wal[:second])
    assert db.position.txid == 1
    crash.step = "before-ltx"
    with pytest.raises(SimulatedCrash):
        feed_wal(db, wal, second)
    assert len(db.ltx_files()) == 1
    db.close()

    for _restart in range(2):  # the second start finds nothing left to record
        recovered = Database("my.db", path)
        recovered.open()
        try:
            assert recovered.position.txid == 2
            assert rebuild(recovered, tmp_path) == final
        finally:
            recovered.close()


def test_wal_checksum_matches_sqlite_in_both_byte_orders() -> None:
    header = bytearray(32)
    for magic in (walfile.MAGIC_LITTLE, walfile.MAGIC_BIG):
        header[:16] = b"".join(
            v.to_bytes(4, "big") for v in (magic, walfile.FORMAT_VERSION, 4096, 0)
        )
        header[16:24] = os.urandom(8)
        c1, c2 = _reference_checksum(magic == walfile.MAGIC_BIG, bytes(header[:24]))
        header[24:32] = c1.to_bytes(4, "big") + c2.to_bytes(4, "big")
        assert walfile.parse_header(bytes(header)).checksum == (c1, c2)
        data = os.urandom(4096 + 8)
        assert walfile.checksum(magic == walfile.MAGIC_BIG, data, (c1, c2)) == (
            _reference_checksum(magic == walfile.MAGIC_BIG, data, (c1, c2))
        )


def _reference_checksum(
    big_endian: bool, data: bytes, start: tuple[int, int] = (0, 0)
) -> tuple[int, int]:
    """SQLite's loop, word by word."""
    s1, s2 = start
    order = "big" if big_endian else "little"
    for i in range(0, len(data), 8):
        s1 = (s1 + int.from_bytes(data[i : i + 4], order) + s2) & 0xFFFFFFFF
        s2 = (s2 + int.from_bytes(data[i + 4 : i + 8], order) + s1) & 0xFFFFFFFF
    return s1, s2


def test_small_commits_run_in_place_and_large_ones_in_a_worker(
    db: Database, tmp_path: Path
) -> None:
    wal, _ = sqlite_wal(tmp_path, "CREATE TABLE t (x)", "INSERT INTO t SELECT randomblob(500000)")
    header = walfile.parse_header(wal)
    chain = walfile.FrameChain(header)
    small, large = walfile.transactions(chain, memoryview(wal)[walfile.HEADER_SIZE :])
    end_of_small = small[-1].offset + header.frame_size
    feed_wal(db, wal[:end_of_small])
    last = large[-1].offset
    log = db.wal
    fd = os.open(log.path, os.O_RDWR)
    try:
        for frame in large[:-1]:
            chunk = wal[frame.offset : frame.offset + header.frame_size]
            assert not log.write_blocks(frame.offset, chunk)
            log.write(fd, frame.offset, chunk, wait=False)
        commit_header = wal[last : last + walfile.FRAME_HEADER_SIZE]
        log.write(fd, last, commit_header, wait=False)
        page = wal[last + walfile.FRAME_HEADER_SIZE : last + header.frame_size]
        assert log.write_blocks(last + walfile.FRAME_HEADER_SIZE, page)
        with db.lock, pytest.raises(WouldBlock):  # as if a snapshot held it
            _in_other_thread(
                lambda: log.write(fd, last + walfile.FRAME_HEADER_SIZE, page, wait=False)
            )
        assert db.position.txid == 1
        log.write(fd, last + walfile.FRAME_HEADER_SIZE, page)
        assert db.position.txid == 2
    finally:
        os.close(fd)


def _in_other_thread(work: Callable[[], object]) -> object:
    result: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


# -- recovery --------------------------------------------------------------


def insert_rows(table: str, count: int) -> str:
    return (
        f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}) "
        f"INSERT INTO {table} SELECT randomblob(3000) FROM n"
    )


def torn_by_a_writer(state: bytes, tmp_path: Path) -> tuple[bytes, bytes]:
    """The database file and hot journal a writer leaves when it dies in a
    transaction on top of `state` after its small cache spilled pages into
    the file: every page of table `u`, and 40 rows into `t`."""
    path = tmp_path / "torn.db"
    path.write_bytes(state)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA cache_size=2")
        conn.execute("BEGIN")
        conn.execute("UPDATE u SET x = randomblob(3000)")
        conn.execute(insert_rows("t", 40))
        torn = path.read_bytes()
        journal = (tmp_path / "torn.db-journal").read_bytes()
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    assert journal[:8] == JOURNAL_MAGIC and torn != state
    return torn, journal


def test_recovery_rolls_back_a_hot_journal_before_finishing_an_interrupted_apply(
    tmp_path: Path,
) -> None:
    # A primary stepped down with a writer in a transaction; the writer died
    # and the node was killed while applying the next primary's file, after
    # naming it in the marker. The journal holds the pages as they were
    # before that file: played back over the file's pages it would undo them.
    first, second = sqlite_states(
        tmp_path,
        "CREATE TABLE t (x); CREATE TABLE u (x); " + insert_rows("u", 10),
        insert_rows("t", 30),
    )
    primary = Database.create("my.db", tmp_path / "primary")
    journal_transaction(primary, b"", first, "DELETE")
    journal_transaction(primary, first, second, "DELETE")
    (_, _, one), (_, _, two) = primary.ltx_files()
    replica = Database.create("my.db", tmp_path / "replica")
    replica.writable = False
    shutil.copy(one, tmp_path / "incoming.ltx")
    replica.apply_ltx(tmp_path / "incoming.ltx", contextlib.nullcontext())
    torn, journal = torn_by_a_writer(first, tmp_path)
    os.pwrite(replica.fd, torn, 0)
    replica.journal.path.write_bytes(journal)
    shutil.copy(two, replica.ltx_dir / two.name)
    replica.applying_path.write_text(two.name)
    replica.close()

    reopened = Database("my.db", tmp_path / "replica")
    reopened.open()
    try:
        assert reopened.position == primary.position
        assert reopened.checksum == primary.position.checksum
        assert not reopened.journal.is_hot()
        assert reopened.database_path.read_bytes() == second
    finally:
        reopened.close()
        primary.close()
