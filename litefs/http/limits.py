"""What one network client can make a node spend: descriptors, connections
and time.

Every connection holds a descriptor, and the mount, the databases and their
LTX files need descriptors too: if clients could take them all, SQLite on
the primary could no longer open its database. So the node raises its soft
descriptor limit to the hard one at start, keeps half of them (at least
`MIN_RESERVE`) out of the HTTP server's reach, and refuses connections
beyond its cap at once with a 503. A connection must send a complete
request head within the read timeout, and one idle between requests is
closed after the idle timeout, so a client that only opens sockets holds
them briefly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_request import BaseRequest

log = logging.getLogger("litefs.http")

MIN_RESERVE = 64
"""Descriptors never given to HTTP connections, however high the limit."""

DESCRIPTOR_LIMIT_CEILING = 1 << 20
"""The soft limit aimed for when the hard limit is unlimited."""


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = DESCRIPTOR_LIMIT_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
    return DESCRIPTOR_LIMIT_CEILING if soft == resource.RLIM_INFINITY else soft


def connection_cap(configured: int, descriptors: int) -> int:
    """At most `configured` connections, and at most half the descriptors
    beyond the reserve."""
    return max(1, min(configured, (descriptors - MIN_RESERVE) // 2))


def error_body(status: int, message: str, **extra: Any) -> bytes:
    return json.dumps({"error": message, **extra}).encode()


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    """An error answer: always a JSON object with an `error` sentence."""
    return web.json_response({"error": message, **extra}, status=status)


def _refusal(message: str) -> bytes:
    body = error_body(503, message)
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class ConnectionLimits:
    """Shared by every connection of one server."""

    max_connections: int
    read_timeout: float
    open: int = 0
    refused: int = 0
    timed_out: int = 0
    _refusal: bytes = field(init=False)

    def __post_init__(self) -> None:
        self._refusal = _refusal(f"too many connections (at most {self.max_connections})")


class GuardedHandler(web.RequestHandler):
    """aiohttp's connection handler with a connection cap, a deadline for
    each request head, and JSON error answers for requests aiohttp itself
    refuses (malformed heads, oversized headers)."""

    def __init__(self, manager: web.Server, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._refused = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_count = -1
        """The request count when the head timer was armed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limits = self._limits
        if limits.open >= limits.max_connections:
            self._refused = True
            limits.refused += 1
            log.warning(
                "refusing a connection: %d are open, the limit is %d",
                limits.open,
                limits.max_connections,
            )
            assert isinstance(transport, asyncio.Transport)
            transport.write(limits._refusal)
            transport.close()
            return
        limits.open += 1
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self._limits.open -= 1
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_head() and self._head_count != self._request_count:
            self._disarm_head_timer()
            self._arm_head_timer()

    def _waiting_for_head(self) -> bool:
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _arm_head_timer(self) -> None:
        """Time the head of request number `_request_count` + 1."""
        count = self._head_count = self._request_count
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(self._limits.read_timeout, self._head_due, count)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_due(self, count: int) -> None:
        """A request head that started arriving `read_timeout` ago must be complete."""
        self._head_timer = None
        if self._request_count == count and self._waiting_for_head():
            self._limits.timed_out += 1
            log.info(
                "closing a connection that sent no complete request in %gs",
                self._limits.read_timeout,
            )
            self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had started: no error answer can follow")
        phrase = HTTPStatus(status).phrase
        detail = getattr(exc, "message", None) or message
        if status >= 500:
            log.error("internal error serving a request from %s: %s", request.remote, exc)
            text = phrase.lower()
        else:
            text = f"{phrase}: {detail}"[:300] if isinstance(detail, str) and detail else phrase
            log.info("refused a malformed request from %s: %s", request.remote, text)
        response = json_error(status, text)
        response.force_close()
        return response
