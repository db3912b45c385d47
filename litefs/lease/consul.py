"""The Consul lease: a TTL session holds a lock on one KV key naming the primary.

Acquiring creates a session (TTL, lock-delay, behavior "delete") and locks the
key with `?acquire=`, storing `PrimaryInfo` as its value. Renewing renews the
session and confirms the key is still locked by it. Releasing unlocks the key
*before* destroying the session: Consul starts lock-delay only for locks lost
through session invalidation, and destroying a session is one, so unlocking
first is what lets another node take over at once. A primary that dies stops
renewing; Consul invalidates the session no earlier than the TTL (and possibly
as late as twice the TTL), deletes the key, and refuses every lock on it for
the lock-delay, which gives the old primary time to notice and stop writing.

Everything is spoken over Consul's HTTP API with aiohttp; docs/lease-consul.md
explains why py-consul's client is not used.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import time
import urllib.parse
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from litefs.lease import (
    FailureRun,
    Lease,
    LeaseError,
    LeaseLost,
    Leaser,
    PrimaryExists,
    PrimaryInfo,
    Standing,
    parse_standings,
)

log = logging.getLogger("litefs.lease.consul")

DEFAULT_WATCH_WAIT = 30.0
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
FAILURE_LOG_INTERVAL = 30.0
SESSION_BEHAVIOR = "delete"


class ConsulUnreachable(LeaseError):
    """Consul could not be connected to, dropped the connection, or did not answer in time."""


class ConsulRequestError(LeaseError):
    """Consul answered, but with an error status or a body that makes no sense."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes


def _go_duration(seconds: float) -> str:
    """Consul parses durations as Go does; whole milliseconds are exact and valid."""
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


class ConsulLeaser(Leaser):
    """Competes for, and follows, the lease stored at `key` in Consul at `url`.

    `timeout` bounds every request except blocking reads (default: a quarter of
    the TTL, within [1s, 10s], so a renewal that hangs still leaves time to
    retry before the deadline). `watch_wait` is how long each blocking read may
    be held by Consul. The ACL token comes from CONSUL_HTTP_TOKEN, as for
    Consul's own tools, unless `token` is given.
    """

    def __init__(
        self,
        url: str,
        key: str,
        ttl: float,
        lock_delay: float,
        hostname: str,
        advertise_url: str,
        candidate: bool = True,
        *,
        timeout: float | None = None,
        watch_wait: float = DEFAULT_WATCH_WAIT,
        token: str | None = None,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"consul url must be http(s)://host[:port], got {url!r}")
        if not key.strip("/"):
            raise ValueError("consul key must not be empty")
        if not ttl > 0:
            raise ValueError(f"consul ttl must be positive, got {ttl!r}")
        if not lock_delay >= 0:
            raise ValueError(f"consul lock-delay must not be negative, got {lock_delay!r}")
        if not watch_wait > 0:
            raise ValueError(f"watch wait must be positive, got {watch_wait!r}")
        self.url = url.rstrip("/")
        self.key = key.strip("/")
        self.ttl = float(ttl)
        self.lock_delay = float(lock_delay)
        self.hostname = hostname
        self.advertise_url = advertise_url
        self.candidate = candidate
        self.timeout = timeout if timeout is not None else min(10.0, max(1.0, ttl / 4))
        self.watch_wait = watch_wait
        token = token if token is not None else os.environ.get("CONSUL_HTTP_TOKEN")
        self._headers = {"X-Consul-Token": token} if token else {}
        self._kv_path = "/v1/kv/" + urllib.parse.quote(self.key, safe="/")
        self._standing_path = self._kv_path + "/standing/"
        self._http: aiohttp.ClientSession | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"ConsulLeaser(url={self.url!r}, key={self.key!r}, hostname={self.hostname!r})"

    @property
    def info(self) -> PrimaryInfo:
        return PrimaryInfo(self.hostname, self.advertise_url)

    @property
    def acquire_delay(self) -> float:
        return self.lock_delay

    async def acquire(self) -> ConsulLease:
        if not self.candidate:
            raise LeaseError(f"{self.hostname} is not a candidate for primary")
        started = time.monotonic()
        session_id = await self._create_session()
        try:
            acquired = await self._lock(session_id)
        except BaseException:
            await self._destroy_session(session_id)
            raise
        if not acquired:
            await self._destroy_session(session_id)
            raise PrimaryExists(await self._holder_or_none())
        log.info("acquired lease %s with session %s", self.key, session_id)
        return ConsulLease(self, session_id, started)

    async def adopt(self, handle: str) -> ConsulLease:
        """Renew the old primary's session, then lock the key with it again
        under this node's value: Consul lets the session holding a lock
        rewrite the key without giving the lock up."""
        if not self.candidate:
            raise LeaseError(f"{self.hostname} is not a candidate for primary")
        started = time.monotonic()
        if not await self._renew_session(handle):
            raise LeaseLost(f"consul session {handle} for {self.key} has expired")
        if not await self._lock(handle):
            raise PrimaryExists(await self._holder_or_none())
        log.info("took over lease %s with session %s", self.key, handle)
        return ConsulLease(self, handle, started)

    async def primary_info(self) -> PrimaryInfo | None:
        entry, _ = await self._read()
        return _holder(entry)

    async def watch(self) -> AsyncGenerator[PrimaryInfo | None, None]:
        """Blocking reads of the key, each returning when it changes or `watch_wait` ends.

        Errors never end the watch: it retries with jittered exponential backoff
        and logs the first failure, then a reminder every FAILURE_LOG_INTERVAL.
        """
        failures = FailureRun(log, f"watching {self.url}{self._kv_path}", FAILURE_LOG_INTERVAL)
        index = 0
        backoff = BACKOFF_MIN
        last: PrimaryInfo | None = None
        first = True
        while True:
            sent = time.monotonic()
            try:
                entry, new_index = await self._read(index=index, wait=self.watch_wait)
            except LeaseError as exc:
                delay = _jitter(backoff)
                failures.failed(exc, delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            failures.recovered()
            try:
                current = _holder(entry)
            except LeaseError as exc:
                failures.note(f"treating the lease as unheld: {exc}")
                current = None
            next_index = 0 if new_index < index else max(new_index, 1)
            early = time.monotonic() - sent < self.watch_wait / 2
            if index > 0 and next_index == index and early:
                await asyncio.sleep(_jitter(backoff))
                backoff = min(backoff * 2, BACKOFF_MAX)
            else:
                backoff = BACKOFF_MIN
            index = next_index
            if first or current != last:
                first = False
                last = current
                yield current

    async def close(self) -> None:
        if self._http is not None and not self._http.closed:
            await self._http.close()
        self._http = None

    async def publish_standing(self, standing: Standing) -> bool:
        what = "publish this node's standing"
        path = self._standing_path + urllib.parse.quote(standing.hostname, safe="")
        reply = await self._request("PUT", path, what, data=standing.to_json())
        self._expect(reply, what)
        return True

    async def standings(self) -> list[Standing]:
        what = "read the candidates' standings"
        reply = await self._request("GET", self._standing_path, what, params={"recurse": "true"})
        if reply.status == 404:
            return []
        self._expect(reply, what)
        body = self._decode(reply, what)
        if not isinstance(body, list):
            raise ConsulRequestError(f"consul at {self.url} answered {what} with {body!r}", 200)
        values = (e.get("Value") for e in body if isinstance(e, dict))
        return parse_standings(_unbase64(v) for v in values if isinstance(v, str))

    # Consul API calls.

    async def _create_session(self) -> str:
        spec = {
            "Name": f"litefs-{self.hostname}",
            "TTL": _go_duration(self.ttl),
            "LockDelay": _go_duration(self.lock_delay),
            "Behavior": SESSION_BEHAVIOR,
        }
        what = "create a session"
        reply = await self._request("PUT", "/v1/session/create", what, data=json.dumps(spec))
        self._expect(reply, what)
        body = self._decode(reply, what)
        if not isinstance(body, dict) or not isinstance(body.get("ID"), str):
            raise ConsulRequestError(f"consul at {self.url} answered {what} without an ID")
        session_id: str = body["ID"]
        return session_id

    async def _lock(self, session_id: str) -> bool:
        what = f"lock key {self.key}"
        reply = await self._request(
            "PUT", self._kv_path, what, params={"acquire": session_id}, data=self.info.to_json()
        )
        self._expect(reply, what)
        return self._decode(reply, what) is True

    async def _unlock(self, session_id: str) -> None:
        what = f"unlock key {self.key}"
        reply = await self._request("PUT", self._kv_path, what, params={"release": session_id})
        self._expect(reply, what)

    async def _renew_session(self, session_id: str) -> bool:
        """False when Consul no longer knows the session."""
        what = "renew the session"
        reply = await self._request("PUT", f"/v1/session/renew/{session_id}", what)
        if reply.status == 404:
            return False
        self._expect(reply, what)
        return True

    async def _destroy_session(self, session_id: str) -> None:
        """Best effort: an undestroyed session still ends when its TTL runs out."""
        what = "destroy the session"
        try:
            reply = await self._request("PUT", f"/v1/session/destroy/{session_id}", what)
            self._expect(reply, what)
        except LeaseError as exc:
            log.warning(
                "could not destroy session %s (it expires after its TTL): %s", session_id, exc
            )

    async def _read(
        self, index: int = 0, wait: float | None = None
    ) -> tuple[dict[str, Any] | None, int]:
        """The key's entry (None when missing) and the X-Consul-Index to block on next."""
        what = f"read key {self.key}"
        params: dict[str, str] = {}
        timeout = self.timeout
        if index > 0 and wait is not None:
            params = {"index": str(index), "wait": _go_duration(wait)}
            timeout += wait + wait / 16
        reply = await self._request("GET", self._kv_path, what, params=params, timeout=timeout)
        try:
            new_index = int(reply.headers.get("X-Consul-Index", "0"))
        except ValueError:
            new_index = 0
        if reply.status == 404:
            return None, new_index
        self._expect(reply, what)
        body = self._decode(reply, what)
        if not isinstance(body, list) or not body or not isinstance(body[0], dict):
            raise ConsulRequestError(f"consul at {self.url} answered {what} with {body!r}", 200)
        return body[0], new_index

    async def _holder_or_none(self) -> PrimaryInfo | None:
        try:
            return await self.primary_info()
        except LeaseError:
            return None

    async def _request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        params: Mapping[str, str] | None = None,
        data: bytes | str | None = None,
        timeout: float | None = None,
    ) -> _Reply:
        limit = self.timeout if timeout is None else timeout
        try:
            async with self._session().request(
                method,
                self.url + path,
                params=params,
                data=data,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=limit),
            ) as response:
                return _Reply(response.status, response.headers, await response.read())
        except TimeoutError as exc:
            raise ConsulUnreachable(
                f"consul at {self.url} did not answer within {limit:g}s: could not {what}"
            ) from exc
        except aiohttp.ClientError as exc:
            raise ConsulUnreachable(
                f"consul at {self.url} is unreachable: could not {what}: {exc}"
            ) from exc

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._http is None or self._http.closed or self._http_loop is not loop:
            self._http = aiohttp.ClientSession()
            self._http_loop = loop
        return self._http

    def _expect(self, reply: _Reply, what: str) -> None:
        if reply.status != 200:
            text = reply.body[:200].decode(errors="replace").strip()
            raise ConsulRequestError(
                f"consul at {self.url} refused to {what}: HTTP {reply.status}: {text}",
                reply.status,
            )

    def _decode(self, reply: _Reply, what: str) -> Any:
        try:
            return json.loads(reply.body)
        except ValueError as exc:
            raise ConsulRequestError(
                f"consul at {self.url} answered {what} with malformed JSON: {reply.body[:200]!r}",
                reply.status,
            ) from exc


class ConsulLease(Lease):
    """The lock on the lease key, held through Consul session `session_id`."""

    def __init__(self, leaser: ConsulLeaser, session_id: str, renewed_at: float) -> None:
        self.ttl = leaser.ttl
        self.renewed_at = renewed_at
        self.session_id = session_id
        self._leaser = leaser
        self._released = False

    @property
    def renew_interval(self) -> float:
        return self.ttl / 2

    @property
    def handle(self) -> str:
        return self.session_id

    async def renew(self) -> None:
        """Renew the session, then confirm the key is still locked by it.

        The second step catches a key deleted or unlocked by hand, which leaves
        the session alive but the node no longer primary.
        """
        leaser = self._leaser
        if self._released:
            raise LeaseLost(f"lease {leaser.key} was released")
        started = time.monotonic()
        if not await leaser._renew_session(self.session_id):
            raise LeaseLost(f"consul session {self.session_id} for {leaser.key} has expired")
        entry, _ = await leaser._read()
        if entry is None or entry.get("Session") != self.session_id:
            raise LeaseLost(f"key {leaser.key} is no longer locked by session {self.session_id}")
        self.renewed_at = started

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            await self._leaser._unlock(self.session_id)
        except LeaseError as exc:
            log.warning("could not unlock %s: %s", self._leaser.key, exc)
        await self._leaser._destroy_session(self.session_id)
        log.info("released lease %s", self._leaser.key)


def _holder(entry: Mapping[str, Any] | None) -> PrimaryInfo | None:
    """Who the entry says is primary; None when nobody holds the lock."""
    if entry is None or not entry.get("Session"):
        return None
    raw = entry.get("Value")
    try:
        value = base64.b64decode(raw, validate=True) if isinstance(raw, str) else b""
    except ValueError as exc:
        raise LeaseError(f"malformed lease value: {raw!r} is not base64") from exc
    return PrimaryInfo.from_json(value)


def _unbase64(raw: str) -> bytes:
    """The decoded value; nothing for a malformed one, which the caller skips."""
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:
        return b""


def _jitter(delay: float) -> float:
    return delay * random.uniform(0.5, 1.0)
