"""Run `litefs` daemons as real processes for end-to-end tests.

Every daemon a test starts is stopped by the fixture that started it, and its
mount is detached with `fusermount3 -uz` even when the test failed, so a
broken test never leaves a mount or a process behind.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from litefs.cluster import LocalNode, free_port
from litefs.mountpoint import is_mounted

__all__ = ["NodeProcess", "free_port", "is_mounted"]


class NodeProcess(LocalNode):
    """A local node with the checks tests make on it."""

    def __init__(self, root: Path, name: str = "node1", **kwargs: Any) -> None:
        settings = kwargs.pop("settings", None) or {}
        settings.setdefault("log", {"debug": True})
        super().__init__(root, name, settings=settings, **kwargs)

    def ltx_files(self, name: str) -> list[Path]:
        """The database's LTX files in TXID order (by max TXID, then min)."""

        def txids(path: Path) -> tuple[int, int]:
            low, high = (int(part, 16) for part in path.stem.split("-"))
            return high, low

        return sorted((self.db_dir(name) / "ltx").glob("*.ltx"), key=txids)

    def sqlite(self, db: str, sql: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the real `sqlite3` shell on a database in the mount."""
        result = subprocess.run(
            ["sqlite3", "-bail", str(self.mount_dir / db)],
            input=sql,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"sqlite3 failed ({result.returncode}): {result.stderr}")
        return result
