"""The fault campaign's verdict tells an asynchronous loss from a split brain."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from faults.campaign import Fault, damage_seen
from faults.cluster import DB
from faults.verdict import failovers, lost_commit_age, split_brain, unavailable, within_window
from faults.workload import Ack, check_replica_read


def ack(node: str, txid: int, at: float, writer: int = 1) -> Ack:
    return Ack(writer, txid, node, txid, at - 0.01, at)


def kill(node: str, at: float) -> Fault:
    return Fault("kill-primary", node, True, at, at + 1.0, True)


def test_a_txid_reused_after_its_primary_died_is_not_a_split_brain() -> None:
    acks = [ack("node1", 10, 1.0), ack("node2", 10, 4.0)]
    assert split_brain(acks, [kill("node1", 1.2)]) == []


def test_a_txid_acknowledged_by_two_nodes_with_no_fault_between_is_a_split_brain() -> None:
    acks = [ack("node1", 10, 1.0), ack("node2", 10, 4.0)]
    assert len(split_brain(acks, [kill("node3", 1.2)])) == 1


def test_a_txid_acknowledged_by_two_nodes_at_once_is_a_split_brain() -> None:
    first, second = Ack(1, 1, "node1", 10, 1.0, 2.0), Ack(2, 1, "node2", 10, 1.5, 1.6)
    assert len(split_brain([first, second], [kill("node1", 0.5)])) == 1


def test_a_lost_commit_is_dated_against_the_fault_that_ended_its_primary() -> None:
    faults = [kill("node2", 0.5), kill("node1", 3.0), kill("node1", 9.0)]
    found = lost_commit_age(ack("node1", 10, 2.8), faults)
    assert found is not None
    age, fault = found
    assert abs(age - 0.2) < 1e-9
    assert fault is faults[1]


def test_a_commit_during_a_partition_has_a_negative_age() -> None:
    partition = Fault("partition", "node1", True, 1.0, 5.0, True)
    found = lost_commit_age(ack("node1", 10, 2.0), [partition])
    assert found is not None and found[0] == -1.0


def test_a_commit_lost_to_a_failure_just_after_it_is_within_the_async_window() -> None:
    assert within_window(0.3, kill("node1", 1.0))
    assert not within_window(5.0, kill("node1", 1.0))


def test_no_commit_may_be_lost_to_a_handoff() -> None:
    handoff = Fault("handoff", "node1", True, 1.0, 1.2, True)
    assert not within_window(0.3, handoff)


def test_unavailability_is_the_longest_gap_between_acknowledgements() -> None:
    acks = [ack("node1", 2, 1.0), ack("node1", 3, 1.5), ack("node2", 4, 4.5)]
    assert unavailable(acks, 0.0, 5.0) == (3.0, 1.5)
    assert failovers(acks) == 1


def test_a_replica_read_with_rows_at_their_txids_passes() -> None:
    output = "ok\n3|3\n3|0000000000000003/00\n2|0000000000000002/00\n"
    assert check_replica_read(output, 4) == []


def test_a_replica_read_breaking_the_invariants_says_which() -> None:
    output = "ok\n3|4\n4|0000000000000009/00\n"
    problems = check_replica_read(output, 4)
    assert len(problems) == 3
    assert check_replica_read("*** in database main ***\n", 4)[0].startswith("quick_check")


def node_with_database(tmp_path: Path, keep_pages: int | None) -> Any:
    """A node whose mount holds a 20-page database, cut to `keep_pages`."""
    path = tmp_path / DB
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (randomblob(3000))", [()] * 16)
    conn.commit()
    conn.close()
    if keep_pages is not None:
        with open(path, "r+b") as f:
            f.truncate(keep_pages * 4096)
    return SimpleNamespace(mount_dir=tmp_path)


def test_a_healthy_database_shows_no_damage(tmp_path: Path) -> None:
    assert damage_seen(node_with_database(tmp_path, None)) is None


def test_a_database_cut_short_shows_damage(tmp_path: Path) -> None:
    assert damage_seen(node_with_database(tmp_path, 10)) is not None


def test_a_node_without_its_database_shows_no_damage(tmp_path: Path) -> None:
    assert damage_seen(SimpleNamespace(mount_dir=tmp_path)) is None
