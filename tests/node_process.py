"""Run `litefs` daemons as real processes for end-to-end tests.

Every daemon a test starts is stopped by the fixture that started it, and its
mount is detached with `fusermount3 -uz` even when the test failed, so a
broken test never leaves a mount or a process behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MOUNT_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        return any(line.split()[1] == target for line in mounts if len(line.split()) > 1)


def _responds(path: Path) -> bool:
    """A stale mount left by a killed daemon is listed but fails every call."""
    try:
        os.statvfs(path)
    except OSError:
        return False
    return True


def force_unmount(path: Path) -> None:
    subprocess.run(
        ["fusermount3", "-u", "-z", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=30,
    )


class NodeProcess:
    """One `litefs mount` process with its own mount, data dir and port."""

    def __init__(
        self,
        root: Path,
        name: str = "node1",
        *,
        candidate: bool = True,
        primary: NodeProcess | None = None,
        env: dict[str, str] | None = None,
        settings: dict | None = None,
    ) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mount_dir = self.dir / "mnt"
        self.data_dir = self.dir / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = self.dir / "litefs.yml"
        self.log_path = self.dir / "litefs.log"
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        lease_owner = primary or self
        config = {
            "fuse": {"dir": str(self.mount_dir)},
            "data": {"dir": str(self.data_dir)},
            "http": {"addr": f"127.0.0.1:{self.port}"},
            "lease": {
                "type": "static",
                "hostname": lease_owner.name,
                "advertise-url": lease_owner.url,
                "candidate": candidate,
            },
            "log": {"debug": True},
        }
        for section, values in (settings or {}).items():
            config.setdefault(section, {}).update(values)
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self, *, wait: bool = True, env: dict[str, str] | None = None) -> NodeProcess:
        environment = {**os.environ, **self.env, **(env or {})}
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "litefs", "mount", "-config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=REPO,
            )
        finally:
            log.close()
        if wait:
            self.wait_mounted()
        return self

    def wait_mounted(self) -> None:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log()}"
                )
            if is_mounted(self.mount_dir) and _responds(self.mount_dir):
                return
            time.sleep(0.02)
        raise AssertionError(f"{self.name} did not mount within {MOUNT_TIMEOUT}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGINT) -> int:
        """Signal the daemon and wait for it; returns its exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        status = self.process.returncode
        self.process = None
        return status

    def kill(self) -> None:
        """SIGKILL, as a crash would; the stale mount is left for the restart to clear."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
            self.process = None

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            if self.process is not None:
                self.process.kill()
            if is_mounted(self.mount_dir):
                force_unmount(self.mount_dir)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        assert self.process is not None
        status = self.process.wait(timeout)
        self.process = None
        return status

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def db_dir(self, name: str) -> Path:
        return self.data_dir / "dbs" / name

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
