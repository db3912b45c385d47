"""The watchdog tells a daemon stuck in its own exit from one at work or gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time

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
