"""Consul for end-to-end tests: the emulator as a process of its own, or a real agent.

Daemons under test talk to Consul over the network like they would in
production, so the emulator runs as a separate process
(`python tests/consul_emulator.py`) rather than inside the test. When
CONSUL_HTTP_ADDR names a real agent, tests use it instead; fault injection
is then unavailable and `emulated` is False.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from consul_emulator import real_consul_url

EMULATOR = Path(__file__).with_name("consul_emulator.py")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
REQUEST_TIMEOUT = 5.0


class ConsulProcess:
    """A Consul HTTP API at `url`, and the emulator process behind it if any."""

    def __init__(self, url: str, process: subprocess.Popen[bytes] | None) -> None:
        self.url = url
        self.process = process

    @property
    def emulated(self) -> bool:
        return self.process is not None

    @classmethod
    def start_emulator(cls, log_path: Path, *, ttl_multiplier: float = 1.0) -> ConsulProcess:
        """Start the emulator on a free loopback port and wait until it listens."""
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    str(EMULATOR),
                    "--addr",
                    "127.0.0.1:0",
                    "--ttl-multiplier",
                    str(ttl_multiplier),
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        try:
            url = _read_listening_url(process, log_path)
        except BaseException:
            _terminate(process)
            raise
        return cls(url, process)

    def stop(self) -> None:
        if self.process is not None:
            _terminate(self.process)

    # Fault injection (emulator only).

    def refuse(self, duration: float) -> None:
        """Stop answering connections for `duration` seconds, as when Consul is down.

        Nothing, not even these control endpoints, answers until it is over.
        """
        self._control("outage", mode="refuse", duration=f"{round(duration * 1000)}ms")

    def requests(self) -> dict[str, int]:
        """Requests the emulator has served, by "METHOD kind" ("PUT session/renew", ...)."""
        served: dict[str, int] = self._control("requests", method="GET")["requests"]
        return served

    def _control(self, action: str, method: str = "PUT", **params: str) -> Any:
        if not self.emulated:
            raise RuntimeError("fault injection needs the emulator, not a real Consul")
        return self.call(method, f"/_emulator/{action}", **params)

    # The Consul API, for what tests need to inspect or do by hand.

    def session_holding(self, key: str) -> str | None:
        """The ID of the session that holds the lock on `key`, if any."""
        try:
            entries = self.call("GET", f"/v1/kv/{key}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        session: str | None = entries[0].get("Session") or None
        return session

    def destroy_session(self, session_id: str) -> None:
        """Invalidate a session, as Consul does when its node's health check fails."""
        self.call("PUT", f"/v1/session/destroy/{session_id}")

    def call(self, method: str, path: str, **params: str) -> Any:
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        request = urllib.request.Request(url, method=method, data=b"" if method == "PUT" else None)
        token = os.environ.get("CONSUL_HTTP_TOKEN")
        if token:
            request.add_header("X-Consul-Token", token)
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            return json.loads(response.read() or b"null")


def unique_key() -> str:
    """A lease key no other test uses, so tests can share one real Consul."""
    return f"litefs-test/{uuid.uuid4().hex}/primary"


@contextlib.contextmanager
def consul_for_test(log_path: Path) -> Iterator[ConsulProcess]:
    """The real Consul when CONSUL_HTTP_ADDR is set, otherwise a fresh emulator process."""
    url = real_consul_url()
    if url is not None:
        yield ConsulProcess(url.rstrip("/"), None)
        return
    consul = ConsulProcess.start_emulator(log_path)
    try:
        yield consul
    finally:
        consul.stop()


def _read_listening_url(process: subprocess.Popen[bytes], log_path: Path) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"the Consul emulator did not start within {START_TIMEOUT}s")
        ready, _, _ = select.select([process.stdout], [], [], remaining)
        if not ready:
            continue
        byte = os.read(process.stdout.fileno(), 1)
        if not byte:
            process.wait(STOP_TIMEOUT)
            log = log_path.read_text(errors="replace")
            raise RuntimeError(
                f"the Consul emulator exited with status {process.returncode}:\n{log}"
            )
        line += byte
    text = line.decode().strip()
    prefix = "listening on "
    if not text.startswith(prefix):
        raise RuntimeError(f"unexpected first line from the Consul emulator: {text!r}")
    return text.removeprefix(prefix)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)
    if process.stdout is not None:
        process.stdout.close()
