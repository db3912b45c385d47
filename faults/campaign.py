"""The scheduler: one fault at a time, chosen at random, then time to settle.

Each fault is recorded with the node it hit, whether that node was primary,
and when it began and ended, so that the verdict can tie every lost commit to
the fault that ended its primary's tenure.
"""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from faults.cluster import TTL, Cluster, Node
from faults.workload import READ_DEADLINE, run_sqlite

SETTLE_TIMEOUT = 30.0
QUIET = (0.3, 1.2)
"""Seconds of calm between one fault settling and the next, drawn at random."""


@dataclass(frozen=True)
class Fault:
    kind: str
    node: str | None
    was_primary: bool
    start: float
    end: float
    settled: bool


KINDS = (
    "kill-primary",
    "kill-replica",
    "freeze-primary",
    "clean-restart",
    "etcd-restart",
    "partition",
    "handoff",
)


DAMAGE = ("malformed", "in database main", "invalid page", "never used")
"""What `quick_check` and a failed read print for a damaged database."""


class DamageFound(Exception):
    """A node's database read as damaged right after a fault settled."""


def damage_seen(node: Node) -> str | None:
    """What a quick check through the node's mount says is wrong, or None.
    A node that is down or busy says nothing here."""
    result = run_sqlite(node, "PRAGMA quick_check;", READ_DEADLINE, readonly=True)
    if result is None:
        return None
    said = (result.stdout + result.stderr).strip()
    return said[:400] if any(word in said for word in DAMAGE) else None


class Campaign:
    def __init__(
        self, cluster: Cluster, rng: random.Random, partitions: bool, *, check_each: bool = False
    ) -> None:
        self.cluster = cluster
        self.rng = rng
        self.kinds = [kind for kind in KINDS if partitions or kind != "partition"]
        self.faults: list[Fault] = []
        self.check_each = check_each
        """Check every node's database after each fault, and stop at the first
        damage with the cluster as it stands: the logs then end where it began."""

    def run(self, count: int, progress: Callable[[str], None]) -> None:
        for number in range(1, count + 1):
            kind = self.rng.choice(self.kinds)
            fault = self.inject(kind)
            self.faults.append(fault)
            progress(
                f"fault {number}/{count}: {kind} {fault.node or ''} "
                f"{'(primary) ' if fault.was_primary else ''}"
                f"{fault.end - fault.start:.1f}s{'' if fault.settled else ' NOT SETTLED'}"
            )
            time.sleep(self.rng.uniform(*QUIET))
            if self.check_each:
                self._check(number)

    def _check(self, number: int) -> None:
        for node in self.cluster.nodes:
            damage = damage_seen(node)
            if damage is not None:
                raise DamageFound(f"after fault {number}, {node.name} reads: {damage}")

    def inject(self, kind: str) -> Fault:
        cluster = self.cluster
        leader = cluster.wait_elected(SETTLE_TIMEOUT)
        if kind == "etcd-restart":
            start = time.monotonic()
            cluster.etcd.stop()
            time.sleep(self.rng.uniform(0.2, 2.0))
            cluster.etcd.start()
            return self._settle(kind, None, False, start)
        if (kind.endswith("-primary") or kind == "handoff") and leader is not None:
            node = leader
        elif kind == "kill-replica":
            node = self.rng.choice([n for n in cluster.healthy if n is not leader])
        elif leader is not None and self.rng.random() < 0.5:
            node = leader
        else:
            node = self.rng.choice(cluster.healthy)
        start = time.monotonic()
        {
            "kill-primary": self._kill,
            "kill-replica": self._kill,
            "freeze-primary": self._freeze,
            "clean-restart": self._restart,
            "partition": self._partition,
            "handoff": self._handoff,
        }[kind](node)
        return self._settle(kind, node.name, node is leader, start)

    def _kill(self, node: Node) -> None:
        node.kill()
        time.sleep(self.rng.uniform(0.2, TTL + 1.0))
        self._start(node)

    def _freeze(self, node: Node) -> None:
        node.signal(signal.SIGSTOP)
        node.frozen = True
        time.sleep(TTL + self.rng.uniform(0.5, 2.5))
        node.thaw()

    def _restart(self, node: Node) -> None:
        status = node.stop()
        if status != 0:
            print(f"{node.name} exited with status {status} on SIGINT", file=sys.stderr)
        self._start(node)

    def _handoff(self, node: Node) -> None:
        """Hand the primary role to another node, under the workload."""
        targets = [n for n in self.cluster.healthy if n is not node]
        if not targets:
            return
        target = self.rng.choice(targets)
        command = ["handoff", "-url", node.url, "-to", target.name]
        result = subprocess.run(
            [sys.executable, "-m", "litefs", *command],
            capture_output=True,
            text=True,
            timeout=SETTLE_TIMEOUT,
        )
        if result.returncode != 0:
            print(f"handoff {node.name} -> {target.name}: {result.stderr.strip()}", file=sys.stderr)

    def _start(self, node: Node) -> None:
        if not node.restart():
            print(f"{node.name} {node.broken}", file=sys.stderr)

    def _partition(self, node: Node) -> None:
        index = self.cluster.nodes.index(node)
        self.cluster.bridge.cut(index)
        node.cut = True
        time.sleep(self.rng.uniform(1.0, 3 * TTL))
        self.cluster.bridge.heal(index)
        node.cut = False

    def _diagnose(self, node: Node, kind: str) -> None:
        """A node that stopped answering: does one request to its mount wake it up?
        If not, record its stacks; either way heal() restarts or keeps it."""
        what = f"did not answer /info {SETTLE_TIMEOUT:g}s after {kind}"
        with contextlib.suppress(subprocess.TimeoutExpired):
            probe = node.mount_dir / f"probe-{self.rng.randrange(1 << 30)}"
            subprocess.run(["stat", str(probe)], capture_output=True, timeout=5)
        time.sleep(1.0)
        if node.info() is not None:
            node.stuck.append(f"{what}, until a process made a request to its mount")
        else:
            node.describe_hang(what)

    def _settle(self, kind: str, node: str | None, was_primary: bool, start: float) -> Fault:
        end = time.monotonic()
        settled = self.cluster.wait_elected(SETTLE_TIMEOUT) is not None
        if not settled:
            for silent in self.cluster.healthy:
                if silent.running and silent.info() is None:
                    self._diagnose(silent, kind)
            self.cluster.heal()
        return Fault(kind, node, was_primary, start, end, settled)
