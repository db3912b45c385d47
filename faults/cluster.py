"""Three candidate nodes and one etcd, each node in its own network namespace.

The nodes are the tests' `NodeProcess` daemons (real `litefs mount`
processes, cleaned up with `fusermount3 -uz` however they end) and etcd is
the tests' `EtcdServer`, listening on the bridge so that a cut-off node loses
etcd as well as its peers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

from faults.network import Bridge
from litefs.mountpoint import abort_connection, fuse_connection
from localcluster import MOUNT_TIMEOUT, STOP_TIMEOUT

TTL = 2.0
KILL_TIMEOUT = 10.0
STOP_GRACE = 15.0
"""A daemon that has not stopped this long after SIGINT is stuck."""
"""A SIGKILLed daemon that has not exited by then is stuck in its own mount."""
HTTP_PORT = 20202
DB = "app.db"
REQUEST_TIMEOUT = 0.5


def _tests_module(name: str) -> ModuleType:
    """A module of tests/ (the etcd launcher, the node process) loaded by path."""
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parent.parent / "tests" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_etcd_server = _tests_module("etcd_server")
_node_process = _tests_module("node_process")


class BridgedEtcd(_etcd_server.EtcdServer):  # type: ignore[name-defined]
    """The tests' etcd, serving clients on the bridge's address instead of loopback."""

    def __init__(self, base_dir: Path, host: str) -> None:
        super().__init__(base_dir)
        self.host = host

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.client_port}"


class Node(_node_process.NodeProcess):  # type: ignore[name-defined]
    """A node whose daemon runs in a network namespace, at its own address."""

    def __init__(
        self, root: Path, name: str, address: str, enter: list[str], etcd_url: str
    ) -> None:
        url = f"http://{address}:{HTTP_PORT}"
        settings: dict[str, Any] = {
            "http": {"addr": f"{address}:{HTTP_PORT}"},
            "data": {"retention": "24h"},
            "log": {"debug": False},
            "lease": {
                "type": "etcd",
                "hostname": name,
                "advertise-url": url,
                "candidate": True,
                "etcd": {"endpoints": [etcd_url], "key": "litefs/primary", "ttl": f"{TTL:g}s"},
            },
        }
        super().__init__(root, name, port=HTTP_PORT, settings=settings)
        self.url = url
        self.enter = enter
        self.frozen = False
        self.cut = False
        self.process: subprocess.Popen[bytes] | None = None
        self.connection: int | None = None
        self.stuck: list[str] = []
        self.broken: str | None = None
        """Why the daemon could not be started again, once it could not."""

    def start(self, *, wait: bool = True, env: dict[str, str] | None = None) -> Node:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    *self.enter,
                    sys.executable,
                    "-m",
                    "litefs",
                    "mount",
                    "-config",
                    str(self.config_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})},
            )
        self.frozen = False
        if wait:
            self.wait_mounted()
        return self

    def restart(self) -> bool:
        """Start the daemon again; False (and `broken` set) if it will not come up."""
        try:
            self.start()
        except RuntimeError as exc:
            self.kill()
            last = [line for line in str(exc).splitlines() if line.strip()][-1:]
            self.broken = f"could not start again: {' '.join(last)}"
            return False
        self.broken = None
        return True

    def wait_mounted(self, timeout: float = MOUNT_TIMEOUT) -> None:
        super().wait_mounted(timeout)
        self.connection = fuse_connection(self.mount_dir)

    def kill(self) -> None:
        """SIGKILL; a daemon that cannot die (a thread waits on its own mount)
        is described, then freed by aborting its FUSE connection."""
        if self.process is None:
            return
        self.process.kill()
        try:
            self.process.wait(KILL_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stuck.append(blocked_threads(self.process.pid, "survived SIGKILL"))
            if self.connection is not None:
                abort_connection(self.connection)
            self.process.wait(STOP_TIMEOUT)
        self.process = None

    def stop(self, sig: int = signal.SIGINT) -> int:
        """Signal the daemon and wait; one that hangs is described before it is killed:
        its threads' kernel stacks, then their Python stacks (faulthandler on SIGABRT)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.describe_hang(
                    f"did not stop within {STOP_GRACE:g}s of {signal.Signals(sig).name}"
                )
        status = self.process.returncode if self.process else -signal.SIGKILL
        self.process = None
        return int(status)

    def describe_hang(self, what: str) -> None:
        assert self.process is not None
        text = blocked_threads(self.process.pid, what)
        offset = self.log_path.stat().st_size
        self.process.send_signal(signal.SIGABRT)
        try:
            self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            self.kill()
        with open(self.log_path, errors="replace") as log:
            log.seek(offset)
            dump = log.read().splitlines()[:80]
        self.stuck.append("\n".join([text, *("  " + line for line in dump)]))
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(sig)

    def info(self, timeout: float = REQUEST_TIMEOUT) -> dict[str, Any] | None:
        """The node's /info, or None when it does not answer in time."""
        try:
            with urllib.request.urlopen(f"{self.url}/info", timeout=timeout) as resp:
                answer: dict[str, Any] = json.load(resp)
                return answer
        except (OSError, ValueError):
            return None

    def role(self) -> str | None:
        answer = self.info()
        return None if answer is None else str(answer.get("role"))

    def position(self) -> tuple[int, int] | None:
        """(TXID, checksum) from the mount's `-pos` file, or None."""
        try:
            text = (self.mount_dir / f"{DB}-pos").read_text().strip()
            txid, checksum = text.split("/")
            return int(txid, 16), int(checksum, 16)
        except (OSError, ValueError):
            return None

    def thaw(self) -> None:
        if self.frozen:
            self.signal(signal.SIGCONT)
            self.frozen = False


def blocked_threads(pid: int, what: str) -> str:
    """Each thread of a process that is not yet gone: its state, wait channel, kernel stack."""
    lines = [f"pid {pid} {what}"]
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = (task / "wchan").read_text().strip()
            stack = " < ".join(
                line.split()[-1].split("+")[0] for line in (task / "stack").read_text().splitlines()
            )
        except (OSError, IndexError):
            continue
        lines.append(f"  thread {task.name}: state {state} wchan {wchan} stack {stack}")
    return "\n".join(lines)


class Cluster:
    """The bridge, etcd and the nodes; `close()` undoes everything, in any state."""

    def __init__(self, root: Path, count: int = 3) -> None:
        self.root = root
        self.bridge = Bridge(count)
        self.etcd = BridgedEtcd(root / "etcd", self.bridge.host_address)
        self.nodes: list[Node] = []

    def start(self) -> Cluster:
        self.bridge.setup()
        (self.root / "etcd").mkdir(parents=True, exist_ok=True)
        self.etcd.start()
        for index, address in enumerate(self.bridge.addresses):
            node = Node(
                self.root, f"node{index + 1}", address, self.bridge.enter(index), self.etcd.url
            )
            self.nodes.append(node)
            node.start(wait=False)
        for node in self.nodes:
            node.wait_mounted()
        return self

    @property
    def healthy(self) -> list[Node]:
        """The nodes whose daemon could be started (every node, unless one broke)."""
        return [node for node in self.nodes if node.broken is None]

    def primary(self) -> Node | None:
        """The one node that says it is primary, if exactly one does."""
        found = [node for node in self.nodes if node.running and not node.frozen]
        primaries = [node for node in found if node.role() == "primary"]
        return primaries[0] if len(primaries) == 1 else None

    def elected(self) -> Node | None:
        """The primary, if every node answers and follows it."""
        nodes = self.healthy
        answers = {node.name: node.info() for node in nodes}
        if any(answer is None for answer in answers.values()):
            return None
        leaders = [node for node in nodes if answers[node.name]["role"] == "primary"]  # type: ignore[index]
        if len(leaders) != 1:
            return None
        for node in nodes:
            answer = answers[node.name]
            assert answer is not None
            if node is not leaders[0] and (
                answer["role"] != "replica"
                or (answer.get("primary") or {}).get("hostname") != leaders[0].name
            ):
                return None
        return leaders[0]

    def wait_elected(self, timeout: float) -> Node | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.elected()
            if leader is not None:
                return leader
            time.sleep(0.1)
        return None

    def heal(self) -> None:
        """Every node running, thawed and connected; etcd running."""
        for index, node in enumerate(self.nodes):
            node.thaw()
            if node.cut:
                self.bridge.heal(index)
                node.cut = False
        if not self.etcd.running:
            self.etcd.start()
        for node in self.nodes:
            if not node.running:
                node.kill()
                node.restart()

    def close(self) -> None:
        for index, node in enumerate(self.nodes):
            if node.cut:
                self.bridge.heal(index)
                node.cut = False
        for node in self.nodes:
            try:
                node.thaw()
                node.cleanup()
            except Exception as exc:
                print(f"cleanup of {node.name} failed: {exc}", file=sys.stderr)
        self.etcd.close()
        self.bridge.close()
