"""The mount point as the kernel sees it: mounted or not, alive or stale."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


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
