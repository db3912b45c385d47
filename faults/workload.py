"""Writers that commit through the primary and readers that check replicas.

Every statement runs in a separate `sqlite3` process with a deadline: a
process blocked on a frozen node's mount is killed (a fatal signal ends a
FUSE wait), so a frozen primary never takes the harness down with it.

A commit inserts one row recording the writer, its sequence number, the node
and the database's `-pos` read inside the write transaction (after BEGIN
IMMEDIATE no other commit can happen, so the commit's TXID is that
position's TXID plus one). A commit is *acknowledged* when `sqlite3` exits 0
after COMMIT. The table is created by TXID 1 and every later TXID is one
insert, so on any node row `rowid` must carry TXID `rowid + 1`.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field

from faults.cluster import DB, Cluster, Node

WRITE_DEADLINE = 1.5
READ_DEADLINE = 5.0
WRITE_PAUSE = 0.02
READ_PAUSE = 0.3
TAIL_ROWS = 20


@dataclass(frozen=True)
class Ack:
    """A commit a node acknowledged: who wrote it, where, its TXID, and when."""

    writer: int
    seq: int
    node: str
    txid: int
    start: float
    end: float


@dataclass
class Ledger:
    """Everything the writers and readers saw, shared between their threads."""

    acks: list[Ack] = field(default_factory=list)
    attempts: int = 0
    failures: list[tuple[float, str, str]] = field(default_factory=list)
    """(when, node, why) of each commit that was not acknowledged."""
    violations: list[str] = field(default_factory=list)
    checks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, ack: Ack) -> None:
        with self.lock:
            self.acks.append(ack)

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(text)


def txid_of_position(text: str) -> int:
    """The TXID in a `-pos` file's text (`<16 hex TXID>/<16 hex checksum>`)."""
    return int(text.strip().split("/")[0], 16)


def run_sqlite(
    node: Node, script: str, deadline: float, *, readonly: bool = False
) -> subprocess.CompletedProcess[str] | None:
    """Run `script` in `sqlite3` on the node's database; None if it overran."""
    mode = "ro" if readonly else "rw"
    try:
        return subprocess.run(
            ["sqlite3", "-bail", f"file:{node.mount_dir / DB}?mode={mode}"],
            input=script,
            capture_output=True,
            text=True,
            timeout=deadline,
        )
    except subprocess.TimeoutExpired:
        return None


class Writer(threading.Thread):
    """Commits one row at a time through whichever node says it is primary."""

    def __init__(self, number: int, cluster: Cluster, ledger: Ledger) -> None:
        super().__init__(name=f"writer{number}", daemon=True)
        self.number = number
        self.cluster = cluster
        self.ledger = ledger
        self.stopping = threading.Event()
        self.seq = 0
        self.target: Node | None = None

    def run(self) -> None:
        while not self.stopping.is_set():
            if self.target is None:
                self.target = self.cluster.primary()
                if self.target is None:
                    self.stopping.wait(WRITE_PAUSE)
                    continue
            if not self.commit(self.target):
                self.target = None
            self.stopping.wait(WRITE_PAUSE)

    def commit(self, node: Node) -> bool:
        self.seq += 1
        pos = f"rtrim(CAST(readfile('{node.mount_dir / DB}-pos') AS TEXT), char(10))"
        script = (
            ".timeout 1000\nBEGIN IMMEDIATE;\n"
            f"INSERT INTO t (writer, seq, node, pos) VALUES "
            f"({self.number}, {self.seq}, '{node.name}', {pos}) RETURNING pos;\n"
            "COMMIT;\n"
        )
        start = time.monotonic()
        result = run_sqlite(node, script, WRITE_DEADLINE)
        end = time.monotonic()
        with self.ledger.lock:
            self.ledger.attempts += 1
        if result is None or result.returncode != 0:
            why = "no answer within the deadline" if result is None else result.stderr.strip()
            with self.ledger.lock:
                self.ledger.failures.append((end, node.name, why.splitlines()[0] if why else "?"))
            return False
        try:
            txid = txid_of_position(result.stdout) + 1
        except (ValueError, IndexError):
            self.ledger.violation(f"{node.name}: commit printed no position: {result.stdout!r}")
            return False
        self.ledger.ack(Ack(self.number, self.seq, node.name, txid, start, end))
        return True


class Reader(threading.Thread):
    """Checks every node that says it is a replica, over and over.

    Invariants: `quick_check` is ok; rows have no gaps; row `rowid` carries
    TXID `rowid + 1`; the position read after the query is at least the
    newest row's TXID.
    """

    def __init__(self, cluster: Cluster, ledger: Ledger) -> None:
        super().__init__(name="reader", daemon=True)
        self.cluster = cluster
        self.ledger = ledger
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            for node in list(self.cluster.nodes):
                if node.running and not node.frozen and node.role() == "replica":
                    self.check(node)
            self.stopping.wait(READ_PAUSE)

    def check(self, node: Node) -> None:
        script = (
            ".timeout 1000\nBEGIN;\nPRAGMA quick_check;\n"
            "SELECT count(*), coalesce(max(rowid), 0) FROM t;\n"
            f"SELECT rowid, pos FROM t ORDER BY rowid DESC LIMIT {TAIL_ROWS};\nCOMMIT;\n"
        )
        result = run_sqlite(node, script, READ_DEADLINE, readonly=True)
        after = node.position()
        if result is None or result.returncode != 0 or after is None:
            return  # the node went away under the read: not an invariant
        with self.ledger.lock:
            self.ledger.checks += 1
        problems = check_replica_read(result.stdout, after[0])
        for problem in problems:
            self.ledger.violation(f"{node.name}: {problem}")


def check_replica_read(output: str, txid_after: int) -> list[str]:
    """The invariants a replica's read (see `Reader.check`) breaks, if any."""
    lines = output.splitlines()
    if not lines or lines[0] != "ok":
        return [f"quick_check: {lines[:3]}"]
    count, newest = (int(part) for part in lines[1].split("|"))
    problems = []
    if count != newest:
        problems.append(f"{count} rows but the newest has rowid {newest}")
    for line in lines[2:]:
        rowid_text, _, pos = line.partition("|")
        rowid, txid = int(rowid_text), txid_of_position(pos) + 1
        if txid != rowid + 1:
            problems.append(f"row {rowid} was committed as TXID {txid}")
    if newest + 1 > txid_after:
        problems.append(f"row {newest} visible at position {txid_after}")
    return problems
