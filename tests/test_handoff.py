"""Handing the primary role to a chosen replica, without a gap in writes."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import StartNode
from consul_process import consul_for_test, unique_key
from etcd_server import EtcdServer
from etcd_server import etcd_server as etcd_server
from node_process import NodeProcess
from waiting import wait_for

from litefs.capture.rollback import JOURNAL_MAGIC

pytestmark = pytest.mark.fuse

SETTLE = 30.0


def etcd_settings(etcd: EtcdServer) -> dict[str, Any]:
    return {"lease": {"type": "etcd", "etcd": {"endpoints": [etcd.url], "ttl": "2s"}}}


def role(node: NodeProcess) -> str | None:
    try:
        with urllib.request.urlopen(f"{node.url}/info", timeout=1) as response:
            return str(json.load(response)["role"])
    except OSError:
        return None


def writable(node: NodeProcess) -> bool:
    try:
        conn = sqlite3.connect(node.mount_dir / "my.db", timeout=0.2, isolation_level=None)
        try:
            conn.execute("INSERT INTO t VALUES (?)", (time.time(),))
        finally:
            conn.close()
    except sqlite3.Error:
        return False
    return True


def consul_settings(url: str, key: str) -> dict[str, Any]:
    return {"lease": {"type": "consul", "consul": {"url": url, "key": key, "ttl": "10s"}}}


def test_handoff_moves_the_primary_role_to_the_named_replica(
    start_node: StartNode, etcd_server: EtcdServer
) -> None:
    nodes = [start_node(name, settings=etcd_settings(etcd_server)) for name in ("a", "b", "c")]
    assert_handoff_works(nodes)


def test_the_lease_passes_to_the_target_without_ever_being_free(
    start_node: StartNode, etcd_server: EtcdServer
) -> None:
    """A node that did not hear of the handoff (one starting up) could take
    a lease released for the target; the target takes the same lease over."""
    nodes = [start_node(name, settings=etcd_settings(etcd_server)) for name in ("a", "b")]
    wait_for(lambda: sorted(role(n) or "" for n in nodes) == ["primary", "replica"], timeout=SETTLE)
    primary = next(n for n in nodes if role(n) == "primary")
    target = next(n for n in nodes if n is not primary)
    primary.sqlite("my.db", "CREATE TABLE t (x);")
    wait_for(lambda: (target.mount_dir / "my.db-pos").exists(), timeout=SETTLE)
    before = lease_key(etcd_server)
    handoff(primary, target)
    wait_for(lambda: role(target) == "primary", timeout=5)
    after = lease_key(etcd_server)
    assert after["create_revision"] == before["create_revision"]
    assert after["lease"] == before["lease"]
    assert json.loads(base64.b64decode(after["value"]))["hostname"] == target.name


def lease_key(etcd: EtcdServer) -> dict[str, Any]:
    body = json.dumps({"key": base64.b64encode(b"litefs/primary").decode()}).encode()
    request = urllib.request.Request(f"{etcd.url}/v3/kv/range", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        kv: dict[str, Any] = json.load(response)["kvs"][0]
        return kv


def test_handoff_with_a_token_needs_it_and_the_command_sends_it(
    start_node: StartNode, etcd_server: EtcdServer
) -> None:
    settings = etcd_settings(etcd_server)
    settings["http"] = {"auth-token": "handoff-secret"}
    nodes = [start_node(name, settings=settings) for name in ("a", "b")]
    wait_for(lambda: sorted(role(n) or "" for n in nodes) == ["primary", "replica"])
    primary = next(n for n in nodes if role(n) == "primary")
    target = next(n for n in nodes if n is not primary)
    without = handoff_command("-url", primary.url, "-to", target.name)
    assert without.returncode == 1
    assert "handoff refused (401)" in without.stderr
    assert role(primary) == "primary"
    assert_handoff_works(nodes)


def test_handoff_works_with_a_consul_lease(start_node: StartNode, tmp_path: Path) -> None:
    with consul_for_test(tmp_path / "consul.log") as consul:
        key = unique_key()
        nodes = [start_node(name, settings=consul_settings(consul.url, key)) for name in ("a", "b")]
        assert_handoff_works(nodes)


def assert_handoff_works(nodes: list[NodeProcess]) -> None:
    wait_for(
        lambda: (
            sorted(role(n) or "" for n in nodes) == ["primary"] + ["replica"] * (len(nodes) - 1)
        ),
        timeout=SETTLE,
    )
    primary = next(n for n in nodes if role(n) == "primary")
    target = next(n for n in nodes if n is not primary)
    primary.sqlite("my.db", "CREATE TABLE t (x);")
    wait_for(lambda: (target.mount_dir / "my.db-pos").exists(), timeout=SETTLE)

    started = time.monotonic()
    handoff(primary, target)
    wait_for(lambda: writable(target), timeout=5)
    gap = time.monotonic() - started
    assert gap < 1.0, f"no node took writes for {gap:.2f}s"

    assert role(target) == "primary"
    assert not writable(primary)
    wait_for(lambda: role(primary) == "replica", timeout=SETTLE)
    target.sqlite("my.db", "INSERT INTO t VALUES ('after');")
    wait_for(
        lambda: all(
            (n.mount_dir / "my.db-pos").read_text() == (target.mount_dir / "my.db-pos").read_text()
            for n in nodes
        ),
        timeout=SETTLE,
    )


def test_handoff_to_an_unknown_replica_is_refused(
    start_node: StartNode, etcd_server: EtcdServer
) -> None:
    nodes = [start_node(name, settings=etcd_settings(etcd_server)) for name in ("a", "b")]
    wait_for(lambda: sorted(role(n) or "" for n in nodes) == ["primary", "replica"], timeout=SETTLE)
    primary = next(n for n in nodes if role(n) == "primary")
    result = handoff_command("-url", primary.url, "-to", "nobody")
    assert result.returncode == 1
    assert "no replica named 'nobody'" in result.stderr
    assert role(primary) == "primary"


def test_handoff_to_a_replica_that_may_not_be_primary_is_refused(
    start_node: StartNode, etcd_server: EtcdServer
) -> None:
    primary = start_node("a", settings=etcd_settings(etcd_server))
    wait_for(lambda: role(primary) == "primary", timeout=SETTLE)
    follower = start_node("b", candidate=False, settings=etcd_settings(etcd_server))
    primary.sqlite("my.db", "CREATE TABLE t (x);")
    wait_for(lambda: (follower.mount_dir / "my.db-pos").exists(), timeout=SETTLE)
    result = handoff_command("-url", primary.url, "-to", "b")
    assert result.returncode == 1
    assert "replica 'b' is not a candidate for primary" in result.stderr
    assert role(primary) == "primary"
    assert writable(primary)


def test_static_lease_cannot_be_handed_off(start_node: StartNode) -> None:
    primary = start_node("primary")
    start_node("replica", candidate=False, primary=primary)
    result = handoff_command("-url", primary.url, "-to", "replica")
    assert result.returncode == 1
    assert "cannot be handed off" in result.stderr


def handoff(primary: NodeProcess, target: NodeProcess) -> None:
    result = handoff_command("-config", str(primary.config_path), "-to", target.name)
    assert result.returncode == 0, result.stderr


def handoff_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "litefs", "handoff", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def primary_and_replica(
    start_node: StartNode, etcd_server: EtcdServer
) -> tuple[NodeProcess, NodeProcess]:
    """Two nodes on an etcd lease, the primary first, sharing a table `t`
    holding 'before'."""
    nodes = [start_node(name, settings=etcd_settings(etcd_server)) for name in ("a", "b")]
    wait_for(lambda: sorted(role(n) or "" for n in nodes) == ["primary", "replica"])
    old = next(n for n in nodes if role(n) == "primary")
    new = next(n for n in nodes if n is not old)
    old.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES ('before');")
    wait_for(lambda: (new.mount_dir / "my.db-pos").exists())
    return old, new


def same_position(a: NodeProcess, b: NodeProcess) -> bool:
    return (a.mount_dir / "my.db-pos").read_text() == (b.mount_dir / "my.db-pos").read_text()


def test_transaction_open_across_a_handoff_is_refused_and_leaves_no_trace(
    start_node: StartNode, etcd_server: EtcdServer
) -> None:
    """Its pages reached the database file (a small cache spills them) and
    may still sit in the kernel's cache when the node steps down."""
    old, new = primary_and_replica(start_node, etcd_server)
    nodes = [old, new]

    conn = sqlite3.connect(old.mount_dir / "my.db", timeout=5, isolation_level=None)
    try:
        conn.execute("PRAGMA cache_size=10")
        conn.execute("BEGIN")
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300) "
            "INSERT INTO t SELECT randomblob(3000) FROM n"
        )
        handoff(old, new)
        wait_for(lambda: role(old) == "replica")
        with pytest.raises(sqlite3.Error):
            conn.execute("COMMIT")
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    finally:
        conn.close()

    wait_for(lambda: role(new) == "primary")
    new.sqlite("my.db", "INSERT INTO t VALUES ('after');")
    wait_for(lambda: same_position(old, new))
    for node in nodes:
        result = node.sqlite("my.db", "PRAGMA integrity_check; SELECT count(*) FROM t;")
        assert result.stdout.split() == ["ok", "2"], node.name


def commit_then_hand_back(primary: NodeProcess, old: NodeProcess, statement: str) -> None:
    """`primary` commits `statement`, then hands the role back to `old`,
    which commits 'again'; both end at the same position."""
    wait_for(lambda: role(primary) == "primary")
    primary.sqlite("my.db", statement)
    wait_for(lambda: same_position(old, primary))
    handoff(primary, old)
    wait_for(lambda: role(old) == "primary")
    old.sqlite("my.db", "INSERT INTO t VALUES ('again');")
    wait_for(lambda: same_position(old, primary))


def stale_hot_journal(node: NodeProcess, tmp_path: Path) -> bytes:
    """A hot journal SQLite would make for the database as it is now: an
    interrupted transaction that rewrote page 1 and the table's pages."""
    copy = tmp_path / "copy.db"
    copy.write_bytes((node.mount_dir / "my.db").read_bytes())
    conn = sqlite3.connect(copy, isolation_level=None)
    try:
        conn.execute("PRAGMA cache_size=2")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t SELECT randomblob(3000) FROM t")
        conn.execute("INSERT INTO t SELECT randomblob(3000) FROM t")
        journal = (tmp_path / "copy.db-journal").read_bytes()
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    assert journal[:8] == JOURNAL_MAGIC
    return journal


def test_a_journal_header_refused_after_a_lost_lease_is_not_read_back_as_a_hot_journal(
    start_node: StartNode, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    """With the writeback cache, a writer's journal header may reach the
    daemon only after the node lost its lease; the daemon refuses it, but
    the kernel kept the page. Read back as a hot journal once the node is
    primary again, it would roll the database back to how it was then."""
    old, new = primary_and_replica(start_node, etcd_server)
    old.sqlite("my.db", "INSERT INTO t SELECT randomblob(3000) FROM t;" * 2)
    journal = stale_hot_journal(old, tmp_path)
    fd = os.open(old.mount_dir / "my.db-journal", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, bytes(8) + journal[8:])  # as SQLite writes it: the magic once synced
        os.fsync(fd)
        os.pwrite(fd, journal[:8], 0)  # the kernel keeps it
        etcd_server.stop()
        wait_for(lambda: role(old) == "replica")
        with pytest.raises(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
    wait_for(
        lambda: (old.mount_dir / "my.db-journal").read_bytes()[:8] == bytes(8),
        what="the refused header dropped from the kernel's cache",
    )

    etcd_server.start()
    wait_for(lambda: "primary" in (role(old), role(new)))
    if role(old) == "primary":
        handoff(old, new)
    commit_then_hand_back(new, old, "INSERT INTO t SELECT randomblob(3000) FROM t;")
    for node in (old, new):
        result = node.sqlite("my.db", "PRAGMA integrity_check; SELECT count(*) FROM t;")
        assert result.stdout.split() == ["ok", "9"], node.name


def test_writer_killed_mid_transaction_across_handoffs_leaves_the_old_primary_writable(
    start_node: StartNode, etcd_server: EtcdServer
) -> None:
    """The writer dies with its journal hot; the node rolls the transaction
    back when it applies the new primary's first file, and takes writes
    again once the role comes back to it."""
    old, new = primary_and_replica(start_node, etcd_server)
    writer = subprocess.Popen(
        ["sqlite3", str(old.mount_dir / "my.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert writer.stdin is not None
        writer.stdin.write(
            b"PRAGMA cache_size=10; BEGIN; "
            b"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300) "
            b"INSERT INTO t SELECT randomblob(3000) FROM n;\n"
        )
        writer.stdin.flush()
        journal = old.mount_dir / "my.db-journal"
        wait_for(lambda: journal.exists() and journal.stat().st_size > 0, what="a hot journal")
        time.sleep(0.3)
        handoff(old, new)
        wait_for(lambda: role(old) == "replica")
    finally:
        writer.kill()
        writer.wait()

    commit_then_hand_back(new, old, "INSERT INTO t VALUES ('after');")
    for node in (old, new):
        result = node.sqlite("my.db", "PRAGMA integrity_check; SELECT x FROM t;")
        assert result.stdout.split() == ["ok", "before", "after", "again"], node.name
