"""Three real nodes elect their primary with a real etcd, and fail over.

Every node is a `litefs mount` daemon on its own FUSE mount, configured with
`lease.type: etcd` and a 2 s TTL against an etcd started for the test. The
tests kill, stop and freeze the primary (and etcd itself) and check what the
design promises: one primary at a time, hand-over at once on a clean stop and
within the TTL after a crash, a resumed primary that refuses writes and
follows, and no acknowledged transaction lost.
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import pytest
from conftest import StartNode
from etcd_server import EtcdServer, etcd_server
from node_process import NodeProcess
from waiting import wait_for

from litefs import ltx
from litefs.lease import Standing

__all__ = ["etcd_server"]

pytestmark = pytest.mark.fuse

TTL = 2.0
CLEAN_HANDOVER = 1.0
"""A primary that stops cleanly gives the lease up: another node writes within this."""
CRASH_HANDOVER = TTL + 2.0
"""A primary that dies is replaced once its lease runs out, within this."""
SETTLE_TIMEOUT = 20.0
DB = "app.db"


def etcd_lease(etcd: EtcdServer) -> dict[str, Any]:
    return {
        "lease": {
            "type": "etcd",
            "candidate": True,
            "etcd": {"endpoints": [etcd.url], "key": "litefs/primary", "ttl": f"{TTL:g}s"},
        }
    }


def info(node: NodeProcess, timeout: float = 0.5) -> dict[str, Any] | None:
    """The node's /info, or None when it does not answer in time."""
    try:
        with urllib.request.urlopen(f"{node.url}/info", timeout=timeout) as resp:
            answer: dict[str, Any] = json.load(resp)
            return answer
    except (OSError, ValueError):
        return None


def role(node: NodeProcess, timeout: float = 0.5) -> str | None:
    answer = info(node, timeout)
    return None if answer is None else str(answer["role"])


def is_not_primary(node: NodeProcess) -> bool:
    return role(node) != "primary"


def connect(node: NodeProcess, db: str = DB) -> sqlite3.Connection:
    """A connection through the node's mount that never creates the file, so a
    mount that went away cannot be mistaken for an empty database."""
    uri = f"file:{node.mount_dir / db}?mode=rw"
    return sqlite3.connect(uri, uri=True, timeout=1.0, isolation_level=None)


def write(node: NodeProcess, sql: str, params: Sequence[object] = (), db: str = DB) -> bool:
    """Run one write transaction through the node's mount; True if it committed."""
    try:
        conn = connect(node, db)
    except sqlite3.Error:
        return False
    try:
        conn.execute(sql, params)
        return True
    except sqlite3.Error:
        return False
    finally:
        conn.close()


def start_sqlite(node: NodeProcess, sql: str) -> subprocess.Popen[bytes]:
    """Start the `sqlite3` shell on the node's database with `sql` as its input."""
    proc = subprocess.Popen(
        ["sqlite3", "-bail", str(node.mount_dir / DB)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None
    proc.stdin.write(sql.encode())
    proc.stdin.close()
    return proc


def write_in_subprocess(node: NodeProcess, sql: str, timeout: float = 10.0) -> bool:
    """Like `write`, from a separate `sqlite3` process: safe on a node that may be frozen."""
    try:
        result = subprocess.run(
            ["sqlite3", "-bail", str(node.mount_dir / DB)],
            input=sql,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def rows(node: NodeProcess) -> list[str]:
    conn = sqlite3.connect(f"file:{node.mount_dir / DB}?mode=ro", uri=True, timeout=5.0)
    try:
        return [str(value) for (value,) in conn.execute("SELECT x FROM t ORDER BY rowid")]
    finally:
        conn.close()


def position(node: NodeProcess, db: str = DB) -> str:
    try:
        return (node.mount_dir / f"{db}-pos").read_text().strip()
    except OSError:
        return ""


def txid(node: NodeProcess, db: str = DB) -> int:
    return int(position(node, db).split("/")[0], 16)


def elected(nodes: Sequence[NodeProcess]) -> NodeProcess | None:
    """The primary, if exactly one node says it is and every other follows it."""
    answers = [info(node) for node in nodes]
    roles = {node.name: answer for node, answer in zip(nodes, answers, strict=True) if answer}
    if len(roles) != len(nodes):
        return None
    leaders = [node for node in nodes if roles[node.name]["role"] == "primary"]
    if len(leaders) != 1:
        return None
    leader = leaders[0]
    for node in nodes:
        answer = roles[node.name]
        if node is not leader and (
            answer["role"] != "replica" or (answer["primary"] or {}).get("hostname") != leader.name
        ):
            return None
    return leader


def wait_elected(nodes: Sequence[NodeProcess], timeout: float = SETTLE_TIMEOUT) -> NodeProcess:
    found: list[NodeProcess] = []

    def settled() -> bool:
        leader = elected(nodes)
        if leader is not None:
            found.append(leader)
        return leader is not None

    wait_for(settled, timeout, "one primary, followed by every other node")
    return found[-1]


def wait_identical(nodes: Sequence[NodeProcess], db: str = DB) -> str:
    """Wait until every node is at the same position; check the files are equal."""

    def same() -> bool:
        seen = {position(node, db) for node in nodes}
        return len(seen) == 1 and "" not in seen

    wait_for(same, what=f"every node at one position of {db}", timeout=SETTLE_TIMEOUT)
    pos = position(nodes[0], db)
    checksum = int(pos.split("/")[1], 16)
    contents = {node.committed_database(db) for node in nodes}
    assert len(contents) == 1, f"nodes at {pos} hold different {db} contents"
    for node in nodes:
        assert node.committed_checksum(db) == checksum
    return pos


def first_write(
    candidates: Sequence[NodeProcess], value: str, timeout: float
) -> tuple[NodeProcess, float]:
    """Offer one write to every candidate in turn until one commits it; return
    that node and the moment it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in candidates:
            if write(node, "INSERT INTO t VALUES (?)", (value,)):
                return node, time.monotonic()
        time.sleep(0.005)
    raise AssertionError(f"no node took a write within {timeout:g} s")


class Cluster:
    def __init__(self, etcd: EtcdServer, nodes: list[NodeProcess]) -> None:
        self.etcd = etcd
        self.nodes = nodes

    def others(self, node: NodeProcess) -> list[NodeProcess]:
        return [other for other in self.nodes if other is not node]

    def live(self) -> list[NodeProcess]:
        return [node for node in self.nodes if node.process is not None]

    def freeze(self, node: NodeProcess) -> None:
        assert node.process is not None
        node.process.send_signal(signal.SIGSTOP)

    def thaw(self, node: NodeProcess) -> None:
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGCONT)


@pytest.fixture(params=["DELETE", "WAL"])
def cluster(
    etcd_server: EtcdServer, start_node: StartNode, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    """Three candidate nodes on one etcd key, with a table `t (x)` in app.db,
    in each journal mode."""
    nodes = [
        start_node(name, wait=False, settings=etcd_lease(etcd_server))
        for name in ("node1", "node2", "node3")
    ]
    for node in nodes:
        node.wait_mounted()
    made = Cluster(etcd_server, nodes)
    try:
        leader = wait_elected(nodes)
        leader.sqlite(DB, f"PRAGMA journal_mode={request.param}; CREATE TABLE t (x);")
        wait_identical(nodes)
        yield made
    finally:
        # A frozen daemon could not be stopped, nor its mount even looked at.
        for node in nodes:
            made.thaw(node)


def test_three_nodes_elect_exactly_one_primary_and_the_others_follow_it(
    cluster: Cluster,
) -> None:
    leader = wait_elected(cluster.nodes)
    for node in cluster.others(leader):
        assert (node.mount_dir / ".primary").read_text() == f"{leader.name}\n"

    accepted = [
        node for node in cluster.nodes if write(node, "INSERT INTO t VALUES (?)", (node.name,))
    ]
    assert accepted == [leader]

    wait_identical(cluster.nodes)
    for node in cluster.nodes:
        assert rows(node) == [leader.name]
    assert elected(cluster.nodes) is leader


def test_primary_stopped_with_sigint_hands_over_at_once(cluster: Cluster) -> None:
    old = wait_elected(cluster.nodes)
    assert write(old, "INSERT INTO t VALUES ('before')")
    wait_identical(cluster.nodes)

    assert old.process is not None
    signalled = time.monotonic()
    old.process.send_signal(signal.SIGINT)
    new, took_write = first_write(cluster.others(old), "after", timeout=CLEAN_HANDOVER + 5)
    handover = took_write - signalled
    assert old.wait_exit() == 0

    print(f"SIGINT hand-over: {handover:.3f} s")
    assert handover < CLEAN_HANDOVER, f"clean hand-over took {handover:.2f} s"
    survivors = cluster.others(old)
    assert wait_elected(survivors) is new
    wait_identical(survivors)
    assert rows(new) == ["before", "after"]


def test_killed_primary_is_replaced_within_the_ttl(cluster: Cluster) -> None:
    old = wait_elected(cluster.nodes)
    assert write(old, "INSERT INTO t VALUES ('before')")
    wait_identical(cluster.nodes)

    killed = time.monotonic()
    old.kill()
    new, took_write = first_write(cluster.others(old), "after", timeout=CRASH_HANDOVER + 5)
    failover = took_write - killed

    print(f"kill -9 fail-over: {failover:.3f} s")
    assert failover < CRASH_HANDOVER, f"fail-over took {failover:.2f} s"
    # The dead primary renewed its lease a third of the TTL before the kill at
    # most; no other node may write until the lease has run out.
    assert failover > TTL / 2, f"a new primary only {failover:.2f} s after the kill"

    old.start()
    assert wait_elected(cluster.nodes) is new
    wait_identical(cluster.nodes)
    assert rows(old) == ["before", "after"]


def test_frozen_primary_is_replaced_and_on_resuming_refuses_writes_and_is_reseeded(
    cluster: Cluster,
) -> None:
    old = wait_elected(cluster.nodes)
    assert write(old, "INSERT INTO t VALUES ('shared')")
    wait_identical(cluster.nodes)
    # The old primary commits a transaction no other node receives (they are
    # down), then freezes: the others come back, wait out its lease, and one
    # of them commits other transactions at the same TXIDs.
    replicas = cluster.others(old)
    for node in replicas:
        assert node.stop() == 0
    assert write(old, "INSERT INTO t VALUES ('lost with the old primary')")
    txid_at_freeze = txid(old)

    frozen = time.monotonic()
    cluster.freeze(old)
    # An application on the frozen machine is caught mid-write: its request
    # waits in the kernel until the daemon resumes.
    waiting = start_sqlite(old, "INSERT INTO t VALUES ('waited through the freeze');")
    try:
        for node in replicas:
            node.start(wait=False)
        new, took_write = first_write(replicas, "after 1", timeout=CRASH_HANDOVER + 10)
        failover = took_write - frozen
        print(f"SIGSTOP fail-over (replicas restarting meanwhile): {failover:.3f} s")
        assert failover < CRASH_HANDOVER + 2.0, f"fail-over took {failover:.2f} s"
        assert write(new, "INSERT INTO t VALUES ('after 2')")
        assert txid(new) > txid_at_freeze
        assert waiting.poll() is None, "a write went through while the daemon was frozen"
        log_before = len(new.log())

        cluster.thaw(old)
        assert not write_in_subprocess(old, "INSERT INTO t VALUES ('after resuming');"), (
            "the resumed primary accepted a write after its lease had run out"
        )
        assert waiting.wait(10) != 0, "the write that waited through the freeze went through"
    finally:
        cluster.thaw(old)
        waiting.kill()
        waiting.wait()
    assert role(old, timeout=5.0) == "replica"

    assert wait_elected(cluster.nodes) is new
    wait_identical(cluster.nodes)
    for node in cluster.nodes:
        assert rows(node) == ["shared", "after 1", "after 2"]
    assert f"sending {DB} a snapshot" in new.log()[log_before:]


def test_etcd_restart_never_gives_two_primaries_and_replication_resumes(
    cluster: Cluster,
) -> None:
    wait_elected(cluster.nodes)
    samples: list[tuple[float, list[str | None]]] = []
    stop = threading.Event()

    def sample_roles() -> None:
        with ThreadPoolExecutor(len(cluster.nodes)) as pool:
            while not stop.is_set():
                at = time.monotonic()
                roles = list(pool.map(lambda node: role(node, timeout=0.3), cluster.nodes))
                samples.append((at, roles))
                stop.wait(max(0.0, 0.05 - (time.monotonic() - at)))

    sampler = threading.Thread(target=sample_roles)
    sampler.start()
    try:
        outage_started = time.monotonic()
        cluster.etcd.stop()
        time.sleep(TTL - 0.5)
        cluster.etcd.start()
        outage = time.monotonic() - outage_started
        leader = wait_elected(cluster.nodes)
        assert write(leader, "INSERT INTO t VALUES ('after the outage')")
        wait_identical(cluster.nodes)
        time.sleep(0.5)
    finally:
        stop.set()
        sampler.join()

    print(f"etcd down for {outage:.2f} s; {len(samples)} samples; primary now {leader.name}")
    assert all(node.process is not None and node.process.poll() is None for node in cluster.nodes)
    during = [roles for at, roles in samples if outage_started <= at <= outage_started + outage]
    assert len(during) > outage / 0.2, f"only {len(during)} samples while etcd was down"
    doubled = [(at - outage_started, roles) for at, roles in samples if roles.count("primary") > 1]
    assert not doubled, f"two primaries at once: {doubled[:5]}"
    for node in cluster.nodes:
        assert rows(node) == ["after the outage"]


class Writer:
    """Inserts 0, 1, 2, ... through whichever node takes writes, retrying each
    number until a node commits it, and remembers what was acknowledged."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.acknowledged: list[int] = []
        self.failures = 0
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._idle = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._running.set()
        self._thread.join(30)

    def pause(self) -> None:
        """Return once the writer is between transactions and starts no other."""
        self._idle.clear()
        self._running.clear()
        assert self._idle.wait(10), "the writer did not pause"

    def resume(self) -> None:
        self._running.set()

    def wait_count(self, count: int, timeout: float = SETTLE_TIMEOUT) -> None:
        wait_for(lambda: len(self.acknowledged) >= count, timeout, f"{count} acknowledged")
        assert self._error is None, self._error

    def _run(self) -> None:
        try:
            value = 0
            preferred = 0
            while not self._stop.is_set():
                if not self._running.is_set():
                    self._idle.set()
                    self._running.wait()
                    continue
                nodes = self.cluster.live()
                for offset in range(len(nodes)):
                    node = nodes[(preferred + offset) % len(nodes)]
                    if write(node, "INSERT OR IGNORE INTO t VALUES (?)", (str(value),)):
                        self.acknowledged.append(value)
                        value += 1
                        preferred = (preferred + offset) % len(nodes)
                        break
                    self.failures += 1
                else:
                    time.sleep(0.01)
        except BaseException as exc:
            self._error = exc


def test_writer_through_repeated_failovers_loses_no_acknowledged_transaction(
    cluster: Cluster,
) -> None:
    """The writer keeps offering transactions to every node while primaries
    come and go. It pauses only at the moment of each signal: replication is
    asynchronous, as in LiteFS, so what a killed primary had not yet shipped
    is gone with it, and a transaction committing as a primary stops cleanly
    is the subject of its own test below."""
    failovers: list[tuple[str, float]] = []
    with Writer(cluster) as writer:
        for how in ("SIGINT", "kill -9", "SIGINT"):
            writer.wait_count(len(writer.acknowledged) + 50)
            old = wait_elected(cluster.nodes)
            assert old.process is not None
            writer.pause()
            before = len(writer.acknowledged)
            if how == "SIGINT":
                started = time.monotonic()
                old.process.send_signal(signal.SIGINT)
                wait_for(
                    partial(is_not_primary, old),
                    what="the old primary to step down",
                    timeout=SETTLE_TIMEOUT,
                )
            else:
                wait_identical(cluster.nodes)
                started = time.monotonic()
                old.kill()
            writer.resume()
            writer.wait_count(before + 1, timeout=CRASH_HANDOVER + 10)
            failovers.append((how, time.monotonic() - started))
            if how == "SIGINT":
                assert old.wait_exit() == 0
            old.start()
            new = wait_elected(cluster.nodes)
            assert new is not old, f"{old.name} is primary again after {how}"
        writer.wait_count(len(writer.acknowledged) + 50)
    print("writer fail-overs: " + ", ".join(f"{how} {t:.2f} s" for how, t in failovers))

    final = wait_identical(cluster.nodes)
    committed = [int(x) for x in rows(cluster.nodes[0])]
    lost = sorted(set(writer.acknowledged) - set(committed))
    assert not lost, f"acknowledged but lost: {lost}"
    assert len(committed) == len(set(committed))
    for node in cluster.nodes:
        assert position(node) == final
        assert [int(x) for x in rows(node)] == committed


def test_transaction_committing_as_the_primary_stops_cleanly_reaches_the_new_primary(
    cluster: Cluster,
) -> None:
    old = wait_elected(cluster.nodes)
    assert old.process is not None
    old.sqlite(DB, "CREATE TABLE big (b BLOB);")
    wait_identical(cluster.nodes)
    next_txid = txid(old) + 1
    committing = old.db_dir(DB) / "ltx" / ltx.format_filename(next_txid, next_txid)
    outcome: list[BaseException | None] = []

    def big_transaction() -> None:
        conn = connect(old)
        try:
            conn.execute("BEGIN")
            conn.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 40000) "
                "INSERT INTO big SELECT randomblob(1000) FROM n"
            )
            conn.execute("INSERT INTO t VALUES ('big')")
            conn.execute("COMMIT")
            outcome.append(None)
        except sqlite3.Error as exc:
            outcome.append(exc)
        finally:
            conn.close()

    writer = threading.Thread(target=big_transaction)
    writer.start()
    try:
        # The LTX file appears when the commit begins; capturing ten thousand
        # pages takes long enough for the signal to land during it.
        wait_for(committing.exists, timeout=60, what="the commit to begin")
        old.process.send_signal(signal.SIGINT)
    finally:
        writer.join(60)
    assert old.wait_exit() == 0

    survivors = cluster.others(old)
    new = wait_elected(survivors)
    wait_identical(survivors)
    acknowledged = outcome == [None]
    assert ("big" in rows(new)) == acknowledged, (
        f"COMMIT {'succeeded' if acknowledged else f'failed ({outcome})'} on the old primary, "
        f"the new primary holds {rows(new)}"
    )


class EtcdProxy:
    """A TCP relay in front of etcd for one node, which can run a hook just
    before it forwards that node's next lease keepalive."""

    def __init__(self, etcd: EtcdServer) -> None:
        self._target = ("127.0.0.1", etcd.client_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._hook: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._spawn(self._accept)

    def before_next_keepalive(self, hook: Callable[[], None]) -> None:
        with self._lock:
            self._hook = hook

    def close(self) -> None:
        self._closed = True
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self._sockets += [client, server]
            self._spawn(self._pump, client, server, True)
            self._spawn(self._pump, server, client, False)

    def _pump(self, source: socket.socket, dest: socket.socket, requests: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if requests and b"/v3/lease/keepalive" in data:
                    with self._lock:
                        hook, self._hook = self._hook, None
                    if hook is not None:
                        hook()
                dest.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dest.shutdown(socket.SHUT_WR)


@pytest.fixture
def etcd_proxy(etcd_server: EtcdServer) -> Iterator[EtcdProxy]:
    proxy = EtcdProxy(etcd_server)
    try:
        yield proxy
    finally:
        proxy.close()


def test_primary_frozen_while_renewing_its_lease_refuses_writes_on_resuming(
    etcd_server: EtcdServer, etcd_proxy: EtcdProxy, start_node: StartNode
) -> None:
    through_proxy = etcd_lease(etcd_server)
    through_proxy["lease"]["etcd"]["endpoints"] = [etcd_proxy.url]
    old = start_node("node1", settings=through_proxy)
    wait_for(lambda: role(old) == "primary", what="node1 to be the primary", timeout=SETTLE_TIMEOUT)
    old.sqlite(DB, "CREATE TABLE t (x);")
    others = [start_node(name, settings=etcd_lease(etcd_server)) for name in ("node2", "node3")]
    cluster = Cluster(etcd_server, [old, *others])
    frozen = threading.Event()

    def freeze() -> None:
        cluster.freeze(old)
        frozen.set()

    try:
        assert wait_elected(cluster.nodes) is old
        wait_identical(cluster.nodes)
        # etcd answers this keepalive at once, but the node only reads the
        # answer after it resumes, long past its lease's deadline.
        etcd_proxy.before_next_keepalive(freeze)
        assert frozen.wait(5), "no keepalive within a renewal interval"
        new, _ = first_write(others, "new primary", timeout=CRASH_HANDOVER + 5)
        cluster.thaw(old)
        assert not write_in_subprocess(old, "INSERT INTO t VALUES ('split brain');"), (
            "the resumed primary accepted a write while another node was primary"
        )
    finally:
        cluster.thaw(old)
    assert wait_elected(cluster.nodes) is new
    wait_identical(cluster.nodes)
    assert rows(old) == ["new primary"]


def dropping_cluster(etcd_server: EtcdServer, start_node: StartNode) -> tuple[Cluster, NodeProcess]:
    """Three nodes, one elected, whose primary drops a replica that takes no
    bytes for a second: a frozen replica misses what it commits meanwhile."""
    settings = {**etcd_lease(etcd_server), "http": {"write-timeout": "1s"}}
    nodes = [start_node(name, settings=settings) for name in ("node1", "node2", "node3")]
    cluster = Cluster(etcd_server, nodes)
    old = wait_elected(nodes)
    old.sqlite(DB, "CREATE TABLE t (x); CREATE TABLE big (b); INSERT INTO t VALUES ('one');")
    wait_identical(nodes)
    return cluster, old


def miss_commits(
    cluster: Cluster, primary: NodeProcess, behind: NodeProcess, megabytes: int, then: str = ""
) -> int:
    """Freeze `behind` and commit until the primary drops it; the TXID the
    primary acknowledged, which every other replica has."""
    rows = megabytes * 10  # of 100 kB each
    cluster.freeze(behind)
    primary.sqlite(
        DB,
        f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows}) "
        "INSERT INTO big SELECT randomblob(100000) FROM n;" + then,
    )
    acknowledged = txid(primary)
    for node in cluster.others(primary):
        if node is not behind:
            wait_for(lambda n=node: txid(n) == acknowledged, SETTLE_TIMEOUT, "the commits")
    wait_for(
        lambda: "dropping replica" in primary.log(), SETTLE_TIMEOUT, "the frozen replica dropped"
    )
    return acknowledged


def test_replica_that_missed_commits_leaves_the_lease_to_one_that_has_them(
    etcd_server: EtcdServer, start_node: StartNode
) -> None:
    cluster, old = dropping_cluster(etcd_server, start_node)
    nodes = cluster.nodes
    try:
        caught_up, lagging = cluster.others(old)
        frozen_at = time.monotonic()
        acknowledged = miss_commits(cluster, old, lagging, megabytes=40)
        time.sleep(max(0.0, frozen_at + 2 * TTL + 5.0 - time.monotonic()))

        # The caught-up replica cannot act when the lease runs out; the one
        # that missed the write can, and must still leave the lease alone.
        old.kill()
        time.sleep(0.3)
        cluster.freeze(caught_up)
        cluster.thaw(lagging)
        time.sleep(TTL + 1.0)
        cluster.thaw(caught_up)

        assert wait_elected([caught_up, lagging]) is caught_up
        assert txid(caught_up) >= acknowledged
        assert "leaving the lease to caught-up nodes" in lagging.log()
        wait_identical([caught_up, lagging])
    finally:
        for node in nodes:
            cluster.thaw(node)


def standing(etcd: EtcdServer, node: NodeProcess) -> Standing | None:
    """What the node last said about how recent its state is."""
    key = base64.b64encode(f"litefs/primary/standing/{node.name}".encode()).decode()
    request = urllib.request.Request(
        etcd.url + "/v3/kv/range", data=json.dumps({"key": key}).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        kvs = json.load(resp).get("kvs") or []
    return Standing.from_json(base64.b64decode(kvs[0]["value"])) if kvs else None


def test_of_two_replicas_the_one_holding_later_commits_wins_the_lease(
    etcd_server: EtcdServer, start_node: StartNode
) -> None:
    cluster, old = dropping_cluster(etcd_server, start_node)
    nodes = cluster.nodes
    try:
        ahead, behind = cluster.others(old)
        acknowledged = miss_commits(
            cluster, old, behind, megabytes=20, then=" INSERT INTO t VALUES ('two');"
        )

        # The replica behind trails by seconds only: too few for it to stand
        # back on its own. The one ahead says so when the lease moves, then
        # is slow to go on: the one behind finds the lease free first, and
        # must leave it anyway.
        killed_at = time.time()
        old.kill()
        cluster.thaw(behind)

        def ahead_stated_since_the_kill() -> bool:
            said = standing(etcd_server, ahead)
            return said is not None and said.said_at > killed_at

        wait_for(ahead_stated_since_the_kill, 2 * TTL + 5.0, "the standing of the replica ahead")
        cluster.freeze(ahead)
        wait_for(
            lambda: "leaving the lease to it" in behind.log(),
            5.0,
            "the replica behind leaving the lease",
        )
        cluster.thaw(ahead)

        assert wait_elected([ahead, behind]) is ahead
        assert txid(ahead) >= acknowledged
        wait_identical([ahead, behind])
        assert rows(behind) == ["one", "two"]
        assert "leaving the lease to caught-up nodes" not in behind.log()
    finally:
        for node in nodes:
            cluster.thaw(node)
