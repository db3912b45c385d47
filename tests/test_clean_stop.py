"""A clean stop saves the checksums a start would otherwise compute."""

from __future__ import annotations

import array
import os
from pathlib import Path

import pytest
from node_process import NodeProcess
from test_primary import assert_history_rebuilds, position_of

from litefs import clean_stop, ltx

STATE = clean_stop.CleanStop(7, 0x8000_0000_0000_0123, 4096, array.array("Q", [1, 2, 3]))


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, Path]:
    database = tmp_path / "database"
    database.write_bytes(b"d" * 4096 * 3)
    newest = tmp_path / "0000000000000007-0000000000000007.ltx"
    newest.write_bytes(b"ltx")
    return tmp_path / "clean-stop", database, newest


def test_record_is_taken_once(files: tuple[Path, Path, Path]) -> None:
    record, database, newest = files
    clean_stop.save(record, STATE, database, newest)
    assert clean_stop.take(record, database, newest) == STATE
    assert not record.exists()
    assert clean_stop.take(record, database, newest) is None


def test_record_of_a_changed_database_is_refused(files: tuple[Path, Path, Path]) -> None:
    record, database, newest = files
    clean_stop.save(record, STATE, database, newest)
    with open(database, "r+b") as f:
        f.write(b"x")
    assert clean_stop.take(record, database, newest) is None
    assert not record.exists()


def test_record_of_another_newest_ltx_file_is_refused(files: tuple[Path, Path, Path]) -> None:
    record, database, newest = files
    clean_stop.save(record, STATE, database, newest)
    newest.unlink()
    newest.write_bytes(b"ltx")  # same name and content, another file
    assert clean_stop.take(record, database, newest) is None


def test_damaged_record_is_refused(files: tuple[Path, Path, Path]) -> None:
    record, database, newest = files
    clean_stop.save(record, STATE, database, newest)
    data = bytearray(record.read_bytes())
    data[len(clean_stop.MAGIC) + 3] ^= 1
    record.write_bytes(bytes(data))
    assert clean_stop.take(record, database, newest) is None


@pytest.mark.fuse
def test_restart_after_a_clean_stop_resumes_the_saved_state(
    primary: NodeProcess, tmp_path: Path
) -> None:
    primary.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES (1), (2);")
    before = position_of(primary, "my.db")
    assert primary.stop() == 0
    assert (primary.db_dir("my.db") / "clean-stop").exists()

    primary.start()
    assert not (primary.db_dir("my.db") / "clean-stop").exists()
    assert position_of(primary, "my.db") == before
    primary.sqlite("my.db", "INSERT INTO t VALUES (3);")
    assert_history_rebuilds(primary, "my.db", tmp_path)


@pytest.mark.fuse
def test_database_changed_while_stopped_is_checked_in_full(
    primary: NodeProcess, tmp_path: Path
) -> None:
    primary.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES (1);")
    assert primary.stop() == 0
    database = primary.db_dir("my.db") / "database"
    page = os.path.getsize(database) // 2
    with open(database, "r+b") as f:  # a change behind the daemon's back
        f.seek(page + 4000)
        f.write(b"\x01")

    primary.start()
    txid, checksum = position_of(primary, "my.db")
    assert checksum == ltx.database_checksum(database)
    assert txid == 3  # the change was recorded as a transaction of its own
