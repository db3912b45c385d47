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

It also wakes a daemon whose request loop is stuck. pyfuse3 waits for
the FUSE device to become readable, then reads it while holding the GIL.
A request withdrawn in between (its process killed while the daemon was
stopped) leaves that read blocked until the next request, and every
other thread of the daemon (HTTP, lease, replication) waits with it. The
watchdog sees the main thread sitting in that read and sends the missing
request: a lookup of a name that does not exist.

Run as `python -m litefs.watchdog PID CONNECTION MOUNT`; it imports
nothing of the daemon's so that it starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

POLL = 0.1
GRACE = 0.5
STUCK_READ = 0.3
_READ = {"x86_64": "0", "aarch64": "63", "i686": "3", "armv7l": "3"}.get(platform.machine(), "0")
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


def reading_fuse(pid: int, proc: Path = Path("/proc")) -> bool:
    """Whether the main thread is blocked in read() on the FUSE device.

    A healthy daemon reads the device only once it is readable, so the
    read returns at once; one seen there twice in a row waits for a
    request that was withdrawn.
    """
    try:
        fields = (proc / str(pid) / "task" / str(pid) / "syscall").read_text().split()
    except OSError:
        return False
    if len(fields) < 2 or fields[0] != _READ:
        return False  # "running", or another system call
    try:
        return os.readlink(proc / str(pid) / "fd" / str(int(fields[1], 16))) == "/dev/fuse"
    except (OSError, ValueError):
        return False


class Waker:
    """Sends the mount one request at a time: the lookup runs in a thread,
    since it waits for the daemon (which may be stopped, not stuck)."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.sent = 0
        self._pending: threading.Thread | None = None

    def wake(self) -> bool:
        if self._pending is not None and self._pending.is_alive():
            return False
        self.sent += 1
        name = self.mount / f".litefs-wake-{os.getpid()}-{self.sent}"
        self._pending = threading.Thread(target=_look_up, args=(name,), daemon=True)
        self._pending.start()
        return True


def _look_up(path: Path) -> None:
    with contextlib.suppress(OSError):  # it does not exist: an answer is all it asks
        os.stat(path)


def watch(pid: int, connection: int, mount: Path | None = None, proc: Path = Path("/proc")) -> None:
    since: float | None = None
    reading_since: float | None = None
    waker = Waker(mount) if mount is not None else None
    while True:
        time.sleep(POLL)
        verdict = exiting(pid, proc)
        if verdict is None:
            return
        if not verdict:
            since = None
            if waker is not None:
                reading_since = _wake_if_stuck(pid, proc, waker, reading_since)
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


def _wake_if_stuck(pid: int, proc: Path, waker: Waker, since: float | None) -> float | None:
    """When the read has lasted STUCK_READ, wake the daemon; the time the
    read was first seen, or None when the main thread is elsewhere."""
    if not reading_fuse(pid, proc):
        return None
    now = time.monotonic()
    if since is None:
        return now
    if now - since >= STUCK_READ and waker.wake():
        print(
            f"litefs watchdog: daemon {pid} sat in a read of its FUSE device for "
            f"{now - since:.1f}s holding its other threads; sent it a request",
            file=sys.stderr,
        )
        return None
    return since


def start(connection: int, mount: Path) -> subprocess.Popen[bytes]:
    """Watch this process; stderr is shared, nothing else is inherited."""
    return subprocess.Popen(
        [sys.executable, "-m", "litefs.watchdog", str(os.getpid()), str(connection), str(mount)],
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
    watch(pid, connection, Path(argv[2]) if len(argv) > 2 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
