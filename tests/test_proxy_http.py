"""The proxy's HTTP behaviour, in one process: two proxies over real stores
(one primary, one replica), each in front of a real aiohttp application, all
on 127.0.0.1. No mount is needed: the proxy only asks the store for the role,
the primary and a database's position.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from node_process import free_port

from litefs.config import HTTPConfig, ProxyConfig
from litefs.lease import PrimaryInfo
from litefs.proxy import Proxy
from litefs.store import Role, Store


def application(name: str) -> web.Application:
    """Answers every request with what it received, as JSON."""

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "node": name,
                "method": request.method,
                "path": request.path_qs,
                "headers": dict(request.headers),
                "size": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            },
            headers={"X-Served-By": name, "Set-Cookie": "app=1; Path=/"},
        )

    async def broken(request: web.Request) -> web.StreamResponse:
        length = int(request.query.get("length", "1000"))
        response = web.StreamResponse(headers={"Content-Length": str(length)})
        await response.prepare(request)
        await response.write(b"x" * 100)
        assert request.transport is not None
        request.transport.close()
        return response

    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/broken", broken)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def proxy_config(port: int, target: str, **changes: Any) -> ProxyConfig:
    config = ProxyConfig(
        listen=HTTPConfig(f"127.0.0.1:{port}", "127.0.0.1", port),
        target=target,
        db="app.db",
        advertise_url=f"http://127.0.0.1:{port}",
        passthrough=("/static/*",),
        always_forward=("/write-by-get",),
        max_lag=0.3,
        primary_redirect_timeout=0.3,
        read_header_timeout=5.0,
        idle_timeout=5.0,
    )
    return replace(config, **changes)


@dataclass
class Pair:
    primary: Proxy
    replica: Proxy
    primary_store: Store
    replica_store: Store
    session: aiohttp.ClientSession

    @property
    def replica_url(self) -> str:
        return self.url_of(self.replica)

    @property
    def primary_url(self) -> str:
        return self.url_of(self.primary)

    @staticmethod
    def url_of(proxy: Proxy) -> str:
        return proxy.config.advertise_url


@asynccontextmanager
async def pair(tmp_path: Path, token: str | None = None, **changes: Any) -> AsyncIterator[Pair]:
    """A primary and a replica proxy; the replica finds the primary's proxy
    through the primary's /info, as in a cluster."""
    stores = []
    for name in ("primary", "replica"):
        store = Store(tmp_path / name)
        store.open()
        stores.append(store)
    primary_store, replica_store = stores
    primary_store.set_role(Role.PRIMARY, None)
    ports = [free_port() for _ in range(5)]
    runners = [
        await serve(application("primary"), ports[0]),
        await serve(application("replica"), ports[1]),
    ]
    target = changes.pop("target", None)
    primary = Proxy(
        proxy_config(ports[2], target or f"http://127.0.0.1:{ports[0]}", **changes),
        primary_store,
        "primary",
        lambda: 0.0,
        auth_token=token,
    )
    replica = Proxy(
        proxy_config(ports[3], target or f"http://127.0.0.1:{ports[1]}", **changes),
        replica_store,
        "replica",
        lambda: 0.0,
        auth_token=token,
    )

    async def info(request: web.Request) -> web.Response:
        return web.json_response({"proxy": primary.config.advertise_url})

    api = web.Application()
    api.router.add_get("/info", info)
    runners.append(await serve(api, ports[4]))
    replica_store.set_role(Role.REPLICA, PrimaryInfo("primary", f"http://127.0.0.1:{ports[4]}"))
    await primary.start()
    await replica.start()
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            yield Pair(primary, replica, primary_store, replica_store, session)
    finally:
        await replica.stop()
        await primary.stop()
        for runner in runners:
            await runner.cleanup()
        for store in stores:
            store.close()


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


async def fetch(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any, Any]:
    async with session.request(method, url, **kwargs) as response:
        text = await response.text()
        try:
            body = json.loads(text)
        except ValueError:
            body = text
        return response.status, response.headers, body


def test_a_forwarded_write_reaches_the_primarys_application_with_forwarding_headers(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with pair(tmp_path) as p:
            status, headers, body = await fetch(
                p.session,
                "POST",
                p.replica_url + "/items?x=1",
                data=b"hello",
                headers={
                    "Host": "app.example",
                    "Connection": "keep-alive, X-Private",
                    "X-Private": "hop only",
                    "X-Forwarded-For": "10.1.1.1",
                },
            )
            assert status == 200
            assert body["node"] == "primary"
            assert body["path"] == "/items?x=1"
            assert body["size"] == 5
            seen = body["headers"]
            assert seen["Host"] == "app.example"
            assert "X-Private" not in seen
            assert "X-LiteFS-Forwarded-By" not in seen
            assert seen["X-Forwarded-For"] == "10.1.1.1, 127.0.0.1, 127.0.0.1"
            assert seen["Forwarded"].count("for=127.0.0.1") == 2
            assert headers.getall("Set-Cookie")[0].startswith("app=1")

    run(scenario)


def test_a_large_request_body_is_streamed_to_the_primary_intact(tmp_path: Path) -> None:
    async def scenario() -> None:
        block = bytes(range(256)) * 4096  # 1 MiB

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield block

        async with pair(tmp_path) as p:
            status, _, body = await fetch(p.session, "PUT", p.replica_url + "/up", data=chunks())
            assert status == 200
            assert body["node"] == "primary"
            assert body["size"] == 8 * len(block)
            assert body["sha256"] == hashlib.sha256(block * 8).hexdigest()

    run(scenario)


def test_reads_and_passthrough_paths_stay_local_and_always_forward_paths_go_to_the_primary(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with pair(tmp_path) as p:
            for method, path, where in (
                ("GET", "/items", "replica"),
                ("HEAD", "/items", "replica"),
                ("OPTIONS", "/items", "replica"),
                ("POST", "/static/upload", "replica"),
                ("GET", "/write-by-get", "primary"),
                ("DELETE", "/items/1", "primary"),
            ):
                async with p.session.request(method, p.replica_url + path) as response:
                    assert response.headers["X-Served-By"] == where, (method, path)

    run(scenario)


def test_writes_wait_for_a_primary_then_get_503_with_retry_after(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with pair(tmp_path) as p:
            p.replica_store.set_role(Role.REPLICA, None)
            started = asyncio.get_running_loop().time()
            status, headers, body = await fetch(p.session, "POST", p.replica_url + "/items")
            waited = asyncio.get_running_loop().time() - started
            assert status == 503
            assert headers["Retry-After"] == "1"
            assert "no primary" in body["error"]
            assert waited >= 0.3

    run(scenario)


def test_a_write_to_a_primary_without_a_proxy_gets_503_saying_so(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with pair(tmp_path) as p:
            p.replica_store.set_role(Role.REPLICA, PrimaryInfo("primary", p.replica.config.target))
            status, _, body = await fetch(p.session, "POST", p.replica_url + "/items")
            assert status == 503
            assert body["error"] == "the primary (primary) runs no proxy to take this write"

    run(scenario)


def test_a_write_is_forwarded_once_a_primary_appears_within_the_redirect_timeout(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with pair(tmp_path, primary_redirect_timeout=5.0) as p:
            known = p.replica_store.primary
            p.replica_store.set_role(Role.REPLICA, None)
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, p.replica_store.set_role, Role.REPLICA, known)
            status, _, body = await fetch(p.session, "POST", p.replica_url + "/items", data=b"hi")
            assert status == 200
            assert body["node"] == "primary"
            assert body["size"] == 2, "the body read while waiting still goes out"

    run(scenario)


def test_a_write_refused_by_a_former_primary_goes_to_the_primary_once_there_is_one(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with pair(tmp_path, primary_redirect_timeout=5.0) as p:
            p.primary_store.set_role(Role.REPLICA, None)
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, p.primary_store.set_role, Role.PRIMARY, None)
            status, _, body = await fetch(p.session, "POST", p.replica_url + "/items", data=b"hi")
            assert status == 200
            assert (body["node"], body["size"]) == ("primary", 2)

    run(scenario)


GOLDEN = Path(__file__).resolve().parent / "data" / "ltx" / "ps1024"


def test_a_read_with_the_cookie_is_served_once_the_replica_has_applied_that_txid(
    tmp_path: Path,
) -> None:
    def apply(store: Store, txid: int) -> None:
        copy = tmp_path / f"{txid}.ltx"
        copy.write_bytes((GOLDEN / f"{txid:016x}-{txid:016x}.ltx").read_bytes())
        store.apply_ltx("app.db", copy)

    async def scenario() -> None:
        async with pair(tmp_path, max_lag=10.0) as p:
            loop = asyncio.get_running_loop()
            loop.call_later(0.2, loop.run_in_executor, None, apply, p.replica_store, 1)
            loop.call_later(0.5, loop.run_in_executor, None, apply, p.replica_store, 2)
            started = loop.time()
            cookie = {"Cookie": "__txid=0000000000000002"}
            status, _, body = await fetch(p.session, "GET", p.replica_url + "/x", headers=cookie)
            assert status == 200 and body["node"] == "replica"
            assert loop.time() - started >= 0.5
            assert p.replica.watch.txid() == 2

    run(scenario)


def test_a_read_waits_for_the_cookies_txid_and_gives_504_when_it_does_not_come(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with pair(tmp_path) as p:
            cookie = {"Cookie": "__txid=00000000000000ff"}
            status, _, body = await fetch(p.session, "GET", p.replica_url + "/x", headers=cookie)
            assert status == 504
            assert "00000000000000ff" in body["error"]
            status, _, body = await fetch(p.session, "GET", p.primary_url + "/x", headers=cookie)
            assert status == 200, "the primary has every write: it never waits"
            malformed = {"Cookie": "__txid=zz"}
            status, _, body = await fetch(p.session, "GET", p.replica_url + "/", headers=malformed)
            assert status == 200 and body["node"] == "replica"

    run(scenario)


def test_an_application_that_breaks_off_a_small_answer_gives_502(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with pair(tmp_path) as p:
            status, _, body = await fetch(p.session, "GET", p.replica_url + "/broken")
            assert status == 502
            assert "broke off" in body["error"]

    run(scenario)


def test_an_application_that_breaks_off_a_streamed_answer_gives_the_client_a_broken_answer(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with pair(tmp_path) as p:
            with pytest.raises(aiohttp.ClientPayloadError):
                url = p.replica_url + f"/broken?length={1 << 20}"
                async with p.session.get(url) as response:
                    await response.read()
            status, _, _ = await fetch(p.session, "GET", p.replica_url + "/after")
            assert status == 200, "the proxy keeps serving"

    run(scenario)


def test_an_application_that_is_not_running_gives_502(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with pair(tmp_path, target=f"http://127.0.0.1:{free_port()}") as p:
            status, _, body = await fetch(p.session, "GET", p.replica_url + "/items")
            assert status == 502
            assert "not reachable" in body["error"]

    run(scenario)


def test_a_request_forwarded_to_a_node_that_is_not_primary_gets_503(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with pair(tmp_path) as p:
            status, _, body = await fetch(
                p.session,
                "POST",
                p.replica_url + "/items",
                headers={"X-LiteFS-Forwarded-By": "elsewhere"},
            )
            assert status == 503
            assert "not the primary" in body["error"]

    run(scenario)


def test_with_a_token_the_hop_is_authenticated_and_the_application_gets_the_clients_header(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with pair(tmp_path, token="s3cret") as p:
            mine = {"Authorization": "Basic dXNlcjpwdw=="}
            status, _, body = await fetch(p.session, "POST", p.replica_url + "/items", headers=mine)
            assert status == 200
            assert body["headers"]["Authorization"] == mine["Authorization"]
            assert "X-LiteFS-Client-Authorization" not in body["headers"]
            forged = {"X-LiteFS-Forwarded-By": "intruder", "Authorization": "Bearer guess"}
            status, _, body = await fetch(
                p.session, "POST", p.primary_url + "/items", headers=forged
            )
            assert status == 401

    run(scenario)


def test_health_follows_the_role_and_the_replication_lag(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with pair(tmp_path) as p:
            status, _, body = await fetch(p.session, "GET", p.primary_url + "/litefs/health")
            assert (status, body["role"]) == (200, "primary")
            status, _, body = await fetch(p.session, "GET", p.replica_url + "/litefs/health")
            assert (status, body["role"]) == (200, "replica")
            p.replica.lag = lambda: math.inf
            status, _, body = await fetch(p.session, "GET", p.replica_url + "/litefs/health")
            assert status == 503
            assert body["lag"] is None

    run(scenario)
