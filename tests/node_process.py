"""Run `litefs` daemons as real processes for end-to-end tests.

Every daemon a test starts is stopped by the fixture that started it, and its
mount is detached with `fusermount3 -uz` even when the test failed, so a
broken test never leaves a mount or a process behind.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

from litefs import ltx, walfile
from litefs.mountpoint import is_mounted
from localcluster import LocalNode, free_port

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

    def committed_database(self, name: str) -> bytes:
        """The database's committed content: its file overlaid with the
        transactions its WAL holds, as SQLite reads it."""
        directory = self.db_dir(name)
        data = bytearray((directory / "database").read_bytes())
        try:
            wal = (directory / "wal").read_bytes()
            header = walfile.parse_header(wal)
        except (FileNotFoundError, walfile.WalFormatError):
            return bytes(data)
        chain = walfile.FrameChain(header)
        size = header.page_size
        for frames in walfile.transactions(chain, memoryview(wal)[walfile.HEADER_SIZE :]):
            for frame in frames:
                offset = (frame.pgno - 1) * size
                if len(data) < offset + size:
                    data.extend(bytes(offset + size - len(data)))
                data[offset : offset + size] = wal[frame.data_offset : frame.data_offset + size]
            commit = frames[-1].commit * size
            del data[commit:]
            data.extend(bytes(commit - len(data)))
        return bytes(data)

    def committed_checksum(self, name: str) -> int:
        """The database checksum of `committed_database`."""
        data = self.committed_database(name)
        if not data:
            return ltx.CHECKSUM_FLAG
        page_size = ltx.sqlite_page_size(data)
        return ltx.checksum_of(
            ltx.page_checksums(io.BytesIO(data), page_size, len(data) // page_size)
        )

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
