"""The mount point as the kernel sees it: mounted or not, alive or stale."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from pathlib import Path

FUSE_CONNECTIONS = Path("/sys/fs/fuse/connections")


def is_mounted(path: Path) -> bool:
    """Whether anything is mounted at `path`, live or stale."""
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 1 and _unescape(fields[1]) == target:
                    return True
    except OSError:
        return os.path.ismount(path)
    return False


def responds(path: Path) -> bool:
    """Whether the filesystem at `path` answers; a stale FUSE mount does not.

    `stat()` may be answered from the kernel's attribute cache even after the
    daemon is gone, `statfs()` never is.
    """
    try:
        os.statvfs(path)
    except OSError:
        return False
    return True


def answers_within(path: Path, seconds: float) -> bool:
    """Whether the filesystem at `path` answers in time. A FUSE mount whose
    daemon died while one of its threads was stuck in the kernel holds its
    requests for ever: a probe of it never returns (its thread is left
    behind until the connection is aborted)."""
    answered = threading.Event()

    def probe() -> None:
        with contextlib.suppress(OSError):
            os.statvfs(path)
        answered.set()

    threading.Thread(target=probe, name="litefs-mount-probe", daemon=True).start()
    return answered.wait(seconds)


def fuse_connection(path: Path) -> int | None:
    """The kernel's id of the FUSE connection mounted at `path` (its device
    minor), read from the mount table without touching the mount."""
    target = os.path.realpath(path)
    found = None
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as table:
        for line in table:
            fields = line.split()
            kind = line.split(" - ", 1)[-1].split()[0] if " - " in line else ""
            if len(fields) > 4 and _unescape(fields[4]) == target and kind.startswith("fuse"):
                found = int(fields[2].split(":")[1])
    return found


def abort_connection(connection: int) -> None:
    """Fail every request pending on a FUSE connection and every later one."""
    if not (FUSE_CONNECTIONS / str(connection)).exists():
        subprocess.run(
            ["mount", "-t", "fusectl", "none", str(FUSE_CONNECTIONS)],
            capture_output=True,
            check=False,
        )
    with contextlib.suppress(OSError):
        (FUSE_CONNECTIONS / str(connection) / "abort").write_text("1")


def unmount(path: Path) -> None:
    """Detach the mount at `path` even if something still uses it."""
    subprocess.run(
        ["fusermount3", "-u", "-z", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=60,
    )


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
