"""The checks made once every fault is healed, and the summary line.

- split brain: two acknowledged commits with the same TXID, where the first
  node's tenure was not ended by a fault between the two acknowledgements
  (or where both were being acknowledged at the same moment).
- corrupt: a node's database fails `integrity_check`, or its LTX files do not
  verify or do not rebuild the database byte for byte.
- diverged: a node whose position or committed contents differ from the
  primary's once healed.
- acked lost: an acknowledged commit absent from the final primary. Each is
  tied to the first fault on its node (or on etcd) that had not ended when
  it was acknowledged; it is within the asynchronous window when it was
  acknowledged at most ASYNC_WINDOW before that fault began, or during the
  fault while the node still held its lease (at most a TTL). A handoff has
  no window: the old primary sends everything before the new one takes over.
- unavailable: the longest gap between two acknowledgements, from the first
  fault to the end of the campaign.
"""

from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from faults.campaign import Fault
from faults.cluster import DB, TTL, Cluster, Node
from faults.workload import Ack, Ledger, run_sqlite, txid_of_position

ASYNC_WINDOW = 1.0
"""How long before its primary's death an acknowledged commit may still be lost."""
LEASE_GRACE = TTL + 0.5
SETTLE_TIMEOUT = 60.0


@dataclass
class Verdict:
    faults: int = 0
    failovers: int = 0
    split_brain_writes: int = 0
    corrupt: int = 0
    diverged_after_heal: int = 0
    acked_lost: int = 0
    lost_outside_window: int = 0
    max_unavailable_s: float = 0.0
    details: list[str] = field(default_factory=list)

    def summary(self) -> str:
        window = (
            "all within the async window"
            if self.lost_outside_window == 0
            else f"{self.lost_outside_window} OUTSIDE the async window"
        )
        return (
            f"faults={self.faults} failovers={self.failovers} "
            f"split_brain_writes={self.split_brain_writes} corrupt={self.corrupt} "
            f"diverged_after_heal={self.diverged_after_heal} acked_lost={self.acked_lost} "
            f"({window}) max_unavailable_s={self.max_unavailable_s:.1f}"
        )

    @property
    def failed(self) -> bool:
        return bool(self.split_brain_writes or self.corrupt or self.diverged_after_heal)


def affects(fault: Fault, node: str) -> bool:
    return fault.node == node or fault.kind == "etcd-restart"


def failovers(acks: list[Ack]) -> int:
    """How often the node acknowledging commits changed."""
    ordered = sorted(acks, key=lambda ack: ack.end)
    return sum(1 for a, b in itertools.pairwise(ordered) if a.node != b.node)


def split_brain(acks: list[Ack], faults: list[Fault]) -> list[str]:
    by_txid: dict[int, list[Ack]] = defaultdict(list)
    for ack in acks:
        by_txid[ack.txid].append(ack)
    found = []
    for txid, claims in sorted(by_txid.items()):
        claims.sort(key=lambda ack: ack.end)
        for first, second in itertools.pairwise(claims):
            ended = any(
                affects(f, first.node) and first.start - LEASE_GRACE <= f.start <= second.start
                for f in faults
            )
            if first.end > second.start or not ended:
                found.append(f"TXID {txid} acknowledged by {first} and by {second}")
    return found


def lost_commit_age(ack: Ack, faults: list[Fault]) -> tuple[float, Fault] | None:
    """Seconds from the acknowledgement to the fault that ended its node's tenure."""
    for fault in sorted(faults, key=lambda f: f.start):
        if affects(fault, ack.node) and fault.end >= ack.end:
            return fault.start - ack.end, fault
    return None


def within_window(age: float, fault: Fault) -> bool:
    """Whether a commit acknowledged `age` seconds before `fault` began may
    be lost to it, as asynchronous replication allows."""
    return fault.kind != "handoff" and -LEASE_GRACE <= age <= ASYNC_WINDOW


def unavailable(acks: list[Ack], since: float, until: float) -> tuple[float, float]:
    """The longest gap between acknowledgements in [since, until], and when it began."""
    ends = sorted(ack.end for ack in acks if since <= ack.end <= until)
    points = [since, *ends, until]
    return max(((b - a, a) for a, b in itertools.pairwise(points)), default=(0.0, since))


def unavailable_by_kind(
    acks: list[Ack], faults: list[Fault], until: float
) -> dict[str, list[float]]:
    """For each kind of fault, the longest write gap from each fault to the next."""
    found: dict[str, list[float]] = defaultdict(list)
    ordered = sorted(faults, key=lambda f: f.start)
    for fault, after in itertools.zip_longest(ordered, ordered[1:]):
        found[fault.kind].append(unavailable(acks, fault.start, after.start if after else until)[0])
    return found


def final_rows(node: Node, ledger: Ledger) -> dict[tuple[int, int], int] | None:
    """(writer, seq) -> TXID for every row on the node; None if unreadable.

    A row whose TXID is not `rowid + 1` breaks the chain's invariant and is
    recorded as a violation.
    """
    result = run_sqlite(node, "SELECT rowid, writer, seq, pos FROM t;\n", 60.0, readonly=True)
    if result is None or result.returncode != 0:
        return None
    rows = {}
    for line in result.stdout.splitlines():
        rowid, writer, seq, pos = line.split("|")
        txid = txid_of_position(pos) + 1
        rows[(int(writer), int(seq))] = txid
        if txid != int(rowid) + 1:
            ledger.violation(f"{node.name}: final row {rowid} was committed as TXID {txid}")
    return rows


def wait_caught_up(cluster: Cluster, primary: Node) -> bool:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        target = primary.position()
        if target is not None and all(node.position() == target for node in cluster.healthy):
            return True
        time.sleep(0.2)
    return False


def check_history(node: Node, scratch: Path) -> str | None:
    """Why the node's database or LTX chain is corrupt, or None."""
    database = node.db_dir(DB) / "database"
    check = subprocess.run(
        ["sqlite3", f"file:{database}?mode=ro&immutable=1", "PRAGMA integrity_check;"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if check.stdout.strip() != "ok":
        return f"integrity_check: {check.stdout.strip()[:200]} {check.stderr.strip()[:200]}"
    files = [str(path) for path in node.ltx_files(DB)]
    if not files:
        return "no LTX files"
    rebuilt = scratch / f"rebuilt-{node.name}"
    for command in (["verify", *files], ["apply", "-db", str(rebuilt), *files]):
        result = subprocess.run(
            [sys.executable, "-m", "litefs", "ltx", *command],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            return f"ltx {command[0]}: {result.stderr.strip()[-300:]}"
    if rebuilt.read_bytes() != node.committed_database(DB):
        return "the LTX files rebuild a different database"
    return None


def judge(
    cluster: Cluster, ledger: Ledger, faults: list[Fault], since: float, until: float
) -> Verdict:
    """Heal, wait for one primary with every node caught up, then check everything."""
    verdict = Verdict(faults=len(faults), failovers=failovers(ledger.acks))
    verdict.max_unavailable_s, gap_start = unavailable(ledger.acks, since, until)
    during = [f.kind for f in faults if f.start <= gap_start + verdict.max_unavailable_s]
    verdict.details.append(
        f"longest time without a commit: {verdict.max_unavailable_s:.1f}s from "
        f"+{gap_start - since:.1f}s, after faults {', '.join(during[-3:])}"
    )
    reasons = Counter(
        f"{node}: {why}"
        for when, node, why in ledger.failures
        if gap_start <= when <= gap_start + verdict.max_unavailable_s
    )
    for reason, count in reasons.most_common(5):
        verdict.details.append(f"  {count} commits refused meanwhile by {reason}")
    for kind, gaps in sorted(unavailable_by_kind(ledger.acks, faults, until).items()):
        verdict.details.append(
            f"{kind}: {len(gaps)} times; no commit for median {statistics.median(gaps):.1f}s, "
            f"at most {max(gaps):.1f}s"
        )
    for node in cluster.nodes:
        verdict.details.extend(f"{node.name}: {text}" for text in node.stuck)
    cluster.heal()
    for node in cluster.nodes:
        if node.broken is not None:
            verdict.diverged_after_heal += 1
            verdict.details.append(f"{node.name} {node.broken}")
    primary = cluster.wait_elected(SETTLE_TIMEOUT)
    if primary is None:
        verdict.details.append("no single primary after healing")
        verdict.diverged_after_heal = len(cluster.nodes)
        return verdict
    if not wait_caught_up(cluster, primary):
        verdict.details.append("not every node reached the primary's position")
    target = primary.position()
    assert target is not None
    for node in cluster.healthy:
        if node.position() != target or node.committed_checksum(DB) != target[1]:
            verdict.diverged_after_heal += 1
            verdict.details.append(
                f"{node.name} diverged: at {node.position()}, primary at {target}"
            )

    rows = final_rows(primary, ledger)
    if rows is None:
        verdict.details.append("the final primary's rows could not be read")
        rows = {}
    by_fault: dict[int, list[tuple[float, Ack]]] = defaultdict(list)
    for ack in ledger.acks:
        if rows.get((ack.writer, ack.seq)) == ack.txid:
            continue
        verdict.acked_lost += 1
        found = lost_commit_age(ack, faults)
        if found is None:
            verdict.lost_outside_window += 1
            verdict.details.append(f"lost {ack}: no fault on {ack.node} after it")
            continue
        age, fault = found
        by_fault[faults.index(fault)].append((age, ack))
        verdict.lost_outside_window += not within_window(age, fault)
    for index, lost in sorted(by_fault.items()):
        fault, offsets = faults[index], [-age for age, _ in lost]
        verdict.details.append(
            f"fault {index + 1} ({fault.kind} {fault.node or ''}"
            f"{' primary' if fault.was_primary else ''}) lost {len(lost)} acknowledged commits "
            f"of {lost[0][1].node}, TXIDs {min(a.txid for _, a in lost)}-"
            f"{max(a.txid for _, a in lost)}, acknowledged {min(offsets):+.3f}s to "
            f"{max(offsets):+.3f}s from the fault's start"
        )
    brain = split_brain(ledger.acks, faults)
    verdict.split_brain_writes = len(brain)
    verdict.details.extend(brain)

    for node in cluster.nodes:
        node.stop()
    with tempfile.TemporaryDirectory(prefix="litefs-faults-") as scratch:
        for node in cluster.nodes:
            problem = check_history(node, Path(scratch))
            if problem is not None:
                verdict.corrupt += 1
                verdict.details.append(f"{node.name} corrupt: {problem}")
    return verdict
