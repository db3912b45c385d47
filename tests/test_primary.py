"""The FUSE primary: every committed SQLite transaction becomes one LTX file.

These tests drive the real `sqlite3` shell and Python's `sqlite3` through a
real mount and check the LTX files with the `litefs ltx` tools.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import StartNode, litefs_cli
from node_process import NodeProcess

from litefs import ltx

pytestmark = pytest.mark.fuse


def position_of(node: NodeProcess, db: str) -> tuple[int, int]:
    txid, checksum = (node.mount_dir / f"{db}-pos").read_text().strip().split("/")
    return int(txid, 16), int(checksum, 16)


def assert_history_rebuilds(node: NodeProcess, db: str, tmp_path: Path) -> None:
    """Every LTX file verifies, and applying them all reproduces the database."""
    files = [str(p) for p in node.ltx_files(db)]
    assert files, "no LTX files were written"
    litefs_cli("ltx", "verify", *files)
    rebuilt = tmp_path / f"rebuilt-{db.replace('/', '_')}"
    rebuilt.unlink(missing_ok=True)
    litefs_cli("ltx", "apply", "-db", str(rebuilt), *files)
    assert rebuilt.read_bytes() == (node.db_dir(db) / "database").read_bytes()
    txid, checksum = position_of(node, db)
    assert txid == ltx.parse_filename(Path(files[-1]).name)[1]
    assert checksum == ltx.database_checksum(node.db_dir(db) / "database")


def test_each_commit_writes_one_ltx_file(primary: NodeProcess, tmp_path: Path) -> None:
    primary.sqlite("my.db", "CREATE TABLE t (x);")
    primary.sqlite("my.db", "INSERT INTO t VALUES (1);")
    primary.sqlite("my.db", "INSERT INTO t VALUES (2);")

    names = [p.name for p in primary.ltx_files("my.db")]
    assert names == [
        "0000000000000001-0000000000000001.ltx",
        "0000000000000002-0000000000000002.ltx",
        "0000000000000003-0000000000000003.ltx",
    ]
    assert position_of(primary, "my.db")[0] == 3
    assert_history_rebuilds(primary, "my.db", tmp_path)


def test_position_file_reads_txid_and_checksum(primary: NodeProcess) -> None:
    primary.sqlite("my.db", "CREATE TABLE t (x);")
    text = (primary.mount_dir / "my.db-pos").read_text()
    assert text.endswith("\n")
    txid, checksum = text.strip().split("/")
    assert len(txid) == len(checksum) == 16
    assert int(txid, 16) == 1
    assert int(checksum, 16) == ltx.database_checksum(primary.db_dir("my.db") / "database")


def test_position_file_looked_up_before_its_database_exists_appears_with_it(
    primary: NodeProcess,
) -> None:
    position = primary.mount_dir / "late.db-pos"
    assert not position.exists()  # the kernel may now cache the name as missing
    primary.sqlite("late.db", "CREATE TABLE t (x);")
    assert position.read_text().startswith("0000000000000001/")


@pytest.mark.parametrize("mode", ["DELETE", "TRUNCATE", "PERSIST"])
def test_rollback_journal_modes_are_captured(
    primary: NodeProcess, tmp_path: Path, mode: str
) -> None:
    primary.sqlite("my.db", f"PRAGMA journal_mode={mode}; CREATE TABLE t (x);")
    conn = sqlite3.connect(primary.mount_dir / "my.db", isolation_level=None)
    conn.execute(f"PRAGMA journal_mode={mode}")
    for i in range(20):
        conn.execute("INSERT INTO t VALUES (?)", (i,))
    conn.close()
    assert position_of(primary, "my.db")[0] == 21
    assert_history_rebuilds(primary, "my.db", tmp_path)


def test_rolled_back_transaction_writes_no_ltx_file(primary: NodeProcess, tmp_path: Path) -> None:
    primary.sqlite("my.db", "CREATE TABLE t (x);")
    conn = sqlite3.connect(primary.mount_dir / "my.db", isolation_level=None)
    conn.execute("PRAGMA cache_size=1")  # spill pages to the file before the rollback
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t VALUES (?)", [(b"x" * 1000,) for _ in range(200)])
    conn.execute("ROLLBACK")
    conn.close()
    assert position_of(primary, "my.db")[0] == 1
    assert len(primary.ltx_files("my.db")) == 1
    assert_history_rebuilds(primary, "my.db", tmp_path)


def test_savepoints_commit_as_one_transaction(primary: NodeProcess, tmp_path: Path) -> None:
    primary.sqlite(
        "my.db",
        """
        CREATE TABLE t (x);
        BEGIN;
        INSERT INTO t VALUES (1);
        SAVEPOINT a;
        INSERT INTO t VALUES (2);
        ROLLBACK TO a;
        INSERT INTO t VALUES (3);
        RELEASE a;
        COMMIT;
        """,
    )
    assert position_of(primary, "my.db")[0] == 2
    assert primary.sqlite("my.db", "SELECT group_concat(x) FROM t;").stdout.strip() == "1,3"
    assert_history_rebuilds(primary, "my.db", tmp_path)


def test_vacuum_shrinks_the_database(primary: NodeProcess, tmp_path: Path) -> None:
    primary.sqlite(
        "my.db",
        "CREATE TABLE t (x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n "
        "WHERE i < 2000) INSERT INTO t SELECT randomblob(500) FROM n;",
    )
    before = (primary.db_dir("my.db") / "database").stat().st_size
    primary.sqlite("my.db", "DELETE FROM t WHERE rowid > 100; VACUUM;")
    after = (primary.db_dir("my.db") / "database").stat().st_size
    assert after < before
    last = primary.ltx_files("my.db")[-1]
    with open(last, "rb") as f:
        header = ltx.Decoder(f).header
    assert header.commit * header.page_size == after
    assert_history_rebuilds(primary, "my.db", tmp_path)


@pytest.mark.parametrize("page_size", [512, 1024, 4096, 16384, 65536])
def test_every_page_size_is_captured(primary: NodeProcess, tmp_path: Path, page_size: int) -> None:
    primary.sqlite(
        "my.db",
        f"PRAGMA page_size={page_size}; CREATE TABLE t (x); "
        "INSERT INTO t SELECT randomblob(3000) FROM (SELECT 1 UNION SELECT 2 UNION SELECT 3);",
    )
    primary.sqlite("my.db", "UPDATE t SET x = randomblob(100) WHERE rowid = 2;")
    with open(primary.ltx_files("my.db")[0], "rb") as f:
        assert ltx.Decoder(f).header.page_size == page_size
    assert_history_rebuilds(primary, "my.db", tmp_path)


def test_page_size_change_by_vacuum_is_captured(primary: NodeProcess, tmp_path: Path) -> None:
    primary.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES (randomblob(9000));")
    primary.sqlite("my.db", "PRAGMA page_size=8192; VACUUM;")
    assert (
        ltx.database_checksum(primary.db_dir("my.db") / "database")
        == position_of(primary, "my.db")[1]
    )
    assert_history_rebuilds(primary, "my.db", tmp_path)


def test_large_transaction_with_multi_segment_journal(primary: NodeProcess, tmp_path: Path) -> None:
    primary.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES (1);")
    conn = sqlite3.connect(primary.mount_dir / "my.db", isolation_level=None)
    conn.execute("PRAGMA cache_size=10")  # forces cache spills: several journal headers
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t VALUES (?)", [(b"y" * 800,) for _ in range(3000)])
    conn.execute("UPDATE t SET x = 2 WHERE rowid = 1")
    conn.execute("COMMIT")
    conn.close()
    assert position_of(primary, "my.db")[0] == 3
    assert_history_rebuilds(primary, "my.db", tmp_path)


@pytest.mark.slow
def test_hundred_megabyte_database(primary: NodeProcess, tmp_path: Path) -> None:
    primary.sqlite(
        "big.db",
        "CREATE TABLE t (x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n "
        "WHERE i < 100000) INSERT INTO t SELECT randomblob(1000) FROM n;",
    )
    assert (primary.db_dir("big.db") / "database").stat().st_size > 100_000_000
    primary.sqlite("big.db", "UPDATE t SET x = zeroblob(10) WHERE rowid % 1000 = 0;")
    assert_history_rebuilds(primary, "big.db", tmp_path)


def test_several_databases_and_subdirectories(primary: NodeProcess, tmp_path: Path) -> None:
    (primary.mount_dir / "tenants" / "eu").mkdir(parents=True)
    for name in ("a.db", "b.db", "tenants/eu/c.db"):
        primary.sqlite(name, f"CREATE TABLE t (x); INSERT INTO t VALUES ('{name}');")
    for name in ("a.db", "b.db", "tenants/eu/c.db"):
        assert position_of(primary, name)[0] == 2
        assert_history_rebuilds(primary, name, tmp_path)
    assert sorted(p.name for p in primary.mount_dir.iterdir()) == ["a.db", "b.db", "tenants"]
    assert (primary.mount_dir / "a.db-pos").read_text().startswith("0000000000000002/")


def test_two_processes_writing_one_database(primary: NodeProcess, tmp_path: Path) -> None:
    primary.sqlite("my.db", "CREATE TABLE t (who, i);")
    errors: list[BaseException] = []

    def writer(who: str) -> None:
        try:
            conn = sqlite3.connect(primary.mount_dir / "my.db", timeout=30, isolation_level=None)
            for i in range(100):
                conn.execute("INSERT INTO t VALUES (?, ?)", (who, i))
            conn.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in "ab"]
    shell = subprocess.Popen(
        ["sqlite3", str(primary.mount_dir / "my.db")],
        stdin=subprocess.PIPE,
        text=True,
    )
    for t in threads:
        t.start()
    assert shell.stdin is not None
    shell.stdin.write(
        ".timeout 30000\n" + "".join(f"INSERT INTO t VALUES ('c', {i});\n" for i in range(100))
    )
    shell.stdin.close()
    for t in threads:
        t.join(120)
    assert shell.wait(120) == 0
    assert not errors
    count = primary.sqlite("my.db", "SELECT count(*) FROM t;").stdout.strip()
    assert count == "300"
    assert position_of(primary, "my.db")[0] == 301
    assert_history_rebuilds(primary, "my.db", tmp_path)


def test_restart_continues_the_txid_sequence(start_node: StartNode, tmp_path: Path) -> None:
    node = start_node("primary")
    node.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES (1);")
    assert node.stop() == 0
    node.start()
    assert position_of(node, "my.db")[0] == 2
    node.sqlite("my.db", "INSERT INTO t VALUES (2);")
    assert position_of(node, "my.db")[0] == 3
    assert_history_rebuilds(node, "my.db", tmp_path)


@pytest.mark.parametrize("mode", ["OFF", "MEMORY"])
def test_journal_less_modes_are_recorded_when_the_database_is_synced(
    primary: NodeProcess, tmp_path: Path, mode: str
) -> None:
    """OFF and MEMORY keep no journal on disk: a transaction is recorded when
    SQLite syncs the database at its commit."""
    primary.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES (1);")
    conn = sqlite3.connect(primary.mount_dir / "my.db", isolation_level=None)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("INSERT INTO t VALUES (2)")
    assert position_of(primary, "my.db")[0] == 3
    conn.execute("BEGIN")
    conn.execute("INSERT INTO t VALUES (3)")
    conn.execute("ROLLBACK")
    conn.execute("INSERT INTO t VALUES (4)")
    assert position_of(primary, "my.db")[0] == 4
    conn.close()
    assert primary.sqlite("my.db", "SELECT group_concat(x) FROM t;").stdout.strip() == "1,2,4"
    assert_history_rebuilds(primary, "my.db", tmp_path)


def test_new_database_in_journal_mode_off(primary: NodeProcess, tmp_path: Path) -> None:
    primary.sqlite(
        "new.db", "PRAGMA journal_mode=OFF; CREATE TABLE t (x); INSERT INTO t VALUES (1);"
    )
    assert primary.ltx_files("new.db")
    assert_history_rebuilds(primary, "new.db", tmp_path)


def test_plain_files_are_local_and_not_replicated(primary: NodeProcess) -> None:
    notes = primary.mount_dir / "notes.txt"
    notes.write_text("hello\n")
    with open(notes, "a") as f:
        f.write("more\n")
    assert notes.read_text() == "hello\nmore\n"
    assert primary.ltx_files("notes.txt") == []
    assert (primary.mount_dir / "notes.txt-pos").read_text().startswith("0000000000000000/")


def test_database_copied_in_is_recorded_once_closed(primary: NodeProcess, tmp_path: Path) -> None:
    source = tmp_path / "outside.db"
    conn = sqlite3.connect(source)
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [(b"x" * 5000,)] * 100)
    conn.commit()
    conn.close()
    shutil.copyfile(source, primary.mount_dir / "copied.db")
    assert primary.sqlite("copied.db", "SELECT count(*) FROM t;").stdout.strip() == "100"
    primary.sqlite("copied.db", "INSERT INTO t VALUES (1);")
    assert [p.name for p in primary.ltx_files("copied.db")] == [
        "0000000000000001-0000000000000001.ltx",
        "0000000000000002-0000000000000002.ltx",
    ]
    assert_history_rebuilds(primary, "copied.db", tmp_path)


def test_database_copied_over_a_replicated_one(primary: NodeProcess, tmp_path: Path) -> None:
    primary.sqlite("my.db", "CREATE TABLE old (x); INSERT INTO old VALUES (1);")
    source = tmp_path / "outside.db"
    conn = sqlite3.connect(source)
    conn.execute("CREATE TABLE new (x)")
    conn.commit()
    conn.close()
    shutil.copyfile(source, primary.mount_dir / "my.db")  # open(O_TRUNC), then writes
    assert primary.sqlite("my.db", "SELECT name FROM sqlite_schema;").stdout.strip() == "new"
    assert position_of(primary, "my.db")[0] == 3
    assert_history_rebuilds(primary, "my.db", tmp_path)
