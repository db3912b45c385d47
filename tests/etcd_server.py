"""A real, single-member etcd for tests.

Tests of the etcd lease must run against etcd itself: its lease and watch
semantics (minimum TTLs, leases surviving restarts, revisions) are exactly
what the code depends on, and a fake would only encode our assumptions.

Each server gets its own temporary data dir and free loopback ports, and is
killed however the test ends. `restart()` keeps the data dir and the ports so
clients configured with the old URL reconnect to the same cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from pathlib import Path
from types import TracebackType

import pytest

ETCD_BINARY = shutil.which("etcd") or "/usr/bin/etcd"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


class EtcdStartError(RuntimeError):
    """etcd did not become healthy; the message carries the end of its log."""


def free_ports(count: int) -> list[int]:
    """Distinct ports that were free a moment ago (all held open while picking)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def dead_url() -> str:
    """A loopback URL on which nothing listens, so connecting is refused."""
    return f"http://127.0.0.1:{free_ports(1)[0]}"


class EtcdServer:
    """One etcd process; use as a context manager or through the fixtures below."""

    def __init__(self, base_dir: Path | None = None) -> None:
        self._owns_dir = base_dir is None
        self.base_dir = (
            Path(tempfile.mkdtemp(prefix="litefs-etcd-")) if base_dir is None else base_dir
        )
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "etcd.log"
        self.client_port, self.peer_port = 0, 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start etcd; on first start, retry on fresh ports if a port was taken meanwhile."""
        if self.running:
            return
        first = self.client_port == 0
        attempts = 3 if first else 1
        for attempt in range(attempts):
            if first:
                self.client_port, self.peer_port = free_ports(2)
            try:
                self._spawn()
                self._wait_healthy()
                return
            except EtcdStartError:
                self.stop()
                if attempt == attempts - 1 or "address already in use" not in self._log_tail():
                    raise

    def stop(self) -> None:
        """Stop etcd (SIGTERM, then SIGKILL); safe to call when it is not running."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._kill(proc)
        self._kill(proc)

    def kill(self) -> None:
        """Stop etcd abruptly, as a crash or power loss would."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._kill(proc)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        try:
            self.kill()
        finally:
            if self._owns_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def _spawn(self) -> None:
        client, peer = self.url, f"http://127.0.0.1:{self.peer_port}"
        args = [
            ETCD_BINARY,
            "--name=litefs-test",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=litefs-test={peer}",
            "--initial-cluster-state=new",
            "--heartbeat-interval=50",
            "--election-timeout=500",
        ]
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise EtcdStartError(f"etcd exited during start-up:\n{self._log_tail()}")
            if self._healthy():
                return
            time.sleep(0.05)
        raise EtcdStartError(f"etcd not healthy after {START_TIMEOUT} s:\n{self._log_tail()}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                return bool(json.load(resp).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def _log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture
def etcd_server() -> Iterator[EtcdServer]:
    """A fresh etcd for one test, free to stop and restart."""
    with EtcdServer() as server:
        yield server


@pytest.fixture(scope="module")
def shared_etcd_server() -> Iterator[EtcdServer]:
    """One etcd for a whole module; tests must use distinct keys and never stop it."""
    with EtcdServer() as server:
        yield server
