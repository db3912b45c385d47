"""Network namespaces joined by a bridge, so that one node can be cut off.

Each node runs in a namespace of its own (`nsenter --net`, which leaves the
mount namespace alone, so its FUSE mount is visible to everyone). The
namespace's end of a veth pair carries the node's address; the host's end is
enslaved to a bridge that also carries etcd's address. Taking the host's end
down is a partition: packets are dropped silently both ways, no reset is
sent, exactly as when a cable is pulled.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

NETNS_DIR = Path("/var/run/netns")


class NetworkError(RuntimeError):
    """The namespaces could not be set up (not root, no `ip`, no veth support)."""


def _ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *args] if netns is None else ["ip", "-n", netns, *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise NetworkError(f"{' '.join(command)}: {result.stderr.strip()}")


class Bridge:
    """`count` namespaces with addresses 10.231.S.1..count, the host at 10.231.S.254."""

    def __init__(self, count: int) -> None:
        tag = os.getpid() % 100000
        self.subnet = f"10.231.{os.getpid() % 250}"
        self.bridge = f"lf{tag}br"
        self.namespaces = [f"lf{tag}n{i}" for i in range(1, count + 1)]
        self.host_ends = [f"lf{tag}h{i}" for i in range(1, count + 1)]
        self.host_address = f"{self.subnet}.254"
        self.addresses = [f"{self.subnet}.{i}" for i in range(1, count + 1)]
        self._made: list[tuple[str, str]] = []

    def setup(self) -> Bridge:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made.append(("link", self.bridge))
            _ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for index, namespace in enumerate(self.namespaces):
                self._add_namespace(index, namespace)
        except BaseException:
            self.close()
            raise
        return self

    def _add_namespace(self, index: int, namespace: str) -> None:
        host_end, node_end = self.host_ends[index], f"lf{os.getpid() % 100000}p{index + 1}"
        _ip("netns", "add", namespace)
        self._made.append(("netns", namespace))
        _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
        self._made.append(("link", host_end))
        _ip("link", "set", node_end, "netns", namespace)
        _ip("link", "set", host_end, "master", self.bridge)
        _ip("link", "set", host_end, "up")
        _ip("addr", "add", f"{self.addresses[index]}/24", "dev", node_end, netns=namespace)
        _ip("link", "set", node_end, "up", netns=namespace)
        _ip("link", "set", "lo", "up", netns=namespace)

    def enter(self, index: int) -> list[str]:
        """The command prefix that runs a program in node `index`'s namespace."""
        return ["nsenter", f"--net={NETNS_DIR / self.namespaces[index]}"]

    def cut(self, index: int) -> None:
        _ip("link", "set", self.host_ends[index], "down")

    def heal(self, index: int) -> None:
        _ip("link", "set", self.host_ends[index], "up")

    def close(self) -> None:
        """Remove every link and namespace made, newest first; never raises."""
        while self._made:
            kind, name = self._made.pop()
            with contextlib.suppress(NetworkError, OSError, subprocess.TimeoutExpired):
                if kind == "netns":
                    _ip("netns", "del", name)
                else:
                    _ip("link", "del", name)
