"""`litefs ltx ...` as an operator runs it: output, exit status, and one-line errors."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from litefs import ltx

GOLDEN = Path(__file__).resolve().parent / "data" / "ltx" / "ps4096"
FILES = [GOLDEN / ltx.format_filename(n, n) for n in (1, 2, 3)]


def run(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "litefs", "ltx", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A scratch copy of the golden files, so a test can never change the reference files."""
    for path in GOLDEN.iterdir():
        shutil.copyfile(path, tmp_path / path.name)
    return tmp_path


def test_verify_prints_ok_per_file() -> None:
    result = run("verify", *FILES)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{p}: ok" for p in FILES]
    assert result.stderr == ""


def test_verify_reports_each_failure_on_one_line(work: Path) -> None:
    damaged = work / "damaged.ltx"
    data = bytearray(FILES[1].read_bytes())
    data[-3] ^= 0x40
    damaged.write_bytes(bytes(data))
    garbage = work / "garbage.ltx"
    garbage.write_bytes(os.urandom(300))
    result = run("verify", FILES[0], damaged, garbage, work / "missing.ltx", work, FILES[2])
    assert result.returncode == 1
    assert result.stdout.splitlines() == [f"{FILES[0]}: ok", f"{FILES[2]}: ok"]
    errors = result.stderr.splitlines()
    assert len(errors) == 4
    assert errors[0].startswith(f"{damaged}: file checksum mismatch: expected ")
    assert errors[1].startswith(f"{garbage}: bad magic")
    assert errors[2] == f"{work / 'missing.ltx'}: No such file or directory"
    assert errors[3] == f"{work}: Is a directory"
    assert "Traceback" not in result.stderr


def test_verify_needs_a_file() -> None:
    result = run("verify")
    assert result.returncode == 2
    assert_one_line_error(result, "FILE")


def test_list_prints_a_header_and_one_line_per_file() -> None:
    result = run("list", *FILES)
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert lines[0] == [
        "file",
        "min_txid",
        "max_txid",
        "commit",
        "pages",
        "preapply",
        "postapply",
        "timestamp",
        "wal_offset",
        "wal_size",
        "wal_salt",
    ]
    assert lines[1] == [
        str(FILES[0]),
        "0000000000000001",
        "0000000000000001",
        "7",
        "7",
        "0000000000000000",
        "9f3a9a157b665d91",
        "2023-11-14T22:13:20.001Z",
        "0",
        "0",
        "00000000 00000000",
    ]
    assert lines[3][1:8] == [
        "0000000000000003",
        "0000000000000003",
        "4",
        "4",
        "c04c3566dc7d3e2f",
        "e76ad77cfb74a41a",
        "2023-11-14T22:13:20.003Z",
    ]


def test_list_reports_bad_files_and_fails(work: Path) -> None:
    short = work / "short.ltx"
    short.write_bytes(FILES[0].read_bytes()[:500])
    result = run("list", FILES[0], short)
    assert result.returncode == 1
    assert len(result.stdout.splitlines()) == 2
    assert_one_line_error(result, str(short), "unexpected end of file at offset")


def test_dump_shows_header_pages_and_trailer() -> None:
    result = run("dump", FILES[2])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "page size:          4096" in out
    assert "pre-apply checksum: c04c3566dc7d3e2f" in out
    assert "timestamp:          2023-11-14T22:13:20.003Z (1700000000003)" in out
    pages = [line for line in out.splitlines() if ": offset " in line]
    assert len(pages) == 4
    assert pages[0].startswith("  page 1: offset 100, 162 bytes in the file, checksum ")
    assert "post-apply checksum: e76ad77cfb74a41a" in out
    assert "file checksum:       d91451166482c911" in out


def test_dump_of_a_damaged_file_ends_with_the_error(work: Path) -> None:
    damaged = work / "damaged.ltx"
    data = bytearray(FILES[0].read_bytes())
    data[-20] ^= 1
    damaged.write_bytes(bytes(data))
    result = run("dump", damaged)
    assert result.returncode == 1
    assert "page 7" in result.stdout
    assert_one_line_error(result, str(damaged))


def test_checksum_prints_the_database_checksum() -> None:
    for n, expected in ((1, "9f3a9a157b665d91"), (3, "e76ad77cfb74a41a")):
        result = run("checksum", GOLDEN / f"db-{n}.sqlite")
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected + "\n"


def test_checksum_errors(work: Path) -> None:
    assert_one_line_error(run("checksum", work / "nope.db"), "No such file or directory")
    assert_one_line_error(run("checksum", work), "Is a directory")
    assert_one_line_error(run("checksum", FILES[0]), "not a SQLite database")


def test_apply_creates_the_database_from_a_snapshot(work: Path) -> None:
    db = work / "new.db"
    result = run("apply", "-db", db, *FILES)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3
    assert db.read_bytes() == (GOLDEN / "db-3.sqlite").read_bytes()


def test_apply_accepts_the_double_dash_flag(work: Path) -> None:
    db = work / "new.db"
    result = run("apply", "--db", db, *FILES[:2])
    assert result.returncode == 0, result.stderr
    assert db.read_bytes() == (GOLDEN / "db-2.sqlite").read_bytes()


def test_apply_refuses_a_mismatched_file_leaving_the_database_untouched(work: Path) -> None:
    db = work / "db-1.sqlite"
    before = db.read_bytes()
    result = run("apply", "-db", db, FILES[2])
    assert_one_line_error(result, str(FILES[2]), "pre-apply checksum mismatch")
    assert result.returncode == 1
    assert db.read_bytes() == before


def test_apply_stops_at_the_first_bad_file(work: Path) -> None:
    db = work / "db-1.sqlite"
    result = run("apply", "-db", db, FILES[1], FILES[1], FILES[2])
    assert result.returncode == 1
    assert len(result.stdout.splitlines()) == 1
    assert_one_line_error(result, "pre-apply checksum mismatch")
    assert db.read_bytes() == (GOLDEN / "db-2.sqlite").read_bytes()


def test_apply_refuses_to_overwrite_a_file_that_is_not_a_database(work: Path) -> None:
    notes = work / "notes.txt"
    notes.write_text("my notes\n")
    assert_one_line_error(run("apply", "-db", notes, FILES[0]), "not a SQLite database", "-force")
    assert notes.read_text() == "my notes\n"


def test_apply_refuses_a_snapshot_over_an_unrelated_database(work: Path) -> None:
    db = work / "db-3.sqlite"
    before = db.read_bytes()
    assert_one_line_error(run("apply", "-db", db, FILES[0]), "replace this database whole")
    assert db.read_bytes() == before


def test_apply_with_force_replaces_the_file(work: Path) -> None:
    notes = work / "notes.txt"
    notes.write_text("my notes\n")
    result = run("apply", "-force", "-db", notes, *FILES)
    assert result.returncode == 0, result.stderr
    assert notes.read_bytes() == (GOLDEN / "db-3.sqlite").read_bytes()


def test_apply_will_not_create_a_database_from_a_change(work: Path) -> None:
    db = work / "new.db"
    result = run("apply", "-db", db, FILES[1])
    assert_one_line_error(result, "not a snapshot")
    assert not db.exists()


def test_apply_removes_a_database_it_created_when_the_first_file_is_bad(work: Path) -> None:
    damaged = work / "damaged.ltx"
    data = bytearray(FILES[0].read_bytes())
    data[-1] ^= 1
    damaged.write_bytes(bytes(data))
    db = work / "new.db"
    assert_one_line_error(run("apply", "-db", db, damaged), "file checksum mismatch")
    assert not db.exists()


def test_apply_usage_and_file_errors(work: Path) -> None:
    result = run("apply", FILES[0])
    assert result.returncode == 2
    assert_one_line_error(result, "-db")
    assert_one_line_error(run("apply", "-db", work, FILES[0]), "Is a directory")
    assert_one_line_error(
        run("apply", "-db", work / "x.db", work / "missing.ltx"), "No such file or directory"
    )
    assert not (work / "x.db").exists()


def test_encode_db_writes_a_snapshot(work: Path) -> None:
    out = work / "snap.ltx"
    result = run("encode-db", GOLDEN / "db-2.sqlite", "-o", out, "-timestamp", "1700000000002")
    assert result.returncode == 0, result.stderr
    with open(out, "rb") as f:
        header, trailer = ltx.verify(f)
    assert header.is_snapshot
    assert header.timestamp == 1_700_000_000_002
    assert trailer.post_apply_checksum == ltx.database_checksum(GOLDEN / "db-2.sqlite")
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []
    db = work / "restored.db"
    assert run("apply", "-db", db, out).returncode == 0
    assert db.read_bytes() == (GOLDEN / "db-2.sqlite").read_bytes()


def test_encode_db_accepts_double_dash_flags(work: Path) -> None:
    out = work / "snap.ltx"
    result = run("encode-db", GOLDEN / "db-1.sqlite", "--o", out, "--timestamp", "5")
    assert result.returncode == 0, result.stderr
    with open(out, "rb") as f:
        assert ltx.verify(f)[0].timestamp == 5


def test_encode_db_errors_leave_nothing_behind(work: Path) -> None:
    out = work / "snap.ltx"
    assert_one_line_error(run("encode-db", work / "nope.db", "-o", out), "No such file")
    assert_one_line_error(run("encode-db", FILES[0], "-o", out), "not a SQLite database")
    assert_one_line_error(run("encode-db", work, "-o", out), "Is a directory")
    assert_one_line_error(
        run("encode-db", GOLDEN / "db-1.sqlite", "-o", work / "no" / "x.ltx"),
        f"{work / 'no' / 'x.ltx'}: No such file",
    )
    usage = run("encode-db", GOLDEN / "db-1.sqlite", "-o", out, "-timestamp", "-3")
    assert usage.returncode == 2
    assert_one_line_error(usage, "timestamp")
    assert_one_line_error(run("encode-db", GOLDEN / "db-1.sqlite"), "-o")
    assert not out.exists()
    assert sorted(p.name for p in work.iterdir()) == sorted(p.name for p in GOLDEN.iterdir())


def _without_permission_override() -> None:
    """Drop root's power to ignore file modes (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    for capability in (1, 2):
        if libc.prctl(pr_capbset_drop, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_permission_denied_is_one_line(work: Path) -> None:
    locked = work / "locked.ltx"
    shutil.copyfile(FILES[0], locked)
    locked.chmod(0)
    db = work / "locked.db"
    shutil.copyfile(GOLDEN / "db-1.sqlite", db)
    db.chmod(0o444)
    for args in (
        ("verify", locked),
        ("list", locked),
        ("dump", locked),
        ("checksum", locked),
        ("apply", "-db", db, FILES[1]),
        ("encode-db", locked, "-o", work / "out.ltx"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "litefs", "ltx", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=_without_permission_override if os.geteuid() == 0 else None,
        )
        assert_one_line_error(result, "Permission denied")
    assert db.read_bytes() == (GOLDEN / "db-1.sqlite").read_bytes()


def test_ltx_without_a_command_is_a_usage_error() -> None:
    result = run()
    assert result.returncode == 2
    assert_one_line_error(result)
