"""The etcd lease backend, over etcd's v3 JSON gateway (`/v3/...`).

etcd's own lease primitive carries the TTL: the primary's key is attached to
an etcd lease, so when the lease runs out or is revoked etcd deletes the key,
and every watcher hears of it at once. The gateway speaks JSON over plain
HTTP/1.1, which aiohttp already gives us; no gRPC stack is needed. See
docs/lease-etcd.md for the mapping and the failure behaviour.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
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

log = logging.getLogger("litefs.lease.etcd")

WATCH_IDLE_RECONNECT = 30.0
WATCH_BACKOFF_MIN = 0.1
WATCH_BACKOFF_MAX = 2.0
LOG_REPEAT_INTERVAL = 10.0

_GRPC_NOT_FOUND = 5
_GRPC_RETRYABLE = frozenset({2, 4, 13, 14})  # Unknown, DeadlineExceeded, Internal, Unavailable

JSON = dict[str, Any]


class EtcdUnavailable(LeaseError):
    """No endpoint gave a usable answer; `attempts` says what each one did."""

    def __init__(self, operation: str, attempts: Sequence[tuple[str, str]]) -> None:
        tried = ", ".join(f"{url} ({reason})" for url, reason in attempts)
        super().__init__(f"etcd {operation} failed: no endpoint answered; tried {tried}")
        self.operation = operation
        self.attempts = list(attempts)


class EtcdRequestError(LeaseError):
    """etcd answered, but refused the request (bad request, unknown lease, ...)."""

    def __init__(self, operation: str, endpoint: str, code: int | None, message: str) -> None:
        super().__init__(f"etcd {operation} refused by {endpoint}: {message} (code {code})")
        self.operation = operation
        self.endpoint = endpoint
        self.code = code
        self.message = message


class _Unanswered(Exception):
    """One endpoint failed in a way that the next endpoint might not."""


class _IdleStream(Exception):
    """A stream stayed quiet so long that its connection may be silently dead."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        code = exc.os_error.errno
        return os.strerror(code).lower() if code and code > 0 else str(exc.os_error)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server closed the connection"
    return str(exc) or type(exc).__name__


class _Client:
    """JSON requests to a list of etcd endpoints, sticking to the last one that answered.

    Every etcd member serves the whole keyspace, so any endpoint will do; trying
    them in turn rides out a member that is down, partitioned or without leader.
    """

    def __init__(self, endpoints: Sequence[str], timeout: float) -> None:
        self.endpoints = [url.rstrip("/") for url in endpoints]
        self.timeout = timeout
        self.current = 0
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout, connect=self.timeout)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self.current + i) % n for i in range(n)]

    def _settle(self, index: int, attempts: list[tuple[str, str]]) -> None:
        if index != self.current:
            failed = ", ".join(f"{url} ({reason})" for url, reason in attempts)
            log.warning("etcd: now using %s after %s failed", self.endpoints[index], failed)
            self.current = index

    async def call(self, operation: str, path: str, body: JSON) -> JSON:
        """POST `body` to `path` on the first endpoint that answers; return its JSON."""
        attempts: list[tuple[str, str]] = []
        for index in self._order():
            url = self.endpoints[index]
            try:
                answer = await self._call_one(operation, url, path, body)
            except _Unanswered as exc:
                attempts.append((url, str(exc)))
                continue
            self._settle(index, attempts)
            return answer
        raise EtcdUnavailable(operation, attempts)

    async def _call_one(self, operation: str, url: str, path: str, body: JSON) -> JSON:
        for retry_stale in (True, False):
            try:
                async with self.session().post(url + path, json=body) as resp:
                    raw = await resp.read()
                    status = resp.status
                break
            except aiohttp.ServerDisconnectedError as exc:
                if retry_stale:
                    continue
                raise _Unanswered(_describe(exc, self.timeout)) from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise _Unanswered(_describe(exc, self.timeout)) from exc
        if status >= 500:
            raise _Unanswered(f"HTTP {status}: {_error_message(raw)}")
        try:
            answer = json.loads(raw)
        except ValueError as exc:
            raise _Unanswered(f"HTTP {status}: unparsable answer {raw[:100]!r}") from exc
        if not isinstance(answer, dict):
            raise _Unanswered(f"HTTP {status}: unexpected answer {raw[:100]!r}")
        error = answer.get("error")
        if status >= 400 or error is not None:
            code, message = _error_fields(answer)
            if code in _GRPC_RETRYABLE:
                raise _Unanswered(message)
            raise EtcdRequestError(operation, url, code, message)
        return answer

    async def stream(self, operation: str, path: str, body: JSON) -> AsyncGenerator[JSON, None]:
        """POST once and yield each JSON object of the streamed answer.

        Raises `EtcdUnavailable` when no endpoint accepts the request or the
        stream breaks, and `_IdleStream` when it stays quiet for
        WATCH_IDLE_RECONNECT seconds, so a silently dead connection is noticed.
        """
        attempts: list[tuple[str, str]] = []
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.timeout, sock_read=WATCH_IDLE_RECONNECT
        )
        for index in self._order():
            url = self.endpoints[index]
            try:
                resp = await self.session().post(url + path, json=body, timeout=timeout)
            except (aiohttp.ClientError, TimeoutError) as exc:
                attempts.append((url, _describe(exc, self.timeout)))
                continue
            if resp.status != 200:
                raw = await _read_quietly(resp)
                resp.release()
                if resp.status >= 500:
                    attempts.append((url, f"HTTP {resp.status}: {_error_message(raw)}"))
                    continue
                raise EtcdRequestError(operation, url, resp.status, _error_message(raw))
            self._settle(index, attempts)
            break
        else:
            raise EtcdUnavailable(operation, attempts)

        try:
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, _, buffer = buffer.partition(b"\n")
                    if line.strip():
                        yield _stream_message(operation, url, line)
            if buffer.strip():
                yield _stream_message(operation, url, buffer)
        except TimeoutError as exc:
            raise _IdleStream(url) from exc
        except aiohttp.ClientError as exc:
            raise EtcdUnavailable(operation, [(url, _describe(exc, self.timeout))]) from exc
        finally:
            resp.close()
        raise EtcdUnavailable(operation, [(url, "stream ended")])


def _stream_message(operation: str, url: str, line: bytes) -> JSON:
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise EtcdUnavailable(operation, [(url, f"unparsable message {line[:100]!r}")]) from exc
    if not isinstance(message, dict):
        raise EtcdUnavailable(operation, [(url, f"unexpected message {line[:100]!r}")])
    if "error" in message:
        code, text = _error_fields(message)
        if code in _GRPC_RETRYABLE:
            raise EtcdUnavailable(operation, [(url, text)])
        raise EtcdRequestError(operation, url, code, text)
    result = message.get("result")
    if not isinstance(result, dict):
        raise EtcdUnavailable(operation, [(url, f"message without result {line[:100]!r}")])
    return result


async def _read_quietly(resp: aiohttp.ClientResponse) -> bytes:
    try:
        return await resp.read()
    except (aiohttp.ClientError, TimeoutError):
        return b""


def _error_fields(answer: JSON) -> tuple[int | None, str]:
    """etcd's gateway reports errors flat in unary answers and nested in streams."""
    error = answer.get("error")
    if isinstance(error, dict):
        code, message = error.get("grpc_code"), error.get("message")
    else:
        code, message = answer.get("code"), answer.get("message") or error
    return (code if isinstance(code, int) else None), str(message or "unknown error")


def _error_message(raw: bytes) -> str:
    try:
        answer = json.loads(raw)
    except ValueError:
        return raw[:200].decode(errors="replace") or "no body"
    if isinstance(answer, dict):
        return _error_fields(answer)[1]
    return raw[:200].decode(errors="replace")


def _revision(answer: JSON) -> int:
    return int(answer.get("header", {}).get("revision", 0))


def _info_from_kv(kv: JSON | None) -> PrimaryInfo | None:
    if kv is None:
        return None
    try:
        raw = _unb64(kv.get("value", ""))
    except ValueError as exc:
        raise LeaseError(f"etcd gave a value that is not base64: {kv!r}") from exc
    return PrimaryInfo.from_json(raw)


class EtcdLease(Lease):
    """The etcd lease this node holds, with its key attached.

    Besides keeping the etcd lease alive, `renew` makes sure the key still
    belongs to it: someone could delete or overwrite the key (by hand, or a
    misconfigured node) while the lease itself lives on.
    """

    def __init__(self, leaser: EtcdLeaser, lease_id: int, ttl: float, renewed_at: float) -> None:
        self._leaser = leaser
        self.id = lease_id
        self.ttl = ttl
        self.renewed_at = renewed_at
        self._checked_revision = -1
        self._released = False

    def __repr__(self) -> str:
        return f"EtcdLease(id={self.id:x}, key={self._leaser.key!r}, ttl={self.ttl:g})"

    @property
    def renew_interval(self) -> float:
        return self.ttl / 3

    @property
    def handle(self) -> str:
        return str(self.id)

    async def renew(self) -> None:
        """Keep the lease alive; a lease past its local deadline is never revived.

        etcd restores every lease with a full TTL when it restarts or elects a
        new leader, so a keepalive can succeed after our own `deadline` has
        passed. By then the node has stepped down on the strength of that
        deadline; reviving the lease would contradict it, so it is revoked
        instead and `LeaseLost` raised, and the next election starts clean.
        """
        if self._released:
            raise LeaseLost(f"etcd lease {self.id:x} was released")
        started = time.monotonic()
        if self.expired(started):
            late = started - self.deadline
            await self._revoke_quietly()
            raise LeaseLost(
                f"etcd lease {self.id:x} on {self._leaser.key!r} passed its deadline "
                f"{late:.1f} s ago without a renewal"
            )
        client = self._leaser.client
        answer = await client.call("lease keepalive", "/v3/lease/keepalive", {"ID": str(self.id)})
        result = answer.get("result", answer)
        ttl = int(result.get("TTL", 0))
        if ttl <= 0:
            raise LeaseLost(
                f"etcd lease {self.id:x} on {self._leaser.key!r} expired or was revoked"
            )
        revision = _revision(result)
        if revision != self._checked_revision:
            await self._confirm_key()
        self.ttl = ttl
        self.renewed_at = started

    async def _confirm_key(self) -> None:
        """Check the key is still attached to this lease.

        Skipped while the store's revision has not moved since the last check:
        nothing at all changed, so neither did the key.
        """
        kv, revision = await self._leaser.range_key(keys_only=True)
        if kv is None:
            raise LeaseLost(f"etcd key {self._leaser.key!r} was deleted while lease was held")
        holder = int(kv.get("lease", 0))
        if holder != self.id:
            raise LeaseLost(f"etcd key {self._leaser.key!r} now belongs to lease {holder:x}")
        self._checked_revision = revision

    async def release(self) -> None:
        """Revoke the lease: etcd deletes the key at once and watchers hear of it."""
        if self._released:
            return
        self._released = True
        try:
            await self._revoke()
        except LeaseError as exc:
            log.warning("could not release etcd lease %x: %s", self.id, exc)

    async def _revoke(self) -> None:
        try:
            await self._leaser.client.call("lease revoke", "/v3/lease/revoke", {"ID": str(self.id)})
        except EtcdRequestError as exc:
            if exc.code != _GRPC_NOT_FOUND:
                raise

    async def _revoke_quietly(self) -> None:
        self._released = True
        try:
            await self._revoke()
        except LeaseError as exc:
            log.debug("could not revoke expired etcd lease %x: %s", self.id, exc)


class EtcdLeaser(Leaser):
    """Primary election on one etcd key, held through an etcd lease.

    `ttl` is rounded up to whole seconds (etcd's unit); etcd may grant more
    than asked (its minimum depends on its election timeout), and the granted
    TTL is what `EtcdLease.ttl` reports. `request_timeout` bounds each request
    to each endpoint; by default a third of the TTL, between 1 and 5 seconds,
    so that a renewal can fail over and retry before the deadline.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        key: str,
        ttl: float,
        hostname: str,
        advertise_url: str,
        candidate: bool = True,
        *,
        request_timeout: float | None = None,
    ) -> None:
        if isinstance(endpoints, str) or not endpoints:
            raise ValueError("etcd lease needs a list of at least one endpoint URL")
        if not key:
            raise ValueError("etcd lease key must not be empty")
        if not ttl > 0:
            raise ValueError(f"etcd lease TTL must be positive, not {ttl!r}")
        self.key = key
        self.ttl = ttl
        self.hostname = hostname
        self.advertise_url = advertise_url
        self.candidate = candidate
        if request_timeout is None:
            request_timeout = min(5.0, max(1.0, ttl / 3))
        self.client = _Client(endpoints, request_timeout)
        self._key64 = _b64(key.encode())
        self._standing_prefix = key.encode() + b"/standing/"

    @property
    def endpoints(self) -> list[str]:
        return list(self.client.endpoints)

    @property
    def endpoint(self) -> str:
        """The endpoint requests go to first: the last one that answered."""
        return self.client.endpoints[self.client.current]

    @property
    def info(self) -> PrimaryInfo:
        return PrimaryInfo(self.hostname, self.advertise_url)

    async def acquire(self) -> EtcdLease:
        """Grant a fresh etcd lease, then create the key under it only if absent.

        If the create's answer is lost and the request is retried on another
        endpoint, the retry finds the key already attached to our own lease;
        that counts as success rather than as another primary.
        """
        started = time.monotonic()
        grant = await self.client.call(
            "lease grant", "/v3/lease/grant", {"TTL": str(math.ceil(self.ttl))}
        )
        try:
            lease_id, granted = int(grant["ID"]), int(grant["TTL"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LeaseError(f"etcd lease grant gave an unusable answer: {grant!r}") from exc
        lease = EtcdLease(self, lease_id, granted, started)
        try:
            answer = await self.client.call("create key", "/v3/kv/txn", self._create_txn(lease_id))
        except LeaseError:
            await lease._revoke_quietly()
            raise
        if answer.get("succeeded"):
            lease._checked_revision = _revision(answer)
            log.info("acquired etcd lease %x on %r", lease_id, self.key)
            return lease
        kv = _range_in_failure(answer)
        if kv is not None and int(kv.get("lease", 0)) == lease_id:
            lease._checked_revision = _revision(answer)
            return lease
        await lease._revoke_quietly()
        raise PrimaryExists(_holder_or_none(kv))

    async def adopt(self, handle: str) -> EtcdLease:
        """Keep the old primary's etcd lease alive, then rewrite the key
        under it with this node's value, only if the key still belongs to it."""
        try:
            lease_id = int(handle)
        except ValueError:
            raise LeaseError(f"not an etcd lease: {handle!r}") from None
        started = time.monotonic()
        answer = await self.client.call(
            "lease keepalive", "/v3/lease/keepalive", {"ID": str(lease_id)}
        )
        ttl = int(answer.get("result", answer).get("TTL", 0))
        if ttl <= 0:
            raise LeaseLost(f"etcd lease {lease_id:x} on {self.key!r} expired or was revoked")
        lease = EtcdLease(self, lease_id, ttl, started)
        answer = await self.client.call("take over key", "/v3/kv/txn", self._adopt_txn(lease_id))
        if not answer.get("succeeded"):
            raise PrimaryExists(_holder_or_none(_range_in_failure(answer)))
        lease._checked_revision = _revision(answer)
        log.info("took over etcd lease %x on %r", lease_id, self.key)
        return lease

    def _adopt_txn(self, lease_id: int) -> JSON:
        """Put this node's value under `lease_id` if the key is attached to it."""
        compare = {"key": self._key64, "target": "LEASE", "result": "EQUAL", "lease": str(lease_id)}
        return self._put_txn(compare, lease_id)

    def _create_txn(self, lease_id: int) -> JSON:
        """Put this node's value under `lease_id` if the key does not exist."""
        absent = {"key": self._key64, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        return self._put_txn(absent, lease_id)

    def _put_txn(self, compare: JSON, lease_id: int) -> JSON:
        """A transaction that puts this node's value under `lease_id` when
        `compare` holds, and reads the key otherwise."""
        put = {"key": self._key64, "value": _b64(self.info.to_json()), "lease": str(lease_id)}
        return {
            "compare": [compare],
            "success": [{"request_put": put}],
            "failure": [{"request_range": {"key": self._key64}}],
        }

    async def range_key(self, keys_only: bool = False) -> tuple[JSON | None, int]:
        """The key's record (None when absent) and the store revision it was read at."""
        body: JSON = {"key": self._key64}
        if keys_only:
            body["keys_only"] = True
        answer = await self.client.call("read key", "/v3/kv/range", body)
        return _first_kv(answer), _revision(answer)

    async def primary_info(self) -> PrimaryInfo | None:
        kv, _ = await self.range_key()
        return _info_from_kv(kv)

    async def watch(self) -> AsyncIterator[PrimaryInfo | None]:
        """Follow the key with an etcd watch, resuming after errors where it left off.

        Only changes are yielded: a rewrite of the same value, or the same
        state seen again after a reconnect, is not repeated.
        """
        failures = FailureRun(log, f"etcd watch on {self.key!r}", LOG_REPEAT_INTERVAL)
        backoff = WATCH_BACKOFF_MIN
        unset = object()
        last: object = unset
        revision: int | None = None
        while True:
            try:
                if revision is None:
                    kv, revision = await self.range_key()
                    info = self._watched_info(kv)
                    failures.recovered()
                    if info != last:
                        last = info
                        yield info
                request = {
                    "create_request": {"key": self._key64, "start_revision": str(revision + 1)}
                }
                stream = self.client.stream("watch", "/v3/watch", request)
                async with aclosing(stream) as results:
                    async for result in results:
                        if result.get("created"):
                            failures.recovered()
                            backoff = WATCH_BACKOFF_MIN
                            continue
                        if int(result.get("compact_revision", 0)):
                            log.info(
                                "etcd watch on %r: revision %d was compacted; re-reading the key",
                                self.key,
                                revision + 1,
                            )
                            revision = None
                            break
                        if result.get("canceled"):
                            reason = result.get("cancel_reason") or "no reason given"
                            raise EtcdUnavailable("watch", [(self.endpoint, f"canceled: {reason}")])
                        for event in result.get("events", []):
                            kv = event.get("kv", {})
                            revision = max(revision, int(kv.get("mod_revision", 0)))
                            info = None if event.get("type") == "DELETE" else self._watched_info(kv)
                            if info != last:
                                last = info
                                yield info
            except _IdleStream:
                log.debug("etcd watch on %r idle; reconnecting", self.key)
            except LeaseError as exc:
                failures.failed(exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, WATCH_BACKOFF_MAX)

    def _watched_info(self, kv: JSON | None) -> PrimaryInfo | None:
        try:
            return _info_from_kv(kv)
        except LeaseError as exc:
            log.warning("etcd key %r holds no usable primary: %s", self.key, exc)
            return None

    async def publish_standing(self, standing: Standing) -> bool:
        key = self._standing_prefix + standing.hostname.encode()
        body = {"key": _b64(key), "value": _b64(standing.to_json())}
        await self.client.call("publish standing", "/v3/kv/put", body)
        return True

    async def standings(self) -> list[Standing]:
        prefix = self._standing_prefix
        body = {"key": _b64(prefix), "range_end": _b64(prefix[:-1] + bytes([prefix[-1] + 1]))}
        answer = await self.client.call("read standings", "/v3/kv/range", body)
        return parse_standings(_unb64(kv.get("value", "")) for kv in answer.get("kvs") or [])

    async def close(self) -> None:
        await self.client.close()


def _range_in_failure(answer: JSON) -> JSON | None:
    """The key as a failed put-if transaction read it (None when absent)."""
    responses = answer.get("responses") or [{}]
    return _first_kv(responses[0].get("response_range", {}))


def _holder_or_none(kv: JSON | None) -> PrimaryInfo | None:
    """Who a key record names; None for no key or a value that is not ours."""
    try:
        return _info_from_kv(kv)
    except LeaseError:
        return None


def _first_kv(answer: JSON) -> JSON | None:
    kvs = answer.get("kvs") or []
    return kvs[0] if kvs else None
