"""A node's HTTP API against real daemons: /info, /metrics, /stream's refusals,
and a replica written by hand from docs/protocol.md alone.

One primary and one replica serve the whole module (starting daemons is the
slow part); each test reads the positions it needs rather than assuming them,
so the order of the tests does not matter.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from conftest import StartNode
from node_process import NodeProcess
from prometheus_client.parser import text_string_to_metric_families
from waiting import wait_for

from litefs import ltx

pytestmark = pytest.mark.fuse

T = TypeVar("T")
DB = "api.db"


@dataclass(frozen=True)
class Cluster:
    primary: NodeProcess
    replica: NodeProcess


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    node: NodeProcess,
    path: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    content_type: str | None = None,
) -> Answer:
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(node.url + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Answer(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, dict(error.headers), error.read())


def info(node: NodeProcess) -> dict[str, Any]:
    answer = call(node, "/info")
    assert answer.status == 200, answer
    result: dict[str, Any] = answer.json()
    return result


def metrics(node: NodeProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples by (name, sorted labels), parsed as Prometheus itself would."""
    answer = call(node, "/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.body.decode())
        for sample in family.samples
    }


def position_file(node: NodeProcess, db: str) -> dict[str, str]:
    txid, checksum = (node.mount_dir / f"{db}-pos").read_text().strip().split("/")
    return {"txid": txid, "checksum": checksum}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("http-api")
    primary = NodeProcess(root, "primary")
    replica = NodeProcess(root, "replica", candidate=False, primary=primary)
    try:
        primary.start()
        replica.start()
        primary.sqlite(DB, "CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        wait_for(lambda: info(replica)["databases"].get(DB) == info(primary)["databases"][DB])
        yield Cluster(primary, replica)
    finally:
        replica.cleanup()
        primary.cleanup()


# -- /info --------------------------------------------------------------------


def test_info_on_the_primary_gives_its_role_and_each_database_position(cluster: Cluster) -> None:
    primary = cluster.primary
    body = info(primary)
    assert body["node"] == "primary"
    assert body["role"] == "primary"
    assert body["primary"] is None
    db = body["databases"][DB]
    assert {"txid": db["txid"], "checksum": db["checksum"]} == position_file(primary, DB)
    assert int(db["txid"], 16) >= 2
    assert db["page_size"] == 4096
    assert db["pages"] * 4096 == (primary.db_dir(DB) / "database").stat().st_size


def test_info_on_the_replica_names_its_primary_and_mirrors_its_positions(
    cluster: Cluster,
) -> None:
    primary, replica = cluster.primary, cluster.replica
    body = info(replica)
    assert body["role"] == "replica"
    assert body["primary"] == {"hostname": "primary", "advertise-url": primary.url}
    assert body["replicas"] == []
    wait_for(lambda: info(replica)["databases"][DB] == info(primary)["databases"][DB])
    assert info(replica)["databases"][DB] == info(primary)["databases"][DB]


def test_info_on_the_primary_lists_the_streaming_replica(cluster: Cluster) -> None:
    name = info(cluster.replica)["node"]
    assert name
    assert name in info(cluster.primary)["replicas"]


def test_info_after_a_write_shows_the_new_position_on_both_nodes(cluster: Cluster) -> None:
    primary, replica = cluster.primary, cluster.replica
    before = int(info(primary)["databases"][DB]["txid"], 16)
    primary.sqlite(DB, "INSERT INTO t VALUES ('info');")
    after = info(primary)["databases"][DB]
    assert int(after["txid"], 16) == before + 1
    assert {"txid": after["txid"], "checksum": after["checksum"]} == position_file(primary, DB)
    wait_for(lambda: info(replica)["databases"][DB] == after)


# -- /metrics -----------------------------------------------------------------


def test_metrics_on_the_primary_count_transactions_bytes_and_replicas(cluster: Cluster) -> None:
    primary = cluster.primary
    txid = int(info(primary)["databases"][DB]["txid"], 16)
    # Raw streams of other tests may still be closing: the replica's own stays.
    wait_for(lambda: metrics(primary)[("litefs_connected_replicas", ())] == 1)
    samples = metrics(primary)
    assert samples[("litefs_transactions_total", (("db", DB),))] == txid
    assert samples[("litefs_db_txid", (("db", DB),))] == txid
    assert samples[("litefs_ltx_bytes_total", ())] > 0
    assert samples[("litefs_replica_lag_seconds", ())] == 0
    assert samples[("litefs_is_primary", ())] == 1


def test_metrics_on_the_replica_count_applied_files_and_lag(cluster: Cluster) -> None:
    primary, replica = cluster.primary, cluster.replica
    wait_for(lambda: info(replica)["databases"][DB] == info(primary)["databases"][DB])
    samples = metrics(replica)
    assert samples[("litefs_transactions_total", (("db", DB),))] >= 1
    assert samples[("litefs_db_txid", (("db", DB),))] == int(
        info(primary)["databases"][DB]["txid"], 16
    )
    assert samples[("litefs_ltx_bytes_total", ())] > 0
    assert 0 <= samples[("litefs_replica_lag_seconds", ())] < 60
    assert samples[("litefs_connected_replicas", ())] == 0
    assert samples[("litefs_is_primary", ())] == 0


def test_restarting_the_primary_counts_no_transaction(start_node: StartNode) -> None:
    primary = start_node("primary")
    primary.sqlite("count.db", "CREATE TABLE t (x);")
    primary.stop()
    primary.start()
    samples = metrics(primary)
    assert samples.get(("litefs_transactions_total", (("db", "count.db"),)), 0) == 0


# -- refusals -----------------------------------------------------------------


def position_body(name: str) -> bytes:
    return json.dumps(
        {
            "version": 1,
            "node": "test",
            "positions": {name: {"txid": "0000000000000001", "checksum": "8000000000000000"}},
        }
    ).encode()


JSON = "application/json"
REFUSALS = [
    pytest.param("GET", "/info?x=1", None, None, 400, "/info takes no parameters", id="info-query"),
    pytest.param("GET", "/no/such/path", None, None, 404, "Not Found", id="unknown-path"),
    pytest.param("GET", "/stream", None, None, 405, "Method Not Allowed", id="get-stream"),
    pytest.param("POST", "/stream", b"{}", "text/plain", 415, "application/json", id="text-body"),
    pytest.param("POST", "/stream", b"{}", None, 415, "application/json", id="no-content-type"),
    pytest.param("POST", "/stream", b"{positions", JSON, 400, "not JSON", id="malformed-json"),
    pytest.param("POST", "/stream", b"[1]", JSON, 400, "JSON object", id="json-array"),
    pytest.param(
        "POST", "/stream", b'{"version": 9}', JSON, 400, "unsupported protocol version 9", id="v9"
    ),
    pytest.param(
        "POST",
        "/stream",
        position_body("../etc/passwd"),
        JSON,
        400,
        "invalid database name: '../etc/passwd'",
        id="name-escapes-up",
    ),
    pytest.param(
        "POST",
        "/stream",
        position_body("/etc/passwd"),
        JSON,
        400,
        "invalid database name: '/etc/passwd'",
        id="name-absolute",
    ),
    pytest.param(
        "POST", "/stream", b" " * (1 << 20) + b"{}", JSON, 413, "Too Large", id="body-over-1mib"
    ),
    pytest.param(
        "POST",
        "/stream",
        b'{"positions": {"\\ud800": {"txid": "0000000000000001", "checksum": "8000000000000000"}}}',
        JSON,
        400,
        "database name is not valid Unicode",
        id="name-lone-surrogate",
    ),
    pytest.param(
        "POST",
        "/stream",
        b'{"node": "\\udfff"}',
        JSON,
        400,
        "not valid Unicode",
        id="node-surrogate",
    ),
    pytest.param(
        "POST", "/stream", b'{"node": "a\\nb"}', JSON, 400, "control characters", id="node-newline"
    ),
    pytest.param(
        "POST",
        "/stream",
        json.dumps({"node": "n" * 100_000}).encode(),
        JSON,
        400,
        "at most 255 characters",
        id="node-100kb",
    ),
    pytest.param(
        "POST", "/stream", b'{"node": 7}', JSON, 400, "node must be a string", id="node-7"
    ),
    pytest.param(
        "POST", "/handoff?to=a%0Ab", None, None, 400, "control characters", id="handoff-to-newline"
    ),
]


@pytest.mark.parametrize(("method", "path", "body", "content_type", "status", "message"), REFUSALS)
def test_bad_request_gets_a_4xx_with_a_json_error(
    cluster: Cluster,
    method: str,
    path: str,
    body: bytes | None,
    content_type: str | None,
    status: int,
    message: str,
) -> None:
    answer = call(cluster.primary, path, method=method, body=body, content_type=content_type)
    assert answer.status == status
    assert answer.headers["Content-Type"].startswith("application/json")
    assert message in answer.json()["error"]


def test_stream_request_to_a_replica_gets_503_naming_the_primary(cluster: Cluster) -> None:
    answer = call(
        cluster.replica, "/stream", method="POST", body=b'{"version": 1}', content_type=JSON
    )
    assert answer.status == 503
    assert answer.json() == {
        "error": "this node is not the primary",
        "primary": cluster.primary.url,
    }


# -- a replica written from docs/protocol.md ------------------------------------


class RawStream:
    """The replica side of /stream from the specification alone: HTTP/1.1 by
    hand over a socket (chunked transfer coding undone here), then frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self._body = bytearray()
        self._ended = False

    @classmethod
    async def open(cls, port: int, positions: dict[str, dict[str, str]]) -> RawStream:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stream = cls(reader, writer)
        body = json.dumps({"version": 1, "node": "raw", "positions": positions}).encode()
        head = (
            "POST /stream HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        status_line = (await reader.readline()).decode()
        stream.status = int(status_line.split()[1])
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            stream.headers[name.strip().lower()] = value.strip()
        return stream

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()

    async def _next_http_chunk(self) -> None:
        size_line = await self.reader.readline()
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            self._ended = True
            return
        self._body += await self.reader.readexactly(size)
        assert await self.reader.readexactly(2) == b"\r\n"

    async def exactly(self, n: int) -> bytes:
        while len(self._body) < n:
            if self._ended:
                raise EOFError("the stream ended inside a frame")
            await self._next_http_chunk()
        data = bytes(self._body[:n])
        del self._body[:n]
        return data

    async def frame(self) -> tuple[str, bytes]:
        """(type letter, payload): a 1-byte type, a 4-byte big-endian length."""
        header = await self.exactly(5)
        kind = header[:1].decode()
        assert kind in "LRHDE", f"unknown frame type {kind!r}"
        length = int.from_bytes(header[1:5], "big")
        assert length <= 4096
        return kind, await self.exactly(length)

    async def file(self) -> bytes:
        """The chunks after an LTX frame: 4-byte lengths, ended by a zero one."""
        parts = []
        while length := int.from_bytes(await self.exactly(4), "big"):
            assert length <= 1 << 20
            parts.append(await self.exactly(length))
        return b"".join(parts)

    async def until_ready(self) -> list[tuple[str, str, bytes]]:
        """Every frame up to READY as (type, name or text, file bytes)."""
        received: list[tuple[str, str, bytes]] = []
        while True:
            kind, payload = await self.frame()
            if kind == "R":
                return received
            assert kind in "LD", f"unexpected {kind} frame before READY"
            received.append((kind, payload.decode(), await self.file() if kind == "L" else b""))


@dataclass(frozen=True)
class LTXFields:
    """The fields docs/protocol.md says the protocol reads from a file."""

    min_txid: int
    max_txid: int
    pre_apply: int
    post_apply: int

    @classmethod
    def of(cls, data: bytes) -> LTXFields:
        ltx.verify(io.BytesIO(data))

        def u64(offset: int) -> int:
            return int.from_bytes(data[offset : offset + 8], "big")

        return cls(u64(16), u64(24), u64(40), u64(len(data) - 16))


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def all_positions(node: NodeProcess) -> dict[str, dict[str, str]]:
    return {
        name: {"txid": db["txid"], "checksum": db["checksum"]}
        for name, db in info(node)["databases"].items()
    }


def files_for(received: list[tuple[str, str, bytes]], name: str) -> list[LTXFields]:
    return [LTXFields.of(data) for kind, db, data in received if kind == "L" and db == name]


def assert_chain(files: list[LTXFields]) -> None:
    """Each file applies exactly where the one before it left the database."""
    for before, after in itertools.pairwise(files):
        assert after.min_txid == before.max_txid + 1
        assert after.pre_apply == before.post_apply


def test_raw_client_with_nothing_gets_the_history_then_ready_then_a_heartbeat(
    cluster: Cluster,
) -> None:
    primary = cluster.primary
    position = info(primary)["databases"][DB]

    async def talk() -> list[tuple[str, str, bytes]]:
        stream = await RawStream.open(primary.port, {})
        try:
            assert stream.status == 200
            assert stream.headers["content-type"] == "application/x-litefs-stream"
            assert stream.headers["transfer-encoding"] == "chunked"
            received = await stream.until_ready()
            kind, payload = await asyncio.wait_for(stream.frame(), 2.0)
            assert kind == "H"
            sent_at = int.from_bytes(payload, "big") / 1000  # the primary's clock
            assert len(payload) == 8 and abs(sent_at - time.time()) < 5
            return received
        finally:
            await stream.close()

    files = files_for(run(talk()), DB)
    assert (files[0].min_txid, files[0].pre_apply) == (1, 0), "it must start from a full file"
    assert_chain(files)
    assert files[-1].max_txid == int(position["txid"], 16)
    assert files[-1].post_apply == int(position["checksum"], 16)


def test_raw_client_behind_gets_only_the_files_it_lacks(cluster: Cluster) -> None:
    primary = cluster.primary
    first = primary.ltx_files(DB)[0].read_bytes()
    assert LTXFields.of(first).max_txid == 1
    behind = {"txid": f"{1:016x}", "checksum": f"{LTXFields.of(first).post_apply:016x}"}
    level = all_positions(primary)
    now = level[DB]

    async def talk() -> list[tuple[str, str, bytes]]:
        stream = await RawStream.open(primary.port, {**level, DB: behind})
        try:
            return await stream.until_ready()
        finally:
            await stream.close()

    files = files_for(run(talk()), DB)
    assert [(f.min_txid, f.max_txid) for f in files] == [
        (txid, txid) for txid in range(2, int(now["txid"], 16) + 1)
    ]
    assert files[0].pre_apply == int(behind["checksum"], 16)
    assert_chain(files)
    assert files[-1].post_apply == int(now["checksum"], 16)


def test_raw_client_level_with_the_primary_gets_ready_at_once(cluster: Cluster) -> None:
    async def talk() -> list[tuple[str, str, bytes]]:
        stream = await RawStream.open(cluster.primary.port, all_positions(cluster.primary))
        try:
            return await stream.until_ready()
        finally:
            await stream.close()

    assert run(talk()) == []


@pytest.mark.parametrize("how", ["diverged", "ahead"])
def test_raw_client_that_diverged_or_is_ahead_gets_a_snapshot(cluster: Cluster, how: str) -> None:
    primary = cluster.primary
    level = all_positions(primary)
    txid, checksum = int(level[DB]["txid"], 16), int(level[DB]["checksum"], 16)
    if how == "diverged":
        wrong = {"txid": f"{txid:016x}", "checksum": f"{checksum ^ 0xFF:016x}"}
    else:
        wrong = {"txid": f"{txid + 5:016x}", "checksum": f"{checksum:016x}"}

    async def talk() -> list[tuple[str, str, bytes]]:
        stream = await RawStream.open(primary.port, {**level, DB: wrong})
        try:
            return await stream.until_ready()
        finally:
            await stream.close()

    (snapshot,) = files_for(run(talk()), DB)
    assert snapshot == LTXFields(1, txid, 0, checksum)


def test_raw_client_naming_a_database_the_primary_lacks_is_told_to_drop_it(
    cluster: Cluster,
) -> None:
    gone = {"txid": f"{3:016x}", "checksum": f"{1 << 63:016x}"}

    async def talk() -> list[tuple[str, str, bytes]]:
        positions = {**all_positions(cluster.primary), "gone/old.db": gone}
        stream = await RawStream.open(cluster.primary.port, positions)
        try:
            return await stream.until_ready()
        finally:
            await stream.close()

    assert run(talk()) == [("D", "gone/old.db", b"")]


def test_raw_client_after_ready_receives_each_new_commit(cluster: Cluster) -> None:
    primary = cluster.primary
    level = all_positions(primary)
    txid, checksum = int(level[DB]["txid"], 16), int(level[DB]["checksum"], 16)

    async def talk() -> LTXFields:
        stream = await RawStream.open(primary.port, level)
        try:
            assert await stream.until_ready() == []
            await asyncio.to_thread(primary.sqlite, DB, "INSERT INTO t VALUES ('raw');")
            kind, payload = await stream.frame()
            while kind == "H":
                kind, payload = await stream.frame()
            assert (kind, payload) == ("L", DB.encode())
            return LTXFields.of(await stream.file())
        finally:
            await stream.close()

    new = run(talk())
    assert (new.min_txid, new.max_txid, new.pre_apply) == (txid + 1, txid + 1, checksum)
    assert f"{new.post_apply:016x}" == position_file(primary, DB)["checksum"]
