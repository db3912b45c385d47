"""The proxy's cost: forwarded writes and proxied reads against the application.

A primary and a replica run as real daemons with a static lease, each with a
proxy in front of examples/proxy/app.py. One keep-alive connection per path
sends requests one at a time, the paths taking turns request by request so
that both see the same machine load:

- writes: POST /items to the primary's application directly, against the
  same POST to the replica's proxy, which forwards it to the primary's proxy,
  which hands it to the primary's application;
- reads: GET /items from the replica's application directly, against the
  same GET through the replica's proxy.

The figures are the differences of the medians (the proxy's added latency at
p50), and the request rates.
"""

from __future__ import annotations

import http.client
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench.primary import running
from localcluster import LocalNode, free_port

Row = tuple[Any, ...]

APP = Path(__file__).resolve().parent.parent / "examples" / "proxy" / "app.py"
DB = "bench.db"
WRITES = 400
READS = 1000
WARMUP = 50


class Endpoint:
    """One keep-alive HTTP connection to one port."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call(self, method: str, path: str, body: bytes | None = None, cookie: str = "") -> float:
        """Seconds the request took; fails on any status but 200 and 201."""
        headers = {"Cookie": cookie} if cookie else {}
        started = time.perf_counter()
        self.connection.request(method, path, body=body, headers=headers)
        response = self.connection.getresponse()
        response.read()
        elapsed = time.perf_counter() - started
        if response.status not in (200, 201):
            raise RuntimeError(f"{method} {path} answered {response.status}")
        return elapsed


def _node(root: Path, name: str, primary: LocalNode | None) -> tuple[LocalNode, int, int]:
    proxy_port, app_port = free_port(), free_port()
    settings = {
        "proxy": {
            "addr": f"127.0.0.1:{proxy_port}",
            "target": f"127.0.0.1:{app_port}",
            "db": DB,
        }
    }
    node = LocalNode(root, name, candidate=primary is None, primary=primary, settings=settings)
    return node, proxy_port, app_port


@contextmanager
def _app(node: LocalNode, port: int) -> Iterator[None]:
    command = [sys.executable, str(APP), "--db", str(node.mount_dir / DB)]
    app = subprocess.Popen(
        [*command, "--port", str(port), "--name", node.name], stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            if time.monotonic() > deadline:
                raise RuntimeError("the application did not start")
            time.sleep(0.02)
        yield
    finally:
        app.kill()
        app.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _alternate(
    a: Endpoint, b: Endpoint, method: str, count: int, **kwargs: Any
) -> tuple[list[float], list[float]]:
    first: list[float] = []
    second: list[float] = []
    for index in range(WARMUP + count):
        x = a.call(method, "/items", **kwargs)
        y = b.call(method, "/items", **kwargs)
        if index >= WARMUP:
            first.append(x)
            second.append(y)
    return first, second


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="litefs-bench-proxy-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        primary, primary_proxy, primary_app = _node(root, "primary", None)
        replica, replica_proxy, replica_app = _node(root, "replica", primary)
        stack.enter_context(running(primary))
        stack.enter_context(running(replica))
        stack.enter_context(_app(primary, primary_app))
        stack.enter_context(_app(replica, replica_app))
        direct_write, forwarded = Endpoint(primary_app), Endpoint(replica_proxy)
        direct, forwarded_times = _alternate(direct_write, forwarded, "POST", WRITES, body=b"x")
        local_write = Endpoint(primary_proxy)
        local_times, _ = _alternate(local_write, direct_write, "POST", WRITES // 2, body=b"x")
        direct_read, proxied_read = Endpoint(replica_app), Endpoint(replica_proxy)
        reads, proxied = _alternate(direct_read, proxied_read, "GET", READS)
    direct_p50, forwarded_p50 = _p50_ms(direct), _p50_ms(forwarded_times)
    read_p50, proxied_p50 = _p50_ms(reads), _p50_ms(proxied)
    return [
        ("POST to the primary's app, p50", direct_p50, "ms"),
        ("POST through the primary's proxy, p50", _p50_ms(local_times), "ms"),
        ("POST forwarded by a replica, p50", forwarded_p50, "ms"),
        ("forwarding adds, p50", forwarded_p50 - direct_p50, "ms", 1.0, "max"),
        ("forwarded POSTs, one client", WRITES / sum(forwarded_times), "/s"),
        ("direct POSTs, one client", WRITES / sum(direct), "/s"),
        ("GET from the replica's app, p50", read_p50, "ms"),
        ("GET through the replica's proxy, p50", proxied_p50, "ms"),
        ("proxying a read adds, p50", proxied_p50 - read_p50, "ms", 0.2, "max"),
    ]


if __name__ == "__main__":
    for row in run():
        print(f"{row[0]:<40} {row[1]:8.3f} {row[2]}")
