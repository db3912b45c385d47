"""A small process that frees the mount when the daemon dies uncleanly.

The daemon holds descriptors of files in its own mount (SQLite's locks are
taken through them). A process that exits closes its descriptors, and the
kernel writes a file's dirty cached pages back before a close returns, to
the filesystem's daemon: a daemon killed -9 while readers' pages of `-shm`
are dirty waits in its own exit for itself, for ever, unkillable, and the
mount with it. Only aborting the FUSE connection ends that wait.

So the daemon starts this watchdog once mounted, in a session of its own.
It looks at the daemon every fraction of a second; when the daemon is
dying (killed, or its exit begun) but some thread of it is still not done
after a grace period, it aborts the connection, and the exit completes. A
daemon that stops cleanly ends its watchdog before it unmounts; a daemon
that is gone (reaped, or a zombie with nothing left to close) ends it too.

Run as `python -m litefs.watchdog PID CONNECTION`; it imports nothing of
the daemon's so that it starts in milliseconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

POLL = 0.1
GRACE = 0.5
_PF_EXITING = 0x4
_SIGKILL_BIT = 1 << (9 - 1)
_DEAD = ("Z", "X")
_CONNECTIONS = Path("/sys/fs/fuse/connections")


def exiting(pid: int, proc: Path = Path("/proc")) -> bool | None:
    """Whether the process is dying (SIGKILL pending, or its exit begun)
    with a thread still not done; None when it is gone or fully exited
    (nothing left to free).

    A main thread that waits uninterruptibly on its own mount never begins
    its exit: only the pending SIGKILL tells.
    """
    process = proc / str(pid)
    try:
        state, flags = _state((process / "stat").read_text())
        status = (process / "status").read_text()
    except OSError:
        return None
    if not (flags & _PF_EXITING or _killed(status)):
        return False
    return True if state not in _DEAD or _threads_alive(process) else None


def _state(stat: str) -> tuple[str, int]:
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[6])


def _threads_alive(process: Path) -> bool:
    try:
        tasks = os.listdir(process / "task")
    except OSError:
        return False
    for tid in tasks:
        try:
            state, _ = _state((process / "task" / tid / "stat").read_text())
        except OSError:
            continue  # the thread has just gone
        if state not in _DEAD:
            return True
    return False


def _killed(status: str) -> bool:
    """Whether SIGKILL is pending for the thread or its whole process."""
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("SigPnd", "ShdPnd") and int(value, 16) & _SIGKILL_BIT:
            return True
    return False


def watch(pid: int, connection: int) -> None:
    since: float | None = None
    while True:
        time.sleep(POLL)
        verdict = exiting(pid)
        if verdict is None:
            return
        if not verdict:
            since = None
            continue
        now = time.monotonic()
        if since is None:
            since = now
        elif now - since >= GRACE:
            abort = _CONNECTIONS / str(connection) / "abort"
            try:
                abort.write_text("1")
            except OSError:
                return
            print(
                f"litefs watchdog: daemon {pid} was stuck exiting; aborted FUSE connection "
                f"{connection}",
                file=sys.stderr,
            )
            return


def start(connection: int) -> subprocess.Popen[bytes]:
    """Watch this process; stderr is shared, nothing else is inherited."""
    return subprocess.Popen(
        [sys.executable, "-m", "litefs.watchdog", str(os.getpid()), str(connection)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    """End the watchdog before a clean unmount (its connection goes away)."""
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv: list[str]) -> int:
    pid, connection = int(argv[0]), int(argv[1])
    watch(pid, connection)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
