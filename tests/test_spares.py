"""Spare files: commits rename a file made ahead of time instead of creating one."""

from __future__ import annotations

import time
from pathlib import Path

from litefs.spares import KEEP, PREFIX, SpareFiles


def spares_in(directory: Path) -> list[Path]:
    return sorted(directory.glob(PREFIX + "*"))


def wait_for_spares(directory: Path, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(spares_in(directory)) < count:
        assert time.monotonic() < deadline, "spares were not made"
        time.sleep(0.01)


def test_spares_are_made_in_the_background_and_taken(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path)
    spares.adopt()
    wait_for_spares(tmp_path, KEEP)
    taken = spares.take()
    assert taken is not None and taken.exists()
    taken.rename(tmp_path / "0000000000000001-0000000000000001.ltx")
    assert len(spares_in(tmp_path)) == KEEP - 1


def test_taken_spares_are_made_again_in_one_batch_once_half_are_gone(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path)
    spares.adopt()
    wait_for_spares(tmp_path, KEEP)
    for txid in range(1, KEEP // 2):
        taken = spares.take()
        assert taken is not None
        taken.rename(tmp_path / f"{txid:016x}-{txid:016x}.ltx")
    time.sleep(0.2)
    assert len(spares_in(tmp_path)) == KEEP - (KEEP // 2 - 1)  # not yet: more than half left
    taken = spares.take()
    assert taken is not None
    taken.unlink()
    wait_for_spares(tmp_path, KEEP)


def test_none_is_ready_at_first_so_the_caller_creates_its_file(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path, keep=0)
    assert spares.take() is None


def test_spares_left_by_a_previous_run_are_replaced(tmp_path: Path) -> None:
    left = [tmp_path / f"{PREFIX}{n:04d}" for n in range(KEEP + 3)]
    for path in left:
        path.write_bytes(b"half an LTX file")
    SpareFiles(tmp_path).adopt()
    wait_for_spares(tmp_path, KEEP)
    assert not any(path.exists() for path in left)
    assert all(path.stat().st_size == 0 for path in spares_in(tmp_path))


def test_close_removes_the_spares(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path)
    spares.adopt()
    wait_for_spares(tmp_path, KEEP)
    spares.close()
    assert spares_in(tmp_path) == []
    spares.refill()
    assert spares_in(tmp_path) == []
