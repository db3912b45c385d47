"""The HTTP proxy in front of the application: writes go to the primary,
readers see their own writes.

Reads (GET, HEAD, OPTIONS) are served by the application on this node. A
write (any other method, or a path listed in `always-forward`) is served by
the application on the primary: on a replica the proxy forwards it to the
primary's proxy, which hands it to its own application. Every write response
carries a cookie with the TXID of the database after the write; a read that
presents it waits until this node has applied that TXID, so a client always
reads its own writes, whichever node it reaches.

Bodies are streamed both ways, never held whole. A forwarded request is sent
once: if the primary cannot be connected to, nothing has left this node and
the proxy tries again until a primary answers or `primary-redirect-timeout`
passes (503); once any of it was sent, a failure is a 502, since the write
may or may not have happened and a POST need not be idempotent.

Everything runs on the node's asyncio thread; waiting for a position uses the
store's change notices, never a blocking call.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hmac
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import StreamReader, web
from multidict import CIMultiDict

from litefs.config import ProxyConfig
from litefs.store import Change, Store

log = logging.getLogger("litefs.proxy")

TXID_COOKIE = "__txid"
"""Holds, in 16 hex digits, the database's TXID after the client's last write."""
COOKIE_MAX_AGE = 300
HEALTH_PATH = "/litefs/health"
FORWARDED_BY = "X-LiteFS-Forwarded-By"
"""Marks a request a replica's proxy forwarded; names the replica."""
CLIENT_AUTHORIZATION = "X-LiteFS-Client-Authorization"
"""The client's own Authorization header while the hop carries the node's token."""
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
HOP_BY_HOP = frozenset(
    {
        "connection",
        "expect",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
CONNECT_TIMEOUT = 2.0
INFO_TIMEOUT = 2.0
RETRY_INTERVAL = 0.05
RETRY_AFTER = 1
SMALL_BODY = 64 << 10
SHUTDOWN_TIMEOUT = 2.0
"""Seconds requests under way get to finish when the node stops."""
NOT_PRIMARY = "X-LiteFS-Not-Primary"
"""On a 503: the node a write was forwarded to is not the primary, and did
nothing with it, so a write whose body is still at hand may go elsewhere."""


Body = bytes | StreamReader | None
"""A request body: read whole when small, else the stream it arrives on."""


class PrimaryUnreachable(Exception):
    """Nothing of the request left this node: it may be sent elsewhere."""


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def parse_txid(text: str | None) -> int | None:
    """The TXID a cookie holds; None for a missing or malformed one, which is
    ignored rather than refused: a client cannot easily repair a cookie."""
    if not text or len(text) > 16:
        return None
    try:
        return int(text, 16)
    except ValueError:
        return None


class PositionWatch:
    """Wakes coroutines waiting for a database to reach a TXID."""

    def __init__(self, store: Store, db: str) -> None:
        self.store = store
        self.db = db
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()

    def txid(self) -> int:
        db = self.store.database(self.db)
        return db.position.txid if db is not None else 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.store.add_listener(self._notice)

    def stop(self) -> None:
        self.store.remove_listener(self._notice)

    def _notice(self, name: str, change: Change) -> None:
        """Store listener: runs in whichever thread changed the database."""
        if name == self.db and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def reached(self, txid: int, timeout: float) -> bool:
        """True once the database is at `txid` or later; False after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.txid() < txid:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            changed = self._changed
            if self.txid() >= txid:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return True


class Proxy:
    """One node's proxy: an aiohttp server and a client to the application
    and to the primary's proxy."""

    def __init__(
        self,
        config: ProxyConfig,
        store: Store,
        node_name: str,
        lag: Callable[[], float],
        *,
        auth_token: str | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.node_name = node_name
        self.lag = lag
        """Seconds since this node last had everything the primary has."""
        self.auth_token = auth_token
        self.watch = PositionWatch(store, config.db)
        self._primary_proxies: dict[str, str | None] = {}
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.router.add_route("*", HEALTH_PATH, self.health)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def start(self) -> None:
        """Listen; raises OSError when the address cannot be bound."""
        connector = aiohttp.TCPConnector(
            limit=0, keepalive_timeout=min(15.0, self.config.idle_timeout)
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.watch.start()
        self._runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            keepalive_timeout=self.config.idle_timeout,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        await self._runner.setup()
        listen = self.config.listen
        site = web.TCPSite(self._runner, listen.host or None, listen.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self.stop()
            raise
        log.info(
            "proxy listening on %s, in front of %s (tracking %s)",
            listen.addr,
            self.config.target,
            self.config.db,
        )

    async def stop(self) -> None:
        self.watch.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- routing ------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        """200 on the primary and on a replica within max-lag of it, else 503."""
        if self.store.is_primary:
            return web.json_response({"role": "primary"})
        lag = self.lag()
        body: dict[str, Any] = {"role": "replica", "lag": None if math.isinf(lag) else lag}
        if lag <= self.config.max_lag:
            return web.json_response(body)
        body["error"] = f"more than {self.config.max_lag:g}s behind the primary"
        return web.json_response(body, status=503)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await _body(request)
        except asyncio.IncompleteReadError:
            return json_error(400, "the request body is shorter than its Content-Length")
        path = request.path
        if _matches(path, self.config.passthrough):
            return await self._relay(request, self.config.target, body=body)
        write = request.method not in READ_METHODS or _matches(path, self.config.always_forward)
        if write or FORWARDED_BY in request.headers:
            return await self._write(request, body)
        return await self._read(request, body)

    async def _read(self, request: web.Request, body: Body) -> web.StreamResponse:
        """Serve locally once this node has the client's last write."""
        wanted = parse_txid(request.cookies.get(TXID_COOKIE))
        if (
            wanted is not None
            and not self.store.is_primary
            and not await self.watch.reached(wanted, self.config.max_lag)
        ):
            return json_error(
                504,
                f"this node has not applied TXID {wanted:016x} of {self.config.db} "
                f"within {self.config.max_lag:g}s (it is at {self.watch.txid():016x})",
            )
        return await self._relay(request, self.config.target, body=body)

    async def _write(self, request: web.Request, body: Body) -> web.StreamResponse:
        """Serve on the primary: here if this node is it, else through its proxy."""
        hop = request.headers.get(FORWARDED_BY)
        if hop is not None:
            refused = self._check_hop(request)
            if refused is not None:
                return refused
            if not self.store.is_primary:
                return json_error(
                    503,
                    f"{self.node_name} is not the primary (forwarded by {hop})",
                    {"Retry-After": str(RETRY_AFTER), NOT_PRIMARY: self.node_name},
                )
        deadline = time.monotonic() + self.config.primary_redirect_timeout
        while True:
            if self.store.is_primary:
                return await self._relay(request, self.config.target, body=body, set_position=True)
            url = await self._primary_proxy()
            if url is not None:
                try:
                    return await self._relay(request, url, body=body, forward=True)
                except PrimaryUnreachable as exc:
                    log.debug("primary proxy %s unreachable: %s", url, exc)
                    self._primary_proxies.clear()
            if time.monotonic() >= deadline:
                why = self._why_no_primary()
                self._primary_proxies.clear()  # the next write asks again
                return json_error(503, why, {"Retry-After": str(RETRY_AFTER)})
            await asyncio.sleep(RETRY_INTERVAL)

    def _why_no_primary(self) -> str:
        primary = self.store.primary
        if primary is not None and self._primary_proxies.get(primary.advertise_url, "") is None:
            return f"the primary ({primary.hostname}) runs no proxy to take this write"
        return "no primary is available to take this write; try again shortly"

    def _check_hop(self, request: web.Request) -> web.Response | None:
        if self.auth_token is None:
            return None
        presented = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(presented, f"Bearer {self.auth_token}".encode()):
            return json_error(401, "the forwarding node did not present the cluster's token")
        return None

    async def _primary_proxy(self) -> str | None:
        """The primary's proxy URL, asked of the primary's /info once per primary."""
        primary = self.store.primary
        if primary is None or not primary.advertise_url:
            return None
        api = primary.advertise_url
        if api in self._primary_proxies:
            return self._primary_proxies[api]
        assert self._session is not None
        try:
            async with self._session.get(
                f"{api}/info", timeout=aiohttp.ClientTimeout(total=INFO_TIMEOUT)
            ) as response:
                info = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("cannot ask the primary at %s for its proxy: %s", api, exc)
            return None
        url = info.get("proxy") if isinstance(info, dict) else None
        if not isinstance(url, str):
            log.warning("the primary at %s runs no proxy: writes cannot be forwarded", api)
            url = None
        self._primary_proxies[api] = url
        return url

    # -- relaying -------------------------------------------------------------

    async def _relay(
        self,
        request: web.Request,
        base: str,
        *,
        body: Body = None,
        forward: bool = False,
        set_position: bool = False,
    ) -> web.StreamResponse:
        """Send the request to `base` and stream the answer back."""
        assert self._session is not None
        headers = self._upstream_headers(request, forward)
        session = self._session

        async def send() -> aiohttp.ClientResponse:
            return await session.request(
                request.method,
                base + request.rel_url.raw_path_qs,
                headers=headers,
                data=body,
                allow_redirects=False,
            )

        try:
            async with asyncio.timeout(self.config.read_header_timeout):
                upstream = await send()
        except aiohttp.ClientConnectorError as exc:
            if forward:
                raise PrimaryUnreachable(str(exc)) from None
            return json_error(
                502, f"the application at {base} is not reachable: {exc.strerror or _describe(exc)}"
            )
        except TimeoutError:
            return json_error(
                504, f"{_who(forward)} sent no response within {self.config.read_header_timeout:g}s"
            )
        except aiohttp.ClientError as exc:
            log.warning("%s %s: %s failed: %s", request.method, request.path, _who(forward), exc)
            return json_error(502, f"{_who(forward)} failed before answering: {_describe(exc)}")
        if forward and _refused_as_not_primary(upstream) and not isinstance(body, StreamReader):
            upstream.release()
            raise PrimaryUnreachable(f"{upstream.headers[NOT_PRIMARY]} is not the primary")
        async with upstream:
            length = upstream.content_length
            if request.method != "HEAD" and length is not None and length <= SMALL_BODY:
                return await self._answer_whole(request, upstream, forward, set_position)
            return await self._answer_streamed(request, upstream, forward, set_position)

    async def _answer_whole(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        forward: bool,
        set_position: bool,
    ) -> web.StreamResponse:
        """A small answer is read first, to go out in one write; if it breaks
        off, the client still can be told so with a status."""
        try:
            content = await upstream.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._log_broken(request, forward, exc)
            return json_error(502, f"{_who(forward)} broke off its answer: {_describe(exc)}")
        headers = _end_to_end(upstream.headers)
        headers.popall("Content-Length", None)
        response = web.Response(
            status=upstream.status, reason=upstream.reason, headers=headers, body=content
        )
        if set_position:
            self._set_position_cookie(response)
        return response

    async def _answer_streamed(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        forward: bool,
        set_position: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=_end_to_end(upstream.headers)
        )
        if set_position:
            self._set_position_cookie(response)
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except ConnectionError:
            log.debug("%s %s: the client went away", request.method, request.path)
            return response
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._log_broken(request, forward, exc)
            # The status is sent: only an unfinished answer tells the client.
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response

    def _log_broken(self, request: web.Request, forward: bool, exc: BaseException) -> None:
        log.warning(
            "%s %s: %s broke off its answer: %s",
            request.method,
            request.path,
            _who(forward),
            _describe(exc),
        )

    def _set_position_cookie(self, response: web.StreamResponse) -> None:
        txid = self.watch.txid()
        if txid:
            response.set_cookie(
                TXID_COOKIE,
                f"{txid:016x}",
                max_age=COOKIE_MAX_AGE,
                path="/",
                httponly=True,
                samesite="Lax",
            )

    def _upstream_headers(self, request: web.Request, forward: bool) -> CIMultiDict[str]:
        headers = _end_to_end(request.headers)
        hop = headers.pop(FORWARDED_BY, None)
        stashed = headers.pop(CLIENT_AUTHORIZATION, None)
        if hop is not None:
            # This node is the primary at the end of the hop: give the
            # application the client's headers, not the forwarding node's.
            headers.pop("Authorization", None)
            if stashed is not None:
                headers["Authorization"] = stashed
        _add_forwarding(headers, request)
        if forward:
            headers[FORWARDED_BY] = self.node_name
            if self.auth_token is not None:
                own = headers.pop("Authorization", None)
                if own is not None:
                    headers[CLIENT_AUTHORIZATION] = own
                headers["Authorization"] = f"Bearer {self.auth_token}"
        return headers


async def _body(request: web.Request) -> Body:
    """A small body whose length is known is read first, to go out in one
    write with the headers; any other is streamed as it arrives."""
    if not request.body_exists:
        return None
    length = request.content_length
    if length is not None and length <= SMALL_BODY:
        return await request.content.readexactly(length)
    return request.content


def _refused_as_not_primary(upstream: aiohttp.ClientResponse) -> bool:
    return upstream.status == 503 and NOT_PRIMARY in upstream.headers


def _who(forward: bool) -> str:
    return "the primary" if forward else "the application"


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def _end_to_end(headers: Any) -> CIMultiDict[str]:
    """The headers without hop-by-hop ones, including those Connection names."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
    }
    drop = HOP_BY_HOP | named
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def _add_forwarding(headers: CIMultiDict[str], request: web.Request) -> None:
    client = request.remote or "unknown"
    previous = headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{previous}, {client}" if previous else client
    node = f'"[{client}]"' if ":" in client else client
    element = f"for={node};proto={request.scheme}"
    if request.host:
        element += f';host="{request.host}"'
    previous = headers.get("Forwarded")
    headers["Forwarded"] = f"{previous}, {element}" if previous else element
    headers.setdefault("X-Forwarded-Proto", request.scheme)
    if request.host:
        headers.setdefault("X-Forwarded-Host", request.host)
