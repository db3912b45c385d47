"""Whole databases in and out: `litefs import` (POST /import), `litefs export`
(GET /export), and a database file copied into the mount."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import litefs_cli
from node_process import NodeProcess
from test_replication import position, wait_caught_up

from litefs import ltx
from litefs.db import Database
from litefs.position import Position

pytestmark = pytest.mark.fuse


def make_database(path: Path, rows: int, *, value: str = "v", page_size: int = 4096) -> Path:
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA page_size={page_size}")
    conn.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, v TEXT)")
    conn.executemany("INSERT INTO t (v) VALUES (?)", [(f"{value}{i}",) for i in range(rows)])
    conn.commit()
    conn.close()
    return path


def count(node: NodeProcess, db: str) -> str:
    return node.sqlite(db, "SELECT count(*), max(v) FROM t;").stdout.strip()


def test_import_creates_a_database_that_replicas_receive(
    pair: tuple[NodeProcess, NodeProcess], tmp_path: Path
) -> None:
    primary, replica = pair
    source = make_database(tmp_path / "src.db", 5000)
    result = litefs_cli("import", "-name", "app.db", str(source), "-url", primary.url)
    assert "imported as app.db at TXID 0000000000000001/" in result.stdout
    assert count(primary, "app.db") == "5000|v999"
    wait_caught_up(primary, replica, "app.db")
    assert count(replica, "app.db") == "5000|v999"
    assert [p.name for p in primary.ltx_files("app.db")] == [ltx.format_filename(1, 1)]


def test_an_imported_file_becomes_the_database_with_one_snapshot_that_rebuilds_it(
    tmp_path: Path,
) -> None:
    source = make_database(tmp_path / "src.db", 3000)
    contents = source.read_bytes()
    db = Database.from_sqlite_file("app.db", tmp_path / "dbs" / "app.db", source)
    try:
        assert not source.exists()  # moved, not copied
        assert db.database_path.read_bytes() == contents
        files = db.ltx_files()
        assert [path.name for _, _, path in files] == [ltx.format_filename(1, 1)]
        rebuilt = tmp_path / "rebuilt.db"
        fd = os.open(rebuilt, os.O_RDWR | os.O_CREAT)
        try:
            with open(files[0][2], "rb") as f:
                _, trailer = ltx.apply_file(f, fd, sync=False)
        finally:
            os.close(fd)
        assert rebuilt.read_bytes() == contents
        assert db.position == Position(1, trailer.post_apply_checksum)
        assert db.checksum == ltx.database_checksum(db.database_path)
    finally:
        db.close()


def test_import_replaces_a_database_as_one_snapshot_under_open_connections(
    pair: tuple[NodeProcess, NodeProcess], tmp_path: Path
) -> None:
    primary, replica = pair
    primary.sqlite("app.db", "CREATE TABLE t (n INTEGER PRIMARY KEY, v TEXT);")
    for i in range(3):
        primary.sqlite("app.db", f"INSERT INTO t (v) VALUES ('old{i}');")
    wait_caught_up(primary, replica, "app.db")
    readers = [sqlite3.connect(node.mount_dir / "app.db") for node in (primary, replica)]
    for reader in readers:
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (3,)
    source = make_database(tmp_path / "src.db", 100, value="new")
    litefs_cli("import", "-name", "app.db", str(source), "-url", primary.url)
    wait_caught_up(primary, replica, "app.db")
    files = primary.ltx_files("app.db")
    assert [p.name for p in files] == [ltx.format_filename(1, 5)]
    for reader in readers:
        assert reader.execute("SELECT count(*), max(v) FROM t").fetchone() == (100, "new99")
        reader.close()
    assert count(replica, "app.db") == "100|new99"


def test_import_into_a_wal_database_is_seen_by_its_connections(
    pair: tuple[NodeProcess, NodeProcess], tmp_path: Path
) -> None:
    primary, replica = pair
    primary.sqlite(
        "wal.db", "PRAGMA journal_mode=WAL; CREATE TABLE t (n INTEGER PRIMARY KEY, v TEXT);"
    )
    primary.sqlite("wal.db", "INSERT INTO t (v) VALUES ('old');")
    reader = sqlite3.connect(primary.mount_dir / "wal.db")
    assert reader.execute("SELECT count(*) FROM t").fetchone() == (1,)
    source = make_database(tmp_path / "src.db", 50, value="new")
    litefs_cli("import", "-name", "wal.db", str(source), "-url", primary.url)
    assert reader.execute("SELECT count(*), max(v) FROM t").fetchone() == (50, "new9")
    reader.close()
    primary.sqlite("wal.db", "INSERT INTO t (v) VALUES ('after');")
    wait_caught_up(primary, replica, "wal.db")
    assert count(replica, "wal.db") == "51|new9"


def test_import_on_a_replica_is_refused_naming_the_primary(
    pair: tuple[NodeProcess, NodeProcess], tmp_path: Path
) -> None:
    primary, replica = pair
    source = make_database(tmp_path / "src.db", 10)
    result = litefs_cli("import", "-name", "app.db", str(source), "-url", replica.url, check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "this node is a replica; the primary is primary at " + primary.url in result.stderr
    assert not (replica.mount_dir / "app.db").exists()
    assert not (primary.mount_dir / "app.db").exists()


def corrupt(path: Path) -> Path:
    """A database whose table's page is overwritten: integrity_check fails."""
    data = bytearray(path.read_bytes())
    data[4096 + 8 : 4096 + 400] = bytes(range(256)) + bytes(136)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_text("not a database\n" * 100) or p, "not a SQLite database"),
        (lambda p: corrupt(make_database(p, 2000)), "integrity_check"),
        (
            lambda p: p.write_bytes(make_database(p, 10).read_bytes()[:6000]) or p,
            "not a whole number of 4096-byte pages",
        ),
    ],
    ids=["text-file", "corrupt-database", "truncated-database"],
)
def test_a_bad_file_changes_nothing(
    pair: tuple[NodeProcess, NodeProcess], tmp_path: Path, make: object, reason: str
) -> None:
    primary, _ = pair
    primary.sqlite("app.db", "CREATE TABLE t (n INTEGER PRIMARY KEY, v TEXT);")
    before = position(primary, "app.db")
    source = tmp_path / "bad.db"
    make(source)  # type: ignore[operator]
    for name in ("app.db", "other.db"):
        result = litefs_cli("import", "-name", name, str(source), "-url", primary.url, check=False)
        assert result.returncode == 1
        assert reason in result.stderr and "nothing was changed" in result.stderr
        assert result.stderr.count("\n") == 1
    assert position(primary, "app.db") == before
    assert not (primary.mount_dir / "other.db").exists()
    assert not list((primary.data_dir / "tmp").iterdir())


def test_import_refuses_reserved_and_malformed_names(
    pair: tuple[NodeProcess, NodeProcess], tmp_path: Path
) -> None:
    primary, _ = pair
    source = make_database(tmp_path / "src.db", 10)
    for name in (".primary", ".lag", "bar-pos", "../escape.db"):
        result = litefs_cli("import", "-name", name, str(source), "-url", primary.url, check=False)
        assert result.returncode == 1, name
        assert "import refused (400)" in result.stderr


def test_export_writes_a_consistent_copy_from_any_node(
    pair: tuple[NodeProcess, NodeProcess], tmp_path: Path
) -> None:
    primary, replica = pair
    primary.sqlite(
        "app.db", "PRAGMA journal_mode=WAL; CREATE TABLE t (n INTEGER PRIMARY KEY, v TEXT);"
    )
    primary.sqlite("app.db", "INSERT INTO t (v) SELECT 'x' || value FROM generate_series(1, 3000);")
    wait_caught_up(primary, replica, "app.db")
    checksum = int(position(primary, "app.db").split("/")[1], 16)
    for node in (primary, replica):
        out = tmp_path / f"export-{node.name}" / "copy.db"
        out.parent.mkdir()
        result = litefs_cli("export", "-name", "app.db", str(out), "-url", node.url)
        assert result.stdout.startswith(f"{out}: copy of app.db at ")
        assert [p.name for p in out.parent.iterdir()] == ["copy.db"]
        assert ltx.database_checksum(out) == checksum
        with sqlite3.connect(out) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (3000,)


def test_export_of_an_unknown_database_leaves_nothing(
    pair: tuple[NodeProcess, NodeProcess], tmp_path: Path
) -> None:
    primary, _ = pair
    out = tmp_path / "out" / "copy.db"
    out.parent.mkdir()
    result = litefs_cli("export", "-name", "nope.db", str(out), "-url", primary.url, check=False)
    assert result.returncode == 1
    assert "export refused (404): no database named 'nope.db'" in result.stderr
    assert not list(out.parent.iterdir())


def test_import_is_a_post_with_a_name(pair: tuple[NodeProcess, NodeProcess]) -> None:
    primary, _ = pair
    for url, method in (
        (f"{primary.url}/import", "POST"),
        (f"{primary.url}/import?name=a.db", "GET"),
    ):
        request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code in (400, 405)


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_a_database_copied_into_the_mount_replicates_once_closed(
    pair: tuple[NodeProcess, NodeProcess], tmp_path: Path, journal_mode: str
) -> None:
    primary, replica = pair
    source = make_database(tmp_path / "src.db", 3000)
    with sqlite3.connect(source) as conn:
        conn.execute(f"PRAGMA journal_mode={journal_mode}")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    subprocess.run(["cp", str(source), str(primary.mount_dir / "new.db")], check=True, timeout=60)
    assert count(primary, "new.db") == "3000|v999"
    wait_caught_up(primary, replica, "new.db")
    assert count(replica, "new.db") == "3000|v999"


def test_copying_a_database_into_a_replica_is_refused_leaving_nothing(
    pair: tuple[NodeProcess, NodeProcess], tmp_path: Path
) -> None:
    _, replica = pair
    source = make_database(tmp_path / "src.db", 10)
    result = subprocess.run(
        ["cp", str(source), str(replica.mount_dir / "new.db")], capture_output=True, timeout=60
    )
    assert result.returncode != 0
    assert b"Read-only file system" in result.stderr
    assert not (replica.mount_dir / "new.db").exists()
    assert not (replica.mount_dir / "new.db-pos").exists()


def test_a_database_copied_over_an_existing_one_replicates(
    pair: tuple[NodeProcess, NodeProcess], tmp_path: Path
) -> None:
    primary, replica = pair
    primary.sqlite("app.db", "CREATE TABLE t (n INTEGER PRIMARY KEY, v TEXT);")
    primary.sqlite("app.db", "INSERT INTO t (v) SELECT 'old' FROM generate_series(1, 5000);")
    wait_caught_up(primary, replica, "app.db")
    source = make_database(tmp_path / "src.db", 300, value="new")
    subprocess.run(["cp", str(source), str(primary.mount_dir / "app.db")], check=True, timeout=60)
    assert count(primary, "app.db") == "300|new99"
    wait_caught_up(primary, replica, "app.db")
    assert count(replica, "app.db") == "300|new99"


def test_import_of_a_wal_file_with_another_page_size_replaces_the_database(
    pair: tuple[NodeProcess, NodeProcess], tmp_path: Path
) -> None:
    primary, replica = pair
    primary.sqlite("app.db", "CREATE TABLE t (n INTEGER PRIMARY KEY, v TEXT);")
    primary.sqlite("app.db", "INSERT INTO t (v) VALUES ('old');")
    wait_caught_up(primary, replica, "app.db")
    source = make_database(tmp_path / "src.db", 700, value="new", page_size=1024)
    with sqlite3.connect(source) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    litefs_cli("import", "-name", "app.db", str(source), "-url", primary.url)
    wait_caught_up(primary, replica, "app.db")
    for node in (primary, replica):
        assert node.sqlite("app.db", "PRAGMA page_size;").stdout.strip() == "1024"
        assert node.sqlite("app.db", "PRAGMA journal_mode;").stdout.strip() == "wal"
        assert count(node, "app.db") == "700|new99"
    primary.sqlite("app.db", "INSERT INTO t (v) VALUES ('z');")
    wait_caught_up(primary, replica, "app.db")
    assert count(replica, "app.db") == "701|z"
