"""No network client can stop a node: under each abuse the primary keeps
taking writes through its mount and its replica keeps receiving them.

The primary starts with only 256 descriptors (soft and hard), short read,
idle and write timeouts, and few streams, so each limit is reached quickly.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import StartNode
from node_process import NodeProcess
from test_replication import wait_caught_up

from litefs.config import AUTH_TOKEN_ENV
from litefs.logs import FLOOD_BURST

pytestmark = pytest.mark.fuse

DB = "abuse.db"
READ_TIMEOUT = 1.0
IDLE_TIMEOUT = 2.0
WRITE_TIMEOUT = 2.0
MAX_STREAMS = 4
DESCRIPTORS = 256
SETTINGS = {
    "http": {
        "read-timeout": f"{READ_TIMEOUT:g}s",
        "idle-timeout": f"{IDLE_TIMEOUT:g}s",
        "write-timeout": f"{WRITE_TIMEOUT:g}s",
        "max-streams": MAX_STREAMS,
    }
}
CLOSE_WAIT = 10.0
"""Generous bound for a connection the node should close."""


@pytest.fixture
def pair(start_node: StartNode) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    primary = start_node("primary", settings=SETTINGS, nofile=DESCRIPTORS)
    replica = start_node("replica", candidate=False, primary=primary)
    primary.sqlite(DB, "CREATE TABLE t (x); INSERT INTO t VALUES (0);")
    wait_caught_up(primary, replica, DB)
    yield primary, replica


def keeps_writing_and_replicating(primary: NodeProcess, replica: NodeProcess, value: int) -> None:
    primary.sqlite(DB, f"INSERT INTO t VALUES ({value});")
    wait_caught_up(primary, replica, DB)
    assert replica.sqlite(DB, f"SELECT count(*) FROM t WHERE x = {value};").stdout.strip() == "1"


def connect(node: NodeProcess, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(CLOSE_WAIT)
    sock.connect(("127.0.0.1", node.port))
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the node sends until it closes the connection."""
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def json_answer(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert headers["content-type"].startswith("application/json"), raw
    return int(lines[0].split()[1]), json.loads(body)


def wait_for(condition: Callable[[], bool], timeout: float = CLOSE_WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.05)


def stream_request(node: NodeProcess, name: str) -> bytes:
    body = json.dumps({"version": 1, "node": name, "positions": {}}).encode()
    return (
        f"POST /stream HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def add_big_table(primary: NodeProcess) -> None:
    """About 16 MB: a stream's snapshot of it is far more than the kernel
    buffers for a connection that never reads."""
    primary.sqlite(
        DB,
        "CREATE TABLE big (b); INSERT INTO big SELECT randomblob(4000) FROM "
        "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 4000) "
        "SELECT i FROM n);",
    )


def rss_kib(node: NodeProcess) -> int:
    for line in Path(f"/proc/{node.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- descriptors and connections -------------------------------------------------


def test_three_hundred_silent_connections_neither_stop_writes_nor_outlive_the_read_timeout(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    primary, replica = pair
    sockets = [connect(primary) for _ in range(100)]
    for sock in (connect(primary) for _ in range(100)):
        sock.sendall(b"GET /inf")  # half a request line
        sockets.append(sock)
    for sock in (connect(primary) for _ in range(100)):
        sock.sendall(b"GET /info HTTP/1.1\r\nHost: x\r\n")  # a head without its end
        sockets.append(sock)
    try:
        keeps_writing_and_replicating(primary, replica, 1)
        answers = [read_until_closed(sock) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    refused = [json_answer(answer) for answer in answers if answer]
    assert refused, "the connection cap was never reached"
    assert all(status == 503 for status, _ in refused)
    assert all("too many connections" in str(body["error"]) for _, body in refused)
    assert len(refused) < len(sockets), "every connection was refused: the cap is too low"
    keeps_writing_and_replicating(primary, replica, 2)
    assert "unable to open" not in primary.log()


@pytest.mark.parametrize("after_a_request", [False, True], ids=["first", "second"])
def test_a_request_head_sent_a_byte_at_a_time_is_cut_off_at_the_read_timeout(
    pair: tuple[NodeProcess, NodeProcess], after_a_request: bool
) -> None:
    primary, replica = pair
    sock = connect(primary)
    if after_a_request:
        sock.sendall(f"GET /info HTTP/1.1\r\nHost: 127.0.0.1:{primary.port}\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(READ_TIMEOUT * 1.5)  # idle, not yet sending: the idle timeout applies
    started = time.monotonic()
    closed = False
    try:
        for byte in b"GET /info HTTP/1.1\r\nX-Slow: " + b"a" * 1000:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.05)
            if time.monotonic() - started > CLOSE_WAIT:
                break
        assert closed or read_until_closed(sock) == b""
    finally:
        sock.close()
    assert time.monotonic() - started < CLOSE_WAIT
    keeps_writing_and_replicating(primary, replica, 3)


def test_a_keep_alive_connection_left_idle_is_closed_after_the_idle_timeout(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    primary, replica = pair
    sock = connect(primary)
    try:
        sock.sendall(f"GET /info HTTP/1.1\r\nHost: 127.0.0.1:{primary.port}\r\n\r\n".encode())
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        started = time.monotonic()
        rest = read_until_closed(sock)
        waited = time.monotonic() - started
    finally:
        sock.close()
    assert b"HTTP/1.1" not in rest
    assert waited >= IDLE_TIMEOUT - 0.5
    keeps_writing_and_replicating(primary, replica, 4)


# -- streams ----------------------------------------------------------------------


def test_streams_that_never_read_are_capped_bounded_in_memory_and_dropped(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    """The replica's own stream holds one of the slots; each stream's file
    is far larger than what the kernel buffers, so the sender stalls."""
    primary, replica = pair
    add_big_table(primary)
    wait_caught_up(primary, replica, DB)
    before = rss_kib(primary)
    streams = [connect(primary, receive_buffer=4096) for _ in range(12)]
    try:
        for number, sock in enumerate(streams):
            sock.sendall(stream_request(primary, f"sloth-{number}"))
        time.sleep(1.0)
        heads = [sock.recv(64) for sock in streams]
        accepted = [sock for sock, head in zip(streams, heads, strict=True) if b" 200 " in head]
        refused = [sock for sock, head in zip(streams, heads, strict=True) if b" 503 " in head]
        assert len(accepted) == MAX_STREAMS - 1
        assert len(refused) == len(streams) - len(accepted)
        grown = rss_kib(primary) - before
        keeps_writing_and_replicating(primary, replica, 5)
        wait_for(lambda: primary.log().count("dropping replica sloth-") == len(accepted))
    finally:
        for sock in streams:
            sock.close()
    print(f"primary RSS grew by {grown} KiB with {len(accepted)} stalled streams")
    assert grown < 4 * 1024 * len(accepted), f"primary grew by {grown} KiB"
    keeps_writing_and_replicating(primary, replica, 6)


# -- malformed requests and floods -------------------------------------------------


def test_requests_aiohttp_itself_refuses_get_json_errors(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    primary, replica = pair
    for request in (
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /info HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
        b"GET /info HTTP/1.1\r\nbad header line\r\n\r\n",
    ):
        sock = connect(primary)
        try:
            sock.sendall(request)
            status, body = json_answer(read_until_closed(sock))
        finally:
            sock.close()
        assert 400 <= status < 500
        assert body["error"]
    keeps_writing_and_replicating(primary, replica, 7)


def test_a_flood_of_bad_requests_logs_a_few_lines_not_one_each(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    primary, replica = pair
    for _ in range(300):
        with contextlib.closing(connect(primary)) as sock:
            sock.sendall(b"\x16\x03\x01 not http\r\n\r\n")
            read_until_closed(sock)
    keeps_writing_and_replicating(primary, replica, 8)
    assert 1 <= primary.log().count("refused a malformed request") <= FLOOD_BURST + 1
    assert "Traceback" not in primary.log()


# -- the shared secret -------------------------------------------------------------

TOKEN = "s3cret-token-for-tests"


def test_with_a_token_only_requests_carrying_it_may_stream_or_hand_off(
    start_node: StartNode,
) -> None:
    settings = {"http": {"auth-token": TOKEN}}
    primary = start_node("primary", settings=settings)
    replica = start_node("replica", candidate=False, primary=primary, settings=settings)
    stranger = start_node("stranger", candidate=False, primary=primary)
    primary.sqlite(DB, "CREATE TABLE t (x); INSERT INTO t VALUES (0);")
    keeps_writing_and_replicating(primary, replica, 1)
    wait_for(lambda: "answered 401" in stranger.log())
    assert not (stranger.mount_dir / DB).exists()

    for request in (
        stream_request(primary, "intruder"),
        b"POST /handoff?to=replica HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        stream_request(primary, "intruder").replace(
            b"Content-Type", b"Authorization: Bearer wrong\r\nContent-Type"
        ),
    ):
        with contextlib.closing(connect(primary)) as sock:
            sock.sendall(request)
            status, body = json_answer(sock.recv(65536))
        assert status == 401
        assert "token" in str(body["error"])
    keeps_writing_and_replicating(primary, replica, 2)

    command = [sys.executable, "-m", "litefs", "handoff", "-url", primary.url, "-to", "replica"]
    environment = {k: v for k, v in os.environ.items() if k != AUTH_TOKEN_ENV}
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environment)
    assert "handoff refused (401)" in refused.stderr
    environment[AUTH_TOKEN_ENV] = TOKEN
    let_in = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environment)
    assert "handoff refused (409): this lease cannot be handed off" in let_in.stderr


def test_a_stop_does_not_hold_the_lease_for_a_stream_that_takes_no_bytes(
    start_node: StartNode,
) -> None:
    """A replica cut off mid-stream (its stream stalled, so it hears no END)
    must not keep the lease held while the replicas that got everything
    wait: one of them could lose the race for it to the lagging one. The
    write timeout (30 s by default) is longer than a stop waits (10 s)."""
    primary = start_node("primary")
    replica = start_node("replica", candidate=False, primary=primary)
    add_big_table(primary)
    wait_caught_up(primary, replica, DB)
    sloth = connect(primary, receive_buffer=4096)
    try:
        sloth.sendall(stream_request(primary, "sloth"))
        assert b" 200 " in sloth.recv(64)
        time.sleep(0.5)  # its snapshot fills the buffers; the sender waits
        started = time.monotonic()
        assert primary.stop() == 0
        took = time.monotonic() - started
    finally:
        sloth.close()
    assert took < 8.0, f"the stop took {took:.1f}s"  # 15 s when it waited for the stream
    assert "primary ended the stream" in replica.log()
