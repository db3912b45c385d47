"""The proxy in a real three-node cluster, each node with the example web app.

Every node is a `litefs mount` daemon with an etcd lease and a `proxy:`
section; behind each proxy runs examples/proxy/app.py, writing to the
database in that node's mount. Clients talk to the proxies only.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import StartNode
from etcd_server import EtcdServer, etcd_server
from node_process import NodeProcess, free_port
from test_etcd_cluster import etcd_lease, wait_elected, wait_for

__all__ = ["etcd_server"]

pytestmark = pytest.mark.fuse

APP = Path(__file__).resolve().parent.parent / "examples" / "proxy" / "app.py"
DB = "app.db"
REDIRECT_TIMEOUT = 0.2
"""Well under the time the lease outlives a killed primary (TTL less one renewal)."""


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def cookie(self) -> str | None:
        for value in self.headers.get_all("Set-Cookie") or []:
            if value.startswith("__txid="):
                return value.split(";")[0]
        return None


@dataclass
class Member:
    node: NodeProcess
    proxy_port: int
    app_port: int

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def request(
        self, method: str, path: str, body: bytes | None = None, cookie: str | None = None
    ) -> Answer:
        request = urllib.request.Request(self.proxy + path, data=body, method=method)
        if cookie:
            request.add_header("Cookie", cookie)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return Answer(response.status, response.headers, response.read())
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, exc.headers, exc.read())


@dataclass
class Cluster:
    members: list[Member]
    apps: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def primary(self, among: list[Member] | None = None) -> Member:
        group = among or self.members
        leader = wait_elected([m.node for m in group])
        return next(m for m in group if m.node is leader)

    def replicas(self, primary: Member) -> list[Member]:
        return [m for m in self.members if m is not primary]


def start_app(member: Member) -> subprocess.Popen[bytes]:
    db = member.node.mount_dir / DB
    name = member.node.name
    command = [sys.executable, str(APP), "--db", str(db), "--port", str(member.app_port)]
    return subprocess.Popen([*command, "--name", name], stdin=subprocess.DEVNULL)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def cluster(start_node: StartNode, etcd_server: EtcdServer) -> Iterator[Cluster]:
    members = []
    for index in range(3):
        proxy_port, app_port = free_port(), free_port()
        settings = etcd_lease(etcd_server)
        settings["proxy"] = {
            "addr": f"127.0.0.1:{proxy_port}",
            "target": f"127.0.0.1:{app_port}",
            "db": DB,
            "primary-redirect-timeout": f"{REDIRECT_TIMEOUT:g}s",
            "max-lag": "5s",
        }
        node = start_node(f"node{index + 1}", settings=settings)
        members.append(Member(node, proxy_port, app_port))
    cluster = Cluster(members)
    try:
        for member in members:
            cluster.apps.append(start_app(member))
        for member in members:
            wait_for(lambda m=member: listening(m.app_port), 10, "the app listens")
        yield cluster
    finally:
        for app in cluster.apps:
            app.kill()
            app.wait(10)


def served_by(answer: Answer) -> str | None:
    return answer.headers.get("X-Served-By")


def test_a_write_to_a_replica_runs_on_the_primary_and_the_writer_reads_it_there_at_once(
    cluster: Cluster,
) -> None:
    primary = cluster.primary()
    for replica in cluster.replicas(primary):
        wrote = replica.request("POST", "/items", f"from {replica.node.name}".encode())
        assert wrote.status == 201, wrote.body
        assert served_by(wrote) == primary.node.name
        cookie = wrote.cookie()
        assert cookie is not None, "a write sets the position cookie"
        read = replica.request("GET", "/items", cookie=cookie)
        assert read.status == 200
        assert served_by(read) == replica.node.name
        assert f"from {replica.node.name}".encode() in read.body
    on_primary = primary.node.sqlite(DB, "SELECT body FROM items ORDER BY id;").stdout
    assert on_primary.splitlines() == [f"from {m.node.name}" for m in cluster.replicas(primary)]


def test_a_read_without_the_cookie_is_served_by_the_local_application(cluster: Cluster) -> None:
    primary = cluster.primary()
    for member in cluster.members:
        answer = member.request("GET", "/items")
        assert answer.status == 200
        assert served_by(answer) == member.node.name
        assert answer.cookie() is None
    assert primary.request("POST", "/items", b"x").cookie() is not None


def test_health_is_200_on_the_primary_and_on_caught_up_replicas(cluster: Cluster) -> None:
    primary = cluster.primary()
    for member in cluster.members:
        wait_for(lambda m=member: m.request("GET", "/litefs/health").status == 200, 10)
    assert b'"primary"' in primary.request("GET", "/litefs/health").body


def test_writes_get_503_while_there_is_no_primary_then_reach_the_new_one(
    cluster: Cluster,
) -> None:
    primary = cluster.primary()
    replica = cluster.replicas(primary)[0]
    before = replica.request("POST", "/items", b"before")
    assert before.status == 201
    for member in cluster.replicas(primary):
        # Replication is asynchronous: only what reached a replica outlives a crash.
        assert b"before" in member.request("GET", "/items", cookie=before.cookie()).body
    primary.node.kill()
    refused = replica.request("POST", "/items", b"during")
    assert refused.status == 503, refused.body
    assert refused.headers.get("Retry-After")
    survivors = cluster.replicas(primary)
    answers: list[Answer] = []

    def written() -> bool:
        answers.append(replica.request("POST", "/items", b"after"))
        return answers[-1].status == 201

    wait_for(written, 30, "a write succeeds once a new primary is elected")
    assert {a.status for a in answers} <= {201, 503}
    leader = cluster.primary(survivors)
    assert served_by(answers[-1]) == leader.node.name
    read = replica.request("GET", "/items", cookie=answers[-1].cookie())
    assert b"after" in read.body and b"before" in read.body


def test_the_primary_dying_in_the_middle_of_a_forwarded_request_gives_502(
    cluster: Cluster,
) -> None:
    primary = cluster.primary()
    replica = cluster.replicas(primary)[0]
    with socket.create_connection(("127.0.0.1", replica.proxy_port), timeout=30) as conn:
        head = (
            f"POST /items HTTP/1.1\r\nHost: app\r\nContent-Length: {1 << 20}\r\n"
            "Content-Type: text/plain\r\n\r\n"
        )
        conn.sendall(head.encode() + b"x" * 100_000)
        time.sleep(1.0)  # a large body is passed on as it arrives, while it trickles in
        primary.node.kill()
        answer = read_status(conn.recv)
    assert answer == 502


def read_status(recv: Callable[[int], bytes]) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = recv(4096)
        if not chunk:
            raise AssertionError(f"the proxy closed the connection without an answer: {data!r}")
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_a_busy_proxy_port_stops_the_node_with_one_line_and_mounts_nothing(
    start_node: StartNode,
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proxy = {"addr": f"127.0.0.1:{port}", "target": "127.0.0.1:1", "db": DB}
        node = start_node("node1", wait=False, settings={"proxy": proxy})
        assert node.wait_exit() == 1
    assert f"cannot listen on 127.0.0.1:{port}" in node.log()
    assert "Traceback" not in node.log()
    assert not node.mount_dir.is_mount()
