"""A cluster leased through Consul, end to end.

Real `litefs` daemons on real FUSE mounts compete for one Consul key. Consul
is the emulator running as a process of its own, or the agent named by
CONSUL_HTTP_ADDR (each test uses a key of its own). Every node uses Consul's
shortest session TTL, 10s, and a lock-delay of 1s.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from consul_process import ConsulProcess, consul_for_test, unique_key
from node_process import NodeProcess
from waiting import wait_for

from litefs.mountpoint import abort_connection, fuse_connection

pytestmark = pytest.mark.fuse

TTL = 10.0
LOCK_DELAY = 1.0
DB = "my.db"
KILLED_PRIMARY_REPLACED_WITHIN = 2 * TTL + LOCK_DELAY + 1.0
"""Consul invalidates a session between one and two TTLs after its last
renewal, then refuses the key to everyone for the lock-delay."""
HANDOVER_WITHIN = 1.0
REPLICATED_WITHIN = 1.0
SETTLE_TIMEOUT = 30.0
MOUNT_ANSWERS_WITHIN = 10.0
STOP_WITHIN = 15.0

_T = TypeVar("_T")


# -- nodes --------------------------------------------------------------------


class ConsulNode(NodeProcess):
    """A node of the full configuration shape with a Consul lease."""

    def __init__(self, root: Path, name: str, consul_url: str, key: str) -> None:
        super().__init__(
            root,
            name,
            settings={
                "lease": {
                    "type": "consul",
                    "consul": {
                        "url": consul_url,
                        "key": key,
                        "ttl": f"{TTL:g}s",
                        "lock-delay": f"{LOCK_DELAY:g}s",
                    },
                }
            },
        )


class SeedNode(NodeProcess):
    """A node configured with the seed (0.1) shape, on a host of its own.

    The seed shape has no hostname setting: a node goes by its machine's
    hostname. Each node therefore runs in a UTS namespace of its own with
    `name` as its hostname, as if it ran on a machine of its own.
    """

    def __init__(self, root: Path, name: str, consul_url: str, key: str) -> None:
        super().__init__(root, name)
        self.data_dir = self.mount_dir.with_name(f".{self.mount_dir.name}")
        config = {
            "mount-dir": str(self.mount_dir),
            "http": {"addr": f"127.0.0.1:{self.port}"},
            "consul": {
                "url": consul_url,
                "advertise-url": self.url,
                "key": key,
                "ttl": f"{TTL:g}s",
                "lock-delay": f"{LOCK_DELAY:g}s",
            },
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def start(self, *, wait: bool = True, env: dict[str, str] | None = None) -> SeedNode:
        command = [
            *("unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', self.name),
            *(sys.executable, "-m", "litefs", "mount", "-config", str(self.config_path)),
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env, **(env or {})},
            )
        if wait:
            self.wait_mounted()
        return self


class Cluster:
    """The nodes of one test, all competing for one fresh lease key."""

    def __init__(self, root: Path, consul: ConsulProcess) -> None:
        self.root = root
        self.consul = consul
        self.key = unique_key()
        self.nodes: list[NodeProcess] = []

    def node(self, name: str) -> ConsulNode:
        node = ConsulNode(self.root, name, self.consul.url, self.key)
        self.nodes.append(node)
        return node

    def seed_node(self, name: str) -> SeedNode:
        node = SeedNode(self.root, name, self.consul.url, self.key)
        self.nodes.append(node)
        return node

    def start(self, name: str) -> ConsulNode:
        node = self.node(name)
        node.start()
        return node

    def primaries(self) -> list[NodeProcess]:
        return [node for node in self.nodes if node.process and role(node) == "primary"]

    def only_primary(self, timeout: float = SETTLE_TIMEOUT) -> NodeProcess:
        found: list[NodeProcess] = []

        def one() -> bool:
            found[:] = self.primaries()
            return len(found) == 1

        wait_for(one, timeout, "exactly one primary")
        return found[0]

    def cleanup(self) -> None:
        """Stop every node; one that hangs on its own mount is cut loose at once."""
        for node in reversed(self.nodes):
            if node.process is not None and node.process.poll() is None:
                connection = fuse_connection(node.mount_dir)
                node.process.send_signal(signal.SIGINT)
                try:
                    node.process.wait(STOP_WITHIN)
                except subprocess.TimeoutExpired:
                    if connection is not None:
                        abort_connection(connection)
            node.cleanup()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with consul_for_test(tmp_path / "consul.log") as consul:
        nodes = Cluster(tmp_path, consul)
        try:
            yield nodes
        finally:
            nodes.cleanup()


@pytest.fixture
def emulated(cluster: Cluster) -> Cluster:
    if not cluster.consul.emulated:
        pytest.skip("needs the emulator's fault injection, not a real Consul")
    return cluster


def own_hostnames_supported() -> bool:
    try:
        probe = subprocess.run(
            ["unshare", "--uts", "--", "hostname", "litefs-probe"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


# -- observing nodes ------------------------------------------------------------


def info(node: NodeProcess) -> dict[str, Any] | None:
    """The node's /info, or None while it does not answer."""
    try:
        with urllib.request.urlopen(node.url + "/info", timeout=2) as response:
            body: dict[str, Any] = json.load(response)
            return body
    except (OSError, ValueError):
        return None


def role(node: NodeProcess) -> str | None:
    answer = info(node)
    return None if answer is None else answer["role"]


def follows(node: NodeProcess, primary: NodeProcess) -> bool:
    answer = info(node)
    return (
        answer is not None
        and answer["role"] == "replica"
        and answer["primary"] == {"hostname": primary.name, "advertise-url": primary.url}
    )


def log_since(node: NodeProcess, offset: int) -> str:
    return node.log()[offset:]


def through_mount(node: NodeProcess, what: str, access: Callable[[], _T]) -> _T:
    """Run `access` to the node's mount in a thread of its own.

    A daemon that stops answering leaves a caller in the kernel where no
    timeout reaches it; the test must fail instead, and its clean-up then
    aborts the mount's FUSE connection, which frees the thread.
    """
    outcome: list[_T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(access())
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=run, name=f"{what} on {node.name}", daemon=True)
    worker.start()
    worker.join(MOUNT_ANSWERS_WITHIN)
    if worker.is_alive():
        raise AssertionError(
            f"{what} through {node.name}'s mount got no answer in {MOUNT_ANSWERS_WITHIN:g}s"
        )
    if failure:
        raise failure[0]
    return outcome[0]


def position(node: NodeProcess, db: str = DB) -> str:
    """The node's `<db>-pos` (TXID/checksum), or "" while it has none."""

    def read() -> str:
        try:
            return (node.mount_dir / f"{db}-pos").read_text().strip()
        except OSError:
            return ""

    return through_mount(node, "reading the position", read)


def primary_file(node: NodeProcess) -> str:
    return through_mount(node, "reading .primary", (node.mount_dir / ".primary").read_text)


def database_url(node: NodeProcess, mode: str) -> str:
    # mode=rw never creates a file: a write to a node whose mount is gone
    # must fail rather than land in the directory under the mount.
    return f"file:{urllib.parse.quote(str(node.mount_dir / DB))}?mode={mode}"


def insert(node: NodeProcess, value: int) -> str | None:
    """INSERT one row through the node's mount; None once committed, else the error."""

    def write() -> str | None:
        try:
            conn = sqlite3.connect(
                database_url(node, "rw"), uri=True, timeout=0.5, isolation_level=None
            )
            try:
                conn.execute("INSERT INTO t (n) VALUES (?)", (value,))
            finally:
                conn.close()
        except (sqlite3.Error, OSError) as exc:
            return str(exc) or type(exc).__name__
        return None

    return through_mount(node, "an INSERT", write)


def rows(node: NodeProcess) -> list[int]:
    def read() -> list[int]:
        conn = sqlite3.connect(database_url(node, "ro"), uri=True, timeout=5)
        try:
            return [n for (n,) in conn.execute("SELECT n FROM t ORDER BY n")]
        finally:
            conn.close()

    return through_mount(node, "a SELECT", read)


def shell_rows(node: NodeProcess) -> list[str]:
    result = node.sqlite(DB, "SELECT x FROM t ORDER BY rowid;", check=False)
    return result.stdout.split() if result.returncode == 0 else []


def caught_up(replica: NodeProcess, primary: NodeProcess) -> bool:
    return position(replica, DB) == position(primary, DB) != ""


def all_caught_up(nodes: Sequence[NodeProcess], primary: NodeProcess) -> bool:
    return all(caught_up(node, primary) for node in nodes if node.process is not None)


def assert_identical(node: NodeProcess, primary: NodeProcess) -> None:
    wait_for(lambda: caught_up(node, primary), SETTLE_TIMEOUT, f"{node.name} to catch up")
    assert node.committed_database(DB) == primary.committed_database(DB)
    checksum = int(position(primary, DB).split("/")[1], 16)
    assert node.committed_checksum(DB) == checksum


def report(record_property: Callable[[str, object], None], name: str, seconds: float) -> None:
    record_property(name, round(seconds, 3))
    print(f"{name}: {seconds:.3f}s")


# -- the walkthrough with the seed configuration ----------------------------------


@pytest.mark.timeout(90)
def test_seed_configuration_walkthrough(
    cluster: Cluster, record_property: Callable[[str, object], None]
) -> None:
    """Two nodes configured as LiteFS 0.1 was: mount-dir, http.addr and consul."""
    if not own_hostnames_supported():
        pytest.skip("needs `unshare --uts` to give each node a hostname of its own")
    first = cluster.seed_node("litefs-one")
    second = cluster.seed_node("litefs-two")

    # The first node to start takes the lease.
    first.start()
    wait_for(lambda: role(first) == "primary", 15, "the first node to become primary")
    assert "this node is the primary" in first.log()
    assert (info(first) or {}).get("node") == "litefs-one"
    assert (first.data_dir / "dbs").is_dir(), "the data lives in the mount dir's dot-sibling"

    # The second follows it and says so in its log, its /info and .primary.
    second.start()
    wait_for(
        lambda: f"connected to primary at {first.url}" in second.log(),
        15,
        "the second node to connect to the first",
    )
    assert follows(second, first)
    assert primary_file(second) == "litefs-one\n"
    assert not (first.mount_dir / ".primary").exists()

    # Writes on the primary appear on the replica at once.
    first.sqlite(DB, "CREATE TABLE t (x TEXT); INSERT INTO t VALUES ('hello');")
    seen = wait_for(lambda: shell_rows(second) == ["hello"], REPLICATED_WITHIN, "the row")
    report(record_property, "replicated_after", seen)

    # The replica refuses writes.
    refused = second.sqlite(DB, "INSERT INTO t VALUES ('refused');", check=False)
    assert refused.returncode != 0
    assert "attempt to write a readonly database" in refused.stderr

    # SIGINT on the primary hands the lease over: the second node takes writes
    # within a second of the signal.
    assert first.process is not None
    signalled = time.monotonic()
    first.process.send_signal(signal.SIGINT)
    while second.sqlite(DB, "INSERT INTO t VALUES ('handed-over');", check=False).returncode:
        assert time.monotonic() - signalled < SETTLE_TIMEOUT, "the second never took writes"
    handover = time.monotonic() - signalled
    report(record_property, "sigint_handover", handover)
    assert handover <= HANDOVER_WITHIN
    assert first.wait_exit() == 0
    assert role(second) == "primary"

    # The first node, started again, replicates from the second right away.
    offset = len(first.log())
    restarted = time.monotonic()
    first.start()
    wait_for(
        lambda: f"connected to primary at {second.url}" in log_since(first, offset),
        5,
        "the restarted node to connect to the new primary",
    )
    report(record_property, "restart_to_connected", time.monotonic() - restarted)
    assert follows(first, second)
    assert primary_file(first) == "litefs-two\n"
    second.sqlite(DB, "INSERT INTO t VALUES ('again');")
    wait_for(lambda: caught_up(first, second), REPLICATED_WITHIN, "the first node to catch up")
    assert shell_rows(first) == shell_rows(second) == ["hello", "handed-over", "again"]
    assert_identical(first, second)


# -- failover in the full configuration shape -----------------------------------------


@pytest.fixture(params=["DELETE", "WAL"])
def journal_mode(request: pytest.FixtureRequest) -> str:
    """The statement that puts a new database in each journal mode under test."""
    return f"PRAGMA journal_mode={request.param};"


@pytest.mark.timeout(90)
def test_killed_primary_is_replaced_within_two_ttls_and_the_lock_delay(
    cluster: Cluster, record_property: Callable[[str, object], None], journal_mode: str
) -> None:
    first = cluster.start("node-a")
    wait_for(lambda: role(first) == "primary", 15, "node-a to become primary")
    second = cluster.start("node-b")
    wait_for(lambda: follows(second, first), 15, "node-b to follow node-a")
    first.sqlite(DB, journal_mode + "CREATE TABLE t (n INTEGER); INSERT INTO t VALUES (1);")
    wait_for(lambda: caught_up(second, first), REPLICATED_WITHIN, "node-b to catch up")

    killed = time.monotonic()
    first.kill()
    while insert(second, 2) is not None:
        elapsed = time.monotonic() - killed
        assert elapsed < KILLED_PRIMARY_REPLACED_WITHIN + SETTLE_TIMEOUT, "no failover"
        time.sleep(0.02)
    failover = time.monotonic() - killed
    report(record_property, "kill9_failover", failover)
    assert failover <= KILLED_PRIMARY_REPLACED_WITHIN
    assert role(second) == "primary"

    # The killed node comes back as a replica of the new primary.
    first.start()
    wait_for(lambda: follows(first, second), 15, "node-a to follow node-b")
    assert insert(second, 3) is None
    assert_identical(first, second)
    assert rows(first) == [1, 2, 3]


@pytest.mark.timeout(90)
def test_primary_cut_off_from_consul_stops_writes_before_its_ttl_ends(
    emulated: Cluster, record_property: Callable[[str, object], None]
) -> None:
    cluster = emulated
    consul = cluster.consul
    first = cluster.start("node-a")
    wait_for(lambda: role(first) == "primary", 15, "node-a to become primary")
    second = cluster.start("node-b")
    wait_for(lambda: follows(second, first), 15, "node-b to follow node-a")
    first.sqlite(DB, "CREATE TABLE t (n INTEGER);")

    # Cut Consul off just after a renewal, so the session's expiry is known:
    # the renewal reached Consul after `not_renewed_at`, so Consul cannot
    # invalidate the session, and no other node can take the lease, before
    # not_renewed_at + TTL.
    renewals = consul.requests().get("PUT session/renew", 0)
    not_renewed_at = waiting_since = time.monotonic()
    while True:
        polled = time.monotonic()
        if consul.requests().get("PUT session/renew", 0) > renewals:
            break
        not_renewed_at = polled
        assert polled - waiting_since < TTL, "the primary never renewed its session"
        time.sleep(0.02)
    consul.refuse(TTL + LOCK_DELAY)
    expires_no_earlier_than = not_renewed_at + TTL

    value = 0
    while (error := insert(first, value)) is None:
        assert time.monotonic() < expires_no_earlier_than + TTL, "node-a kept taking writes"
        value += 1
        time.sleep(0.05)
    stopped = time.monotonic()
    # A write under way as the node steps down fails however SQLite sees it
    # (read-only database, I/O error, journal that cannot be created); the
    # next fails as on any replica.
    assert error
    assert "attempt to write a readonly database" in (insert(first, value) or "")
    report(record_property, "writes_stopped_before_expiry", expires_no_earlier_than - stopped)
    assert stopped < expires_no_earlier_than, (
        f"node-a took writes {stopped - expires_no_earlier_than:.3f}s after its session "
        "could have expired"
    )
    assert value > 0, "node-a stopped writes at once rather than when its lease ran out"
    assert role(first) == "replica"

    # Once Consul is back, one node leads again and the other follows it.
    # Both hold every write node-a acknowledged, and nothing it refused.
    primary = cluster.only_primary()
    replica = second if primary is first else first
    wait_for(lambda: follows(replica, primary), 15, "the other node to follow")
    assert insert(primary, -1) is None
    assert_identical(replica, primary)
    assert rows(replica) == [-1, *range(value)]


# -- a writer through repeated failovers ------------------------------------------


class Writer(threading.Thread):
    """Inserts rows, one transaction each, on whichever node takes them.

    Every attempt uses a new value, so a failed attempt that did commit
    cannot be confused with a later one. `acknowledged` holds the values
    whose INSERT returned success.
    """

    def __init__(self, nodes: Sequence[NodeProcess]) -> None:
        super().__init__(name="writer", daemon=True)
        self.nodes = nodes
        self.acknowledged: list[int] = []
        self.acknowledged_by: dict[int, str] = {}
        self.attempts = 0
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._running = threading.Event()
        self._idle = threading.Event()
        self._running.set()

    def run(self) -> None:
        try:
            self._write()
        except BaseException as exc:
            self.error = exc
            self._idle.set()

    def _write(self) -> None:
        preferred = self.nodes[0]
        while not self._stopping.is_set():
            if not self._running.is_set():
                self._idle.set()
                self._running.wait(0.1)
                continue
            self._idle.clear()
            for node in [preferred, *(n for n in self.nodes if n is not preferred)]:
                self.attempts += 1
                if insert(node, self.attempts) is None:
                    self.acknowledged.append(self.attempts)
                    self.acknowledged_by[self.attempts] = node.name
                    preferred = node
                    break
            else:
                time.sleep(0.02)

    def pause(self) -> None:
        """Return once no INSERT is under way."""
        self._idle.clear()
        self._running.clear()
        assert self._idle.wait(10), "the writer did not pause"
        self.check()

    def resume(self) -> None:
        self._running.set()

    def stop(self) -> None:
        self._stopping.set()
        self._running.set()
        self.join(MOUNT_ANSWERS_WITHIN + 5)

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the writer failed: {self.error}") from self.error

    def wait_for_more(self, count: int, timeout: float = SETTLE_TIMEOUT) -> None:
        target = len(self.acknowledged) + count

        def written() -> bool:
            self.check()
            return len(self.acknowledged) >= target

        wait_for(written, timeout, f"{count} more writes")


@pytest.mark.timeout(110)
def test_acknowledged_writes_survive_repeated_failovers(
    cluster: Cluster, journal_mode: str
) -> None:
    """Three nodes; the primary is stopped (SIGINT) or crashes (kill -9) and
    is restarted, three times, while a writer keeps inserting rows on
    whichever node is primary.

    A clean stop hands over everything committed. A crash loses what the
    replicas had not received yet, since replication is asynchronous as in
    LiteFS: before a crash the writer pauses until the replicas hold every
    acknowledged row, and resumes right after.
    """
    nodes = [cluster.start("node-a")]
    wait_for(lambda: role(nodes[0]) == "primary", 15, "node-a to become primary")
    nodes += [cluster.start("node-b"), cluster.start("node-c")]
    for node in nodes[1:]:
        wait_for(partial(follows, node, nodes[0]), 15, f"{node.name} to follow")
    nodes[0].sqlite(DB, journal_mode + "CREATE TABLE t (n INTEGER PRIMARY KEY);")

    writer = Writer(nodes)
    writer.start()
    try:
        writer.wait_for_more(20)
        for how in (signal.SIGINT, signal.SIGKILL, signal.SIGINT):
            old = cluster.only_primary()
            if how == signal.SIGKILL:
                writer.pause()
                wait_for(partial(all_caught_up, nodes, old), 15, "the replicas to catch up")
                old.kill()
                writer.resume()
            else:
                assert old.stop(how) == 0
            timeout = KILLED_PRIMARY_REPLACED_WITHIN + 5
            new = cluster.only_primary(timeout)
            assert new is not old
            writer.wait_for_more(20, timeout)
            old.start()
            wait_for(partial(follows, old, new), 15, f"{old.name} to follow")
            writer.wait_for_more(20)
    finally:
        writer.stop()
    writer.check()

    primary = cluster.only_primary()
    for node in nodes:
        assert_identical(node, primary)
    assert len({position(node, DB) for node in nodes}) == 1
    acknowledged = set(writer.acknowledged)
    for node in nodes:
        present = set(rows(node))
        missing = sorted(acknowledged - present)
        by = {value: writer.acknowledged_by[value] for value in missing[:20]}
        assert not missing, f"{node.name} lacks acknowledged rows (value: acknowledged by) {by}"
    assert len({tuple(rows(node)) for node in nodes}) == 1


@pytest.mark.timeout(60)
def test_clean_stop_hands_over_every_committed_transaction(
    cluster: Cluster, journal_mode: str
) -> None:
    """A primary stopped with SIGINT just after a commit: the node that takes
    over holds that transaction, and the stopped node, started again, keeps it."""
    old = cluster.start("node-a")
    wait_for(lambda: role(old) == "primary", 15, "node-a to become primary")
    replica = cluster.start("node-b")
    wait_for(lambda: follows(replica, old), 15, "node-b to follow node-a")
    old.sqlite(DB, journal_mode + "CREATE TABLE t (n INTEGER, pad BLOB);")
    wait_for(lambda: caught_up(replica, old), REPLICATED_WITHIN, "node-b to catch up")

    old.sqlite(
        DB,
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 20000) "
        "INSERT INTO t SELECT n, randomblob(1000) FROM r;",
    )
    committed = position(old, DB)
    assert old.stop(signal.SIGINT) == 0

    wait_for(lambda: role(replica) == "primary", 15, "node-b to take over")
    assert position(replica, DB) == committed
    old.start()
    wait_for(lambda: follows(old, replica), 15, "node-a to follow node-b")
    assert_identical(old, replica)
    assert rows(old) == list(range(1, 20001))


# -- a diverged old primary -----------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("lost", "new"),
    [(2, 1), (2, 2), (2, 3)],
    ids=["old-primary-ahead", "same-txid", "old-primary-behind"],
)
def test_diverged_old_primary_is_reseeded_from_the_new_one(
    cluster: Cluster, lost: int, new: int, journal_mode: str
) -> None:
    """The old primary committed `lost` transactions the replica never saw,
    then crashed; the replica became primary and committed `new` others."""
    old = cluster.start("node-a")
    wait_for(lambda: role(old) == "primary", 15, "node-a to become primary")
    replica = cluster.start("node-b")
    wait_for(lambda: follows(replica, old), 15, "node-b to follow node-a")
    old.sqlite(DB, journal_mode + "CREATE TABLE t (n INTEGER); INSERT INTO t VALUES (0);")
    wait_for(lambda: caught_up(replica, old), REPLICATED_WITHIN, "node-b to catch up")

    assert replica.stop() == 0
    for n in range(1, lost + 1):
        assert insert(old, -n) is None
    diverged_at = position(old, DB)
    session = cluster.consul.session_holding(cluster.key)
    assert session is not None
    old.kill()
    # Consul gives up on the crashed node's session (sooner than its TTL, to
    # keep the test short); the lock-delay still applies.
    cluster.consul.destroy_session(session)

    replica.start()
    wait_for(lambda: role(replica) == "primary", 15, "node-b to become primary")
    for n in range(1, new + 1):
        assert insert(replica, n) is None
    assert position(replica, DB) != diverged_at

    old.start()
    wait_for(lambda: follows(old, replica), 15, "node-a to follow node-b")
    assert_identical(old, replica)
    assert rows(old) == list(range(new + 1))
    assert f"sending {DB} a snapshot" in replica.log()
