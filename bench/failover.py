"""Fail-over time of a three-node cluster elected through a real etcd.

Three `litefs mount` daemons share one etcd key with a 2 s TTL. The primary
is stopped cleanly (SIGINT), killed (SIGKILL) or frozen (SIGSTOP), and the
clock runs from the signal to the first write that commits on another node,
offered to every other node in turn as an application would. A clean stop
gives the lease up, so it should take milliseconds; a crash or a freeze has
to wait for the lease to run out. Each kind runs a few times; the median and
the worst run are reported.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import sqlite3
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from localcluster import LocalNode

RUNS = 3
TTL = 2.0
SETTLE_TIMEOUT = 30.0
DB = "bench.db"
KINDS: tuple[tuple[str, int, float], ...] = (
    ("SIGINT", signal.SIGINT, 1.0),
    ("kill -9", signal.SIGKILL, TTL + 2.0),
    ("SIGSTOP", signal.SIGSTOP, TTL + 2.0),
)
"""What stops the primary, the signal, and the longest fail-over acceptable."""

Row = tuple[Any, ...]


def _etcd_server_module() -> ModuleType:
    """The tests' etcd launcher (free ports, own data dir, always killed)."""
    path = Path(__file__).resolve().parent.parent / "tests" / "etcd_server.py"
    spec = importlib.util.spec_from_file_location("etcd_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _role(node: LocalNode) -> str | None:
    try:
        with urllib.request.urlopen(f"{node.url}/info", timeout=0.5) as resp:
            return str(json.load(resp)["role"])
    except (OSError, ValueError, KeyError):
        return None


def _wait(condition: Callable[[], bool], what: str, timeout: float = SETTLE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _write(node: LocalNode, value: str) -> bool:
    """One INSERT through the node's mount; never creates the file."""
    try:
        conn = sqlite3.connect(
            f"file:{node.mount_dir / DB}?mode=rw", uri=True, timeout=1.0, isolation_level=None
        )
    except sqlite3.Error:
        return False
    try:
        conn.execute("INSERT INTO t VALUES (?)", (value,))
        return True
    except sqlite3.Error:
        return False
    finally:
        conn.close()


def _position(node: LocalNode) -> str:
    try:
        return (node.mount_dir / f"{DB}-pos").read_text().strip()
    except OSError:
        return ""


def _settled(nodes: Sequence[LocalNode]) -> LocalNode:
    """Wait for one primary, every other node a replica at its position."""
    found: list[LocalNode] = []

    def check() -> bool:
        primaries = [node for node in nodes if _role(node) == "primary"]
        if len(primaries) != 1 or any(_role(n) != "replica" for n in nodes if n not in primaries):
            return False
        positions = {_position(node) for node in nodes}
        found[:] = primaries
        return len(positions) == 1 and "" not in positions

    _wait(check, "one primary with every node caught up")
    return found[0]


def _failover(nodes: Sequence[LocalNode], sig: int, run: int) -> float:
    """Signal the primary; seconds until another node commits a write."""
    old = _settled(nodes)
    others = [node for node in nodes if node is not old]
    assert old.process is not None
    started = time.monotonic()
    old.process.send_signal(sig)
    took: float | None = None
    deadline = started + SETTLE_TIMEOUT
    while took is None and time.monotonic() < deadline:
        for node in others:
            if _write(node, f"run {run}"):
                took = time.monotonic() - started
                break
        else:
            time.sleep(0.005)
    if sig == signal.SIGSTOP:
        old.process.send_signal(signal.SIGCONT)
    elif sig == signal.SIGINT:
        old.wait_exit()
        old.start()
    else:
        old.kill()
        old.start()
    if took is None:
        raise RuntimeError(f"no node took a write within {SETTLE_TIMEOUT:g} s")
    return took


@contextmanager
def _cluster(root: Path) -> Iterator[list[LocalNode]]:
    with ExitStack() as stack:
        (root / "etcd").mkdir()
        etcd = stack.enter_context(_etcd_server_module().EtcdServer(root / "etcd"))
        lease = {
            "type": "etcd",
            "candidate": True,
            "etcd": {"endpoints": [etcd.url], "key": "litefs/primary", "ttl": f"{TTL:g}s"},
        }
        nodes = [LocalNode(root, f"node{i}", settings={"lease": lease}) for i in (1, 2, 3)]
        for node in nodes:
            stack.callback(node.cleanup)
            stack.callback(_thaw, node)
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_mounted()
        _wait(lambda: any(_role(node) == "primary" for node in nodes), "a primary")
        primary = next(node for node in nodes if _role(node) == "primary")
        conn = sqlite3.connect(primary.mount_dir / DB, isolation_level=None)
        conn.execute("CREATE TABLE t (x)")
        conn.close()
        yield nodes


def _thaw(node: LocalNode) -> None:
    if node.process is not None and node.process.poll() is None:
        node.process.send_signal(signal.SIGCONT)


def run() -> list[Row]:
    rows: list[Row] = []
    with (
        tempfile.TemporaryDirectory(prefix="litefs-bench-failover-") as tmp,
        _cluster(Path(tmp)) as nodes,
    ):
        for kind, sig, target in KINDS:
            times = [_failover(nodes, sig, run) for run in range(RUNS)]
            rows.append((f"etcd failover, {kind}", statistics.median(times), "s", target, "max"))
            rows.append((f"etcd failover, {kind} (worst)", max(times), "s", target, "max"))
    return rows


if __name__ == "__main__":
    for row in run():
        print(f"{row[0]:<36} {row[1]:8.3f} {row[2]}")
