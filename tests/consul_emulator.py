"""A stand-in for the part of Consul's HTTP API that leases depend on.

Lease tests need Consul's session and KV semantics (TTL invalidation, lock
acquisition, lock-delay, blocking queries), and they need to break Consul on
purpose, which a real agent does not allow. The emulator follows Consul's
documented behaviour:

* Sessions are invalidated when destroyed or when their TTL runs out without a
  renewal. Consul only promises that invalidation happens no earlier than the
  TTL and may take up to twice as long; `ttl_multiplier` picks where in that
  range the emulator invalidates (1.0, the default, is the strictest).
* On invalidation, locks held by the session are released (behavior
  "release") or their keys deleted (behavior "delete"), and every such key is
  under lock-delay: no session may acquire it until the delay has passed. A
  key given up with `?release=` is not under lock-delay, so releasing before
  destroying lets another session acquire at once.
* `?acquire=` answers false while lock-delay is in force or another session
  holds the key, and 500 for a session that does not exist. The holder may
  acquire again to update the value.
* KV reads carry `X-Consul-Index`; with `?index=N` they block until the key
  changes past N or `wait` runs out, then answer with the current state.

Consul refuses session TTLs under 10s; `min_ttl` lowers that bound so tests
can use short TTLs, and nothing else does.

Run in-process with `ConsulEmulator.start()` (async) or `ThreadedConsulEmulator`
(sync), or as a process: `python tests/consul_emulator.py --addr 127.0.0.1:0`
prints `listening on http://HOST:PORT` once it accepts connections. Faults:
`refuse()` stops listening and cuts every open connection, as when Consul is
down; `stall()` accepts requests and answers none until `resume()`. A process
is controlled through `/_emulator/` endpoints (see `_control_routes`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import re
import signal
import socket
import sys
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

SESSION_TTL_MIN = 10.0
SESSION_TTL_MAX = 86400.0
LOCK_DELAY_MAX = 60.0
LOCK_DELAY_DEFAULT = 15.0
# Consul reads a numeric LockDelay below this as seconds, otherwise as nanoseconds.
LOCK_DELAY_SECONDS_THRESHOLD = 1000
WAIT_DEFAULT = 300.0
WAIT_MAX = 600.0
VALUE_MAX_BYTES = 512 * 1024

_T = TypeVar("_T")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string ("10s", "1m30s", "250ms"), as Consul reads them."""
    body = text.lstrip("+-")
    sign = -1.0 if text.startswith("-") else 1.0
    if body == "0":
        return 0.0
    if not body:
        raise ValueError(f"invalid duration {text!r}")
    total, pos = 0.0, 0
    while pos < len(body):
        match = _DURATION_PART.match(body, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return sign * total


def format_duration(seconds: float) -> str:
    """The shortest exact Go duration string for `seconds` (millisecond precision)."""
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


class ApiError(Exception):
    """A request Consul would answer with an error status and a plain-text reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class _Session:
    id: str
    name: str
    node: str
    ttl: float
    ttl_text: str
    lock_delay: float
    behavior: str
    create_index: int
    timer: asyncio.TimerHandle | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": round(self.lock_delay * 1e9),
            "Behavior": self.behavior,
            "TTL": self.ttl_text,
            "NodeChecks": ["serfHealth"],
            "ServiceChecks": None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.create_index,
        }


@dataclass
class _Entry:
    key: str
    value: bytes | None
    flags: int
    create_index: int
    modify_index: int
    lock_index: int = 0
    session: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "LockIndex": self.lock_index,
            "Key": self.key,
            "Flags": self.flags,
            "Value": None if self.value is None else base64.b64encode(self.value).decode(),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        if self.session:
            out["Session"] = self.session
        return out


@dataclass
class _State:
    index: int = 1
    kv_index: int = 1
    sessions: dict[str, _Session] = field(default_factory=dict)
    kv: dict[str, _Entry] = field(default_factory=dict)
    changed_at: dict[str, int] = field(default_factory=dict)
    lock_delay_until: dict[str, float] = field(default_factory=dict)


class ConsulEmulator:
    """Consul's session and KV endpoints, one aiohttp server on one event loop.

    All state lives on the loop that called `start()`; call the other methods
    from that loop (or through `ThreadedConsulEmulator`).
    """

    def __init__(
        self,
        *,
        min_ttl: float = SESSION_TTL_MIN,
        ttl_multiplier: float = 1.0,
        wait_jitter: bool = False,
        node: str = "consul-emulator",
    ) -> None:
        if not 1.0 <= ttl_multiplier <= 2.0:
            raise ValueError(
                "ttl_multiplier must be within [1, 2]: Consul invalidates in [TTL, 2 x TTL]"
            )
        self.min_ttl = min_ttl
        self.ttl_multiplier = ttl_multiplier
        self.wait_jitter = wait_jitter
        self.node = node
        self.requests: Counter[str] = Counter()
        """Requests served, by "METHOD kind" ("GET kv", "PUT session/renew", ...)."""
        self.blocking_queries = 0
        self._state = _State()
        self._kv_changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._host = "127.0.0.1"
        self._port = 0
        self._refusing = False
        self._served = asyncio.Event()
        self._served.set()
        self._timed_resume: asyncio.TimerHandle | None = None

    @property
    def url(self) -> str:
        if self._runner is None:
            raise RuntimeError("emulator not started")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on `host:port` (0: any free port); returns the base URL."""
        app = web.Application(middlewares=[self._middleware])
        app.add_routes(self._api_routes() + self._control_routes())
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        self._host = host
        self._port = port
        await self._listen()
        return self.url

    async def stop(self) -> None:
        if self._timed_resume is not None:
            self._timed_resume.cancel()
        for session in self._state.sessions.values():
            if session.timer is not None:
                session.timer.cancel()
        self._served.set()
        if self._runner is not None:
            if self._site is not None:
                await self._site.stop()
                self._site = None
            self._cut_connections()
            await self._runner.cleanup()

    async def __aenter__(self) -> ConsulEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # Fault injection.

    async def refuse(self) -> None:
        """Stop listening and cut open connections: clients see Consul as down."""
        await self._refuse()

    async def _refuse(self, spare: object = None) -> None:
        self._refusing = True
        if self._site is not None:
            await self._site.stop()
            self._site = None
        self._cut_connections(spare)

    def stall(self) -> None:
        """Accept requests but answer none until `resume()` (a black-holed network)."""
        self._served.clear()

    async def resume(self) -> None:
        """End `refuse()` or `stall()`: listen on the same port and answer again."""
        if self._timed_resume is not None:
            self._timed_resume.cancel()
            self._timed_resume = None
        if self._refusing:
            self._refusing = False
            await self._listen()
        self._served.set()

    def invalidate_session(self, session_id: str) -> bool:
        """Invalidate a session as a failed health check would; False if unknown."""
        if session_id not in self._state.sessions:
            return False
        self._invalidate(session_id)
        return True

    async def _listen(self) -> None:
        assert self._runner is not None
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        self._site = web.SockSite(self._runner, sock)
        await self._site.start()

    def _cut_connections(self, spare: object = None) -> None:
        if self._runner is not None and self._runner.server is not None:
            for connection in self._runner.server.connections:
                if connection is not spare:
                    connection.force_close()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.path.startswith("/_emulator/"):
            return await handler(request)
        self.requests[f"{request.method} {_kind(request.path)}"] += 1
        await self._served.wait()
        try:
            return await handler(request)
        except ApiError as exc:
            return web.Response(status=exc.status, text=exc.reason)

    # Consul API.

    def _api_routes(self) -> list[web.RouteDef]:
        return [
            web.put("/v1/session/create", self._session_create),
            web.put("/v1/session/renew/{id}", self._session_renew),
            web.put("/v1/session/destroy/{id}", self._session_destroy),
            web.get("/v1/session/info/{id}", self._session_info),
            web.get("/v1/session/list", self._session_list),
            web.get("/v1/kv/{key:.*}", self._kv_get),
            web.put("/v1/kv/{key:.*}", self._kv_put),
            web.delete("/v1/kv/{key:.*}", self._kv_delete),
        ]

    def _next_index(self) -> int:
        self._state.index += 1
        return self._state.index

    def _read_headers(self, index: int) -> dict[str, str]:
        return {
            "X-Consul-Index": str(max(1, index)),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
        }

    async def _session_create(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            spec = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            raise ApiError(400, f"Request decode failed: {exc}") from exc
        if not isinstance(spec, dict):
            raise ApiError(400, "Request decode failed: expected a JSON object")
        fields = {str(name).lower(): value for name, value in spec.items()}
        behavior = fields.get("behavior") or "release"
        if behavior not in ("release", "delete"):
            raise ApiError(400, f"Invalid Behavior setting '{behavior}'")
        lock_delay = _lock_delay(fields.get("lockdelay", LOCK_DELAY_DEFAULT * 1e9))
        ttl_text = fields.get("ttl") or ""
        if not isinstance(ttl_text, str):
            raise ApiError(400, "Request decode failed: TTL must be a duration string")
        try:
            ttl = parse_duration(ttl_text) if ttl_text else 0.0
        except ValueError as exc:
            raise ApiError(400, f"Session TTL '{ttl_text}' invalid: {exc}") from exc
        if ttl != 0.0 and not self.min_ttl <= ttl <= SESSION_TTL_MAX:
            raise ApiError(
                400,
                f"Invalid Session TTL '{ttl_text}', must be between "
                f"[{format_duration(self.min_ttl)}={format_duration(SESSION_TTL_MAX)}]",
            )
        session = _Session(
            id=str(uuid.uuid4()),
            name=str(fields.get("name") or ""),
            node=str(fields.get("node") or self.node),
            ttl=ttl,
            ttl_text=ttl_text,
            lock_delay=lock_delay,
            behavior=behavior,
            create_index=self._next_index(),
        )
        self._state.sessions[session.id] = session
        self._arm_timer(session)
        return web.json_response({"ID": session.id})

    async def _session_renew(self, request: web.Request) -> web.Response:
        session = self._state.sessions.get(request.match_info["id"])
        if session is None:
            raise ApiError(404, f"Session id '{request.match_info['id']}' not found")
        self._arm_timer(session)
        return web.json_response([session.to_json()])

    async def _session_destroy(self, request: web.Request) -> web.Response:
        if request.match_info["id"] in self._state.sessions:
            self._invalidate(request.match_info["id"])
        return web.json_response(True)

    async def _session_info(self, request: web.Request) -> web.Response:
        session = self._state.sessions.get(request.match_info["id"])
        body = [session.to_json()] if session is not None else []
        return web.json_response(body, headers=self._read_headers(self._state.index))

    async def _session_list(self, request: web.Request) -> web.Response:
        body = [s.to_json() for s in self._state.sessions.values()]
        return web.json_response(body, headers=self._read_headers(self._state.index))

    def _arm_timer(self, session: _Session) -> None:
        if session.timer is not None:
            session.timer.cancel()
        if session.ttl > 0:
            delay = session.ttl * self.ttl_multiplier
            loop = asyncio.get_running_loop()
            session.timer = loop.call_later(delay, self._invalidate, session.id)

    def _invalidate(self, session_id: str) -> None:
        state = self._state
        session = state.sessions.pop(session_id)
        if session.timer is not None:
            session.timer.cancel()
        index = self._next_index()
        held = [entry for entry in state.kv.values() if entry.session == session_id]
        now = asyncio.get_running_loop().time()
        for entry in held:
            if session.behavior == "delete":
                del state.kv[entry.key]
            else:
                entry.session = ""
                entry.modify_index = index
            if session.lock_delay > 0:
                state.lock_delay_until[entry.key] = now + session.lock_delay
        self._kv_write([entry.key for entry in held], index)

    def _kv_write(self, keys: list[str], index: int) -> None:
        if not keys:
            return
        for key in keys:
            self._state.changed_at[key] = index
        self._state.kv_index = index
        self._kv_changed.set()
        self._kv_changed = asyncio.Event()

    async def _kv_get(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        query = request.query
        recurse = "recurse" in query
        min_index = _int_param(query, "index", "Invalid index")
        if min_index > 0:
            wait = WAIT_DEFAULT
            if "wait" in query:
                try:
                    wait = parse_duration(query["wait"])
                except ValueError as exc:
                    raise ApiError(400, "Invalid wait time") from exc
            wait = min(max(wait, 0.0), WAIT_MAX)
            if self.wait_jitter:
                wait += random.uniform(0, wait / 16)
            self.blocking_queries += 1
            await self._wait_for_change(key, recurse, min_index, wait)
        state = self._state
        if recurse:
            entries = [state.kv[k] for k in sorted(state.kv) if k.startswith(key)]
        else:
            entries = [state.kv[key]] if key in state.kv else []
        headers = self._read_headers(state.kv_index)
        if not entries:
            return web.Response(status=404, headers=headers)
        if "raw" in query and not recurse:
            return web.Response(body=entries[0].value or b"", headers=headers)
        return web.json_response([entry.to_json() for entry in entries], headers=headers)

    async def _wait_for_change(self, key: str, recurse: bool, min_index: int, wait: float) -> None:
        def changed() -> bool:
            if recurse:
                return any(
                    index > min_index
                    for name, index in self._state.changed_at.items()
                    if name.startswith(key)
                )
            return self._state.changed_at.get(key, 0) > min_index

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while not changed():
                    await self._kv_changed.wait()

    async def _kv_put(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        query = request.query
        if not key:
            raise ApiError(400, "Missing key name")
        if "acquire" in query and "release" in query:
            raise ApiError(400, "Conflicting flags: acquire=, release=")
        body = await request.read()
        if len(body) > VALUE_MAX_BYTES:
            raise ApiError(413, f"Value exceeds {VALUE_MAX_BYTES} byte limit")
        flags = _int_param(query, "flags", "Invalid flags")
        value = body or None
        if "acquire" in query:
            result = self._acquire(key, query["acquire"], value, flags)
        elif "release" in query:
            result = self._release(key, query["release"], value, flags)
        else:
            entry = self._state.kv.get(key)
            if "cas" in query:
                cas = _int_param(query, "cas", "Invalid cas")
                current = 0 if entry is None else entry.modify_index
                if cas != current:
                    return web.json_response(False)
            self._set(key, value, flags)
            result = True
        return web.json_response(result)

    def _set(self, key: str, value: bytes | None, flags: int) -> _Entry:
        index = self._next_index()
        entry = self._state.kv.get(key)
        if entry is None:
            entry = _Entry(key, value, flags, create_index=index, modify_index=index)
            self._state.kv[key] = entry
        else:
            entry.value, entry.flags, entry.modify_index = value, flags, index
        self._kv_write([key], index)
        return entry

    def _acquire(self, key: str, session_id: str, value: bytes | None, flags: int) -> bool:
        state = self._state
        if state.lock_delay_until.get(key, 0.0) > asyncio.get_running_loop().time():
            return False
        if session_id not in state.sessions:
            raise ApiError(500, f'invalid session "{session_id}"')
        entry = state.kv.get(key)
        if entry is not None and entry.session not in ("", session_id):
            return False
        new_holder = entry is None or entry.session != session_id
        entry = self._set(key, value, flags)
        if new_holder:
            entry.session = session_id
            entry.lock_index += 1
        return True

    def _release(self, key: str, session_id: str, value: bytes | None, flags: int) -> bool:
        entry = self._state.kv.get(key)
        if entry is None or not session_id or entry.session != session_id:
            return False
        entry.session = ""
        self._set(key, value, flags)
        return True

    async def _kv_delete(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        query = request.query
        state = self._state
        if "recurse" in query:
            doomed = [name for name in state.kv if name.startswith(key)]
        else:
            doomed = [key] if key in state.kv else []
        if "cas" in query and "recurse" not in query:
            cas = _int_param(query, "cas", "Invalid cas")
            if cas == 0 or not doomed or state.kv[key].modify_index != cas:
                return web.json_response(False)
        if doomed:
            index = self._next_index()
            for name in doomed:
                del state.kv[name]
            self._kv_write(doomed, index)
        return web.json_response(True)

    # Control endpoints, for an emulator running as a separate process.

    def _control_routes(self) -> list[web.RouteDef]:
        return [
            web.put("/_emulator/outage", self._control_outage),
            web.put("/_emulator/resume", self._control_resume),
            web.put("/_emulator/session/{id}/invalidate", self._control_invalidate),
            web.get("/_emulator/requests", self._control_requests),
        ]

    async def _control_outage(self, request: web.Request) -> web.Response:
        """`?mode=refuse|stall&duration=2s`; refuse needs a duration: nothing could resume it."""
        mode = request.query.get("mode", "refuse")
        duration: float | None = None
        if "duration" in request.query:
            try:
                duration = parse_duration(request.query["duration"])
            except ValueError:
                return web.Response(status=400, text="invalid duration")
        if mode not in ("refuse", "stall") or (mode == "refuse" and duration is None):
            return web.Response(status=400, text="mode must be refuse (with duration) or stall")
        if mode == "refuse":
            await self._refuse(spare=request.protocol)
        else:
            self.stall()
        response = web.json_response({"mode": mode, "duration": duration})
        response.force_close()
        if duration is not None:
            loop = asyncio.get_running_loop()
            self._timed_resume = loop.call_later(duration, lambda: loop.create_task(self.resume()))
        return response

    async def _control_resume(self, request: web.Request) -> web.Response:
        await self.resume()
        return web.json_response(True)

    async def _control_invalidate(self, request: web.Request) -> web.Response:
        return web.json_response(self.invalidate_session(request.match_info["id"]))

    async def _control_requests(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"requests": dict(self.requests), "blocking_queries": self.blocking_queries}
        )


def _kind(path: str) -> str:
    parts = path.removeprefix("/v1/").split("/")
    if parts[0] == "session" and len(parts) > 1:
        return f"session/{parts[1]}"
    return parts[0]


def _int_param(query: Any, name: str, reason: str) -> int:
    if name not in query:
        return 0
    try:
        value = int(query[name])
    except ValueError as exc:
        raise ApiError(400, reason) from exc
    if value < 0:
        raise ApiError(400, reason)
    return value


def _lock_delay(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ApiError(400, "Request decode failed: LockDelay must be a duration")
    if isinstance(raw, str):
        try:
            seconds = parse_duration(raw)
        except ValueError as exc:
            raise ApiError(400, f"Request decode failed: {exc}") from exc
    elif raw < LOCK_DELAY_SECONDS_THRESHOLD:
        seconds = float(raw)
    else:
        seconds = raw / 1e9
    if not 0 <= seconds <= LOCK_DELAY_MAX:
        raise ApiError(400, f"Lock delay must be between 0s and {format_duration(LOCK_DELAY_MAX)}")
    return seconds


@contextlib.asynccontextmanager
async def running_emulator(**options: Any) -> AsyncIterator[ConsulEmulator]:
    """An emulator on a free loopback port for the duration of the block."""
    emulator = ConsulEmulator(**options)
    await emulator.start()
    try:
        yield emulator
    finally:
        await emulator.stop()


class ThreadedConsulEmulator:
    """An emulator on its own event loop thread, for synchronous tests and code."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.emulator: ConsulEmulator | None = None
        self.url = ""

    def __enter__(self) -> ThreadedConsulEmulator:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name="consul-emulator", daemon=True
        )
        self._thread.start()

        async def start() -> ConsulEmulator:
            emulator = ConsulEmulator(**self._options)
            await emulator.start()
            return emulator

        self.emulator = self._call(start())
        self.url = self.emulator.url
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._loop is not None and self._thread is not None
        if self.emulator is not None:
            self._call(self.emulator.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def _emulator(self) -> ConsulEmulator:
        if self.emulator is None:
            raise RuntimeError("emulator not started")
        return self.emulator

    def refuse(self) -> None:
        self._call(self._emulator().refuse())

    def stall(self) -> None:
        async def stall() -> None:
            self._emulator().stall()

        self._call(stall())

    def resume(self) -> None:
        self._call(self._emulator().resume())

    def invalidate_session(self, session_id: str) -> bool:
        async def invalidate() -> bool:
            return self._emulator().invalidate_session(session_id)

        return self._call(invalidate())

    def requests(self) -> Counter[str]:
        async def snapshot() -> Counter[str]:
            return Counter(self._emulator().requests)

        return self._call(snapshot())


def real_consul_url() -> str | None:
    """The Consul named by CONSUL_HTTP_ADDR, as a URL, or None to use the emulator."""
    address = os.environ.get("CONSUL_HTTP_ADDR", "").strip()
    if not address:
        return None
    return address if "://" in address else f"http://{address}"


@dataclass
class ConsulTarget:
    """Where a test talks to Consul: a real agent, or an emulator it may break."""

    url: str
    emulator: ConsulEmulator | None

    @property
    def real(self) -> bool:
        return self.emulator is None

    def ttl(self, fast: float) -> float:
        """`fast` against the emulator; Consul's minimum TTL against a real agent."""
        return max(fast, SESSION_TTL_MIN) if self.real else fast

    def expiry_bound(self, ttl: float) -> float:
        """Latest moment after its last renewal that a session may be invalidated."""
        multiplier = 2.0 if self.emulator is None else self.emulator.ttl_multiplier
        return ttl * multiplier


@contextlib.asynccontextmanager
async def consul_target(**options: Any) -> AsyncIterator[ConsulTarget]:
    """The real Consul when CONSUL_HTTP_ADDR is set, otherwise a fresh emulator."""
    url = real_consul_url()
    if url is not None:
        yield ConsulTarget(url, None)
        return
    async with running_emulator(**options) as emulator:
        yield ConsulTarget(emulator.url, emulator)


def unique_prefix() -> str:
    """A KV prefix no other test uses, so tests can share one real Consul."""
    return f"litefs-test/{uuid.uuid4().hex}/"


def _parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _parse_seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        try:
            return parse_duration(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc


async def _serve(args: argparse.Namespace) -> None:
    emulator = ConsulEmulator(
        min_ttl=args.min_ttl, ttl_multiplier=args.ttl_multiplier, wait_jitter=args.wait_jitter
    )
    host, port = args.addr
    url = await emulator.start(host, port)
    print(f"listening on {url}", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, done.set)
    try:
        await done.wait()
    finally:
        await emulator.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Emulate Consul's session and KV HTTP API.")
    parser.add_argument("--addr", type=_parse_addr, default=("127.0.0.1", 0), help="HOST:PORT")
    parser.add_argument(
        "--min-ttl",
        type=_parse_seconds,
        default=SESSION_TTL_MIN,
        help="shortest session TTL accepted (Consul: 10s)",
    )
    parser.add_argument(
        "--ttl-multiplier",
        type=float,
        default=1.0,
        help="invalidate sessions at TTL times this, within [1, 2]",
    )
    parser.add_argument(
        "--wait-jitter", action="store_true", help="add up to wait/16 to blocking queries"
    )
    args = parser.parse_args(argv)
    if not 1.0 <= args.ttl_multiplier <= 2.0:
        parser.error("--ttl-multiplier must be within [1, 2]")
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
