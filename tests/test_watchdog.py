"""The watchdog tells a daemon stuck in its own exit from one at work or gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from litefs import watchdog


def test_a_running_process_is_not_exiting() -> None:
    assert watchdog.exiting(os.getpid()) is False


def test_a_zombie_and_a_reaped_process_leave_nothing_to_free() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while watchdog.exiting(child.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)  # exits, and stays a zombie until waited for
    assert watchdog.exiting(child.pid) is None
    child.wait()
    assert watchdog.exiting(child.pid) is None


def test_the_watchdog_ends_with_the_process_it_watches() -> None:
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    guard = subprocess.Popen([sys.executable, "-m", "litefs.watchdog", str(watched.pid), "0"])
    watched.wait()
    assert guard.wait(10) == 0


def fake_thread(proc: Path, pid: int, tid: int, state: str, flags: int, pending: int = 0) -> None:
    stat = f"{tid} (py thread) {state} 1 {pid} {pid} 0 -1 {flags} 0 0\n"
    status = f"Name:\tpython\nSigPnd:\t{pending:016x}\nShdPnd:\t0000000000000000\n"
    task = proc / str(pid) / "task" / str(tid)
    task.mkdir(parents=True)
    places = [task, proc / str(pid)] if tid == pid else [task]  # /proc/PID is the main thread
    for place in places:
        (place / "stat").write_text(stat)
        (place / "status").write_text(status)


SIGKILL = 1 << 8
PF_EXITING = 0x4


def test_a_thread_that_cannot_take_its_sigkill_marks_the_process_stuck(tmp_path: Path) -> None:
    # The main thread waits uninterruptibly on its own mount: it never
    # begins its exit, and only the pending SIGKILL tells.
    fake_thread(tmp_path, 100, 100, "D", 0, pending=SIGKILL)
    fake_thread(tmp_path, 100, 101, "S", 0)
    assert watchdog.exiting(100, tmp_path) is True


def test_an_exited_main_thread_with_another_stuck_marks_the_process_stuck(tmp_path: Path) -> None:
    fake_thread(tmp_path, 100, 100, "Z", PF_EXITING)
    fake_thread(tmp_path, 100, 102, "D", 0, pending=SIGKILL)
    assert watchdog.exiting(100, tmp_path) is True


def test_threads_at_work_without_a_kill_are_not_exiting(tmp_path: Path) -> None:
    fake_thread(tmp_path, 100, 100, "S", 0)
    fake_thread(tmp_path, 100, 101, "D", 0)
    assert watchdog.exiting(100, tmp_path) is False
