"""The node's HTTP server: the replication stream, /info, /metrics, /import,
/export and /handoff.

It runs on asyncio in the daemon's second thread. The stream handler wakes on
store change notices (delivered with `call_soon_threadsafe`), never polls,
and does anything that blocks (snapshots) in worker threads.

A stream costs the node a bounded amount of memory however slowly its
replica reads: files go out in slices of `SEND_SLICE` bytes, each written
only once the connection's buffer has drained, and a replica that takes no
bytes for the write timeout is dropped. Connections and streams are capped
(see `limits`), and when a shared secret is configured, /stream and
/handoff answer only requests that carry it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from litefs import ltx, sqlitefile
from litefs.config import HTTPConfig
from litefs.db import DatabaseError
from litefs.http import protocol
from litefs.http.limits import ConnectionLimits, GuardedHandler, connection_cap, json_error
from litefs.http.metrics import Metrics
from litefs.http.protocol import FrameType
from litefs.names import InvalidName, check_new_name
from litefs.position import EMPTY_POSITION, Position
from litefs.store import Change, NotPrimary, Store

log = logging.getLogger("litefs.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UPLOAD_CHUNK = 1 << 20
STALLED_AFTER = 1.0
"""Seconds a write to a replica may wait before a stop stops waiting for it."""
SHUTDOWN_TIMEOUT = 3.0
"""Seconds requests still under way get when the server stops: streams were
drained before, and a stalled one must not hold the node's exit."""
SEND_SLICE = 64 << 10
"""Bytes of a file handed to a connection at a time; a file that fits is
sent, with its frame and end marker, in one write."""
HANDOFF_CATCH_UP = 5.0
PROTECTED_PATHS = frozenset({protocol.STREAM_PATH, "/handoff", "/import", "/export"})
"""Paths that need the shared secret when one is configured: those that
change the cluster's state or hand out a database's contents."""


class StreamStalled(Exception):
    """The replica took no bytes for the write timeout."""


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answer is JSON with an `error` field, never an HTML page."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = json_error(exc.status, exc.reason)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("internal error serving %s %s", request.method, request.path)
        return json_error(500, "internal error")


class Server:
    """Serves one node's store over HTTP."""

    def __init__(
        self,
        store: Store,
        hostname: str,
        metrics: Metrics,
        settings: HTTPConfig | None = None,
        descriptors: int = 1024,
    ) -> None:
        self.store = store
        self.hostname = hostname
        self.metrics = metrics
        self.settings = settings = settings or HTTPConfig(addr="", host="", port=0)
        self.replicas: dict[int, str] = {}
        self.sessions: dict[int, StreamSession] = {}
        self.on_handoff: Callable[[str], Awaitable[None]] | None = None
        self._lease_session: StreamSession | None = None
        self.proxy_url: str | None = None
        """This node's write-forwarding proxy, advertised in /info."""
        max_connections = connection_cap(settings.max_connections, descriptors)
        self.limits = ConnectionLimits(max_connections, settings.read_timeout)
        self.max_streams = min(settings.max_streams, max_connections)
        self._token = settings.auth_token.encode() if settings.auth_token else None
        self.app = web.Application(
            middlewares=[errors_as_json, self.require_token], client_max_size=protocol.MAX_REQUEST
        )
        self.app.router.add_post(protocol.STREAM_PATH, self.stream)
        self.app.router.add_get("/info", self.info)
        self.app.router.add_get("/metrics", self.render_metrics)
        self.app.router.add_get("/export", self.export)
        self._add_change("/handoff", self.handoff)
        self._add_change("/import", self.import_database)
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None

    def _add_change(self, path: str, handler: Handler) -> None:
        """Every request that changes the cluster's state is routed here, so
        a check that applies to all of them has one place to go."""
        self.app.router.add_post(path, handler)

    async def start(self, host: str, port: int) -> None:
        self._runner = runner = web.AppRunner(
            self.app, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        assert runner.server is not None
        manager = runner.server
        loop = asyncio.get_running_loop()

        def connection() -> GuardedHandler:
            return GuardedHandler(
                manager,
                loop=loop,
                limits=self.limits,
                keepalive_timeout=self.settings.idle_timeout,
                access_log=None,
                lingering_time=1.0,
            )

        self._listener = await loop.create_server(
            connection, host or None, port, reuse_address=True
        )
        log.info(
            "http server listening on %s:%d (at most %d connections, %d streams%s)",
            host or "*",
            port,
            self.limits.max_connections,
            self.max_streams,
            ", token required" if self._token else "",
        )

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def require_token(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """With a shared secret configured, /stream and /handoff need it as
        `Authorization: Bearer <token>`."""
        if self._token is None or request.path not in PROTECTED_PATHS:
            return await handler(request)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "replace"), self._token
        ):
            log.warning(
                "refused %s %s from %s: no valid token",
                request.method,
                request.path,
                request.remote,
            )
            response = json_error(401, "this node requires a valid token (Authorization: Bearer)")
            response.headers["WWW-Authenticate"] = 'Bearer realm="litefs"'
            return response
        return await handler(request)

    # -- /info and /metrics -------------------------------------------------

    async def info(self, request: web.Request) -> web.Response:
        if request.query:
            return json_error(400, f"/info takes no parameters, got: {', '.join(request.query)}")
        store = self.store
        primary = store.primary
        databases = {
            db.name: {
                "txid": f"{db.position.txid:016x}",
                "checksum": f"{db.position.checksum:016x}",
                "page_size": db.page_size,
                "pages": db.page_count,
            }
            for db in store.databases()
            if db.position.txid
        }
        return web.json_response(
            {
                "node": self.hostname,
                "role": store.role.value,
                "primary": {"hostname": primary.hostname, "advertise-url": primary.advertise_url}
                if primary and not store.is_primary
                else None,
                "replicas": sorted(self.replicas.values()),
                "databases": databases,
                "proxy": self.proxy_url,
            }
        )

    async def render_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain")

    # -- import and export -----------------------------------------------------

    async def import_database(self, request: web.Request) -> web.Response:
        """Replace or create a database with the SQLite file in the body
        (primary only); the file is checked in full before anything changes."""
        name = request.query.get("name", "")
        if not name or set(request.query) - {"name"}:
            return json_error(400, "import takes one parameter: name=<database>")
        try:
            check_new_name(name)
        except InvalidName as exc:
            return json_error(400, str(exc))
        if not self.store.is_primary:
            return self._not_primary(f"cannot import {name}")
        loop = asyncio.get_running_loop()
        upload = self.store.scratch_path("upload")
        try:
            with open(upload, "wb") as out:
                while chunk := await request.content.read(UPLOAD_CHUNK):
                    await loop.run_in_executor(None, out.write, chunk)
            position = await loop.run_in_executor(None, self.store.import_database, name, upload)
        except sqlitefile.InvalidSQLiteFile as exc:
            return json_error(400, f"{name}: {exc}; nothing was changed")
        except NotPrimary:
            return self._not_primary(f"cannot import {name}")
        except DatabaseError as exc:
            return json_error(409, str(exc))
        except FileExistsError:
            return json_error(409, f"{name} was created while it was being imported; try again")
        finally:
            upload.unlink(missing_ok=True)
        return web.json_response(
            {"name": name, "txid": f"{position.txid:016x}", "checksum": f"{position.checksum:016x}"}
        )

    def _not_primary(self, what: str) -> web.Response:
        primary = self.store.primary
        if primary is None:
            return json_error(409, f"{what}: this node is not the primary", primary=None)
        return json_error(
            409,
            f"{what}: this node is a replica; the primary is {primary.hostname} "
            f"at {primary.advertise_url}",
            primary=primary.advertise_url,
        )

    async def export(self, request: web.Request) -> web.StreamResponse:
        """A consistent copy of a database, from any node."""
        name = request.query.get("name", "")
        if not name or set(request.query) - {"name"}:
            return json_error(400, "export takes one parameter: name=<database>")
        loop = asyncio.get_running_loop()
        try:
            path, position = await loop.run_in_executor(None, self.store.export_database, name)
        except (KeyError, InvalidName):
            return json_error(404, f"no database named {name!r}")
        try:
            response = web.StreamResponse(
                headers={
                    "Content-Type": "application/vnd.sqlite3",
                    "Content-Length": str(path.stat().st_size),
                    "LiteFS-Position": str(position),
                }
            )
            await response.prepare(request)
            with open(path, "rb") as f:
                while block := await loop.run_in_executor(None, f.read, UPLOAD_CHUNK):
                    await response.write(block)
            await response.write_eof()
        finally:
            path.unlink(missing_ok=True)
        return response

    # -- handoff --------------------------------------------------------------

    async def handoff(self, request: web.Request) -> web.Response:
        """Hand the primary role to a connected, caught-up replica."""
        target = request.query.get("to", "")
        if not target or set(request.query) - {"to"}:
            return json_error(400, "handoff takes one parameter: to=<replica name>")
        try:
            protocol.check_node_name(target, "to")
        except protocol.BadRequest as exc:
            return json_error(400, str(exc))
        if not self.store.is_primary:
            return json_error(409, "this node is not the primary")
        if self.on_handoff is None:
            return json_error(409, "this lease cannot be handed off")
        session = self.session_of(target)
        if session is None:
            names = ", ".join(sorted(self.replicas.values())) or "none"
            return json_error(404, f"no replica named {target!r} is connected (connected: {names})")
        if not session.candidate:
            return json_error(409, f"replica {target!r} is not a candidate for primary")
        try:
            await asyncio.wait_for(session.caught_up(), HANDOFF_CATCH_UP)
        except TimeoutError:
            return json_error(409, f"replica {target!r} did not catch up in {HANDOFF_CATCH_UP:g}s")
        if not self.store.is_primary:  # the lease was lost meanwhile
            return json_error(409, "this node is not the primary")
        await self.on_handoff(target)
        return web.json_response({"primary": target})

    def session_of(self, name: str) -> StreamSession | None:
        for key, replica in self.replicas.items():
            if replica == name and key in self.sessions:
                return self.sessions[key]
        return None

    def announce_handoff(self, target: str, lease: str) -> None:
        """Tell every replica which node is about to take over, and that
        node alone the lease it takes over."""
        self._lease_session = self.session_of(target)
        for session in list(self.sessions.values()):
            session.announce_handoff(target, lease if session is self._lease_session else None)

    def lease_handed_over(self) -> bool:
        """Whether the node taking over was sent the lease: then it is
        theirs, and must not be released."""
        session, self._lease_session = self._lease_session, None
        return session is not None and session.lease_sent

    async def drain(self, timeout: float) -> None:
        """Wait (a while) for every stream to end once this node stopped being
        the primary: each sends its replica what was committed, then END.

        Streams whose replica has taken no bytes for STALLED_AFTER are not
        waited for: holding the lease for them would let the replicas that
        did get everything wait too, and a lagging replica whose stream
        stalled (a partition) could then be the one to take the lease."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.sessions and loop.time() < deadline:
            if all(session.stalled(STALLED_AFTER) for session in self.sessions.values()):
                return
            await asyncio.sleep(0.005)

    # -- the stream ---------------------------------------------------------

    async def stream(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != "application/json":
            return json_error(415, "the stream request body must be application/json")
        try:
            body = await asyncio.wait_for(request.read(), self.settings.read_timeout)
        except TimeoutError:
            return json_error(
                408, f"the request body did not arrive in {self.settings.read_timeout:g}s"
            )
        try:
            replica, positions, candidate = protocol.decode_request(body)
        except protocol.BadRequest as exc:
            return json_error(400, str(exc))
        if not self.store.is_primary:
            primary = self.store.primary
            return json_error(
                503,
                "this node is not the primary",
                primary=primary.advertise_url if primary else None,
            )
        if len(self.sessions) >= self.max_streams:
            log.warning(
                "refusing a stream to %s: %d streams are open, the most allowed",
                replica or request.remote,
                len(self.sessions),
            )
            return json_error(503, f"too many streams (at most {self.max_streams})")
        response = web.StreamResponse(headers={"Content-Type": protocol.CONTENT_TYPE})
        await response.prepare(request)
        session = StreamSession(
            self.store,
            response,
            positions,
            self.metrics,
            self.settings.write_timeout,
            candidate=candidate,
        )
        key = id(session)
        self.replicas[key] = replica or str(request.remote)
        self.sessions[key] = session
        self.metrics.connected_replicas.set(len(self.replicas))
        log.info("replica %s connected", self.replicas[key])
        try:
            await session.run()
        except (ConnectionError, asyncio.CancelledError) as exc:
            log.info("replica %s disconnected: %s", self.replicas[key], exc or "cancelled")
            if isinstance(exc, asyncio.CancelledError):
                raise
        except StreamStalled as exc:
            log.warning("dropping replica %s: %s", self.replicas[key], exc)
            if request.transport is not None:
                request.transport.abort()
        except Exception as exc:
            # The status line is long gone: end the stream so the replica reconnects.
            log.error("stream to replica %s failed: %s", self.replicas[key], exc)
            with contextlib.suppress(ConnectionError):
                await response.write(protocol.frame(FrameType.END, str(exc).encode()[:1024]))
        finally:
            del self.replicas[key]
            del self.sessions[key]
            self.metrics.connected_replicas.set(len(self.replicas))
        return response


class StreamSession:
    """One replica's stream: catch it up, say ready, then follow commits."""

    def __init__(
        self,
        store: Store,
        response: web.StreamResponse,
        positions: dict[str, Position],
        metrics: Metrics,
        write_timeout: float,
        *,
        candidate: bool = True,
    ) -> None:
        self.store = store
        self.response = response
        self.write_timeout = write_timeout
        self._writing_since: float | None = None
        self.sent = dict(positions)
        self.metrics = metrics
        self._pending: set[str] = set(positions) | {db.name for db in store.databases()}
        self._wake = asyncio.Event()
        self._wake.set()
        self.candidate = candidate
        """Whether the replica may become primary, as it said."""
        self.handoff_target: str | None = None
        self._handoff_lease: str | None = None
        self.lease_sent = False
        self._loop = asyncio.get_running_loop()

    async def write(self, data: bytes) -> None:
        """Hand bytes to the connection, waiting while its buffer is full,
        but not longer than the write timeout."""
        self._writing_since = time.monotonic()
        try:
            await asyncio.wait_for(self.response.write(data), self.write_timeout)
        except TimeoutError:
            raise StreamStalled(f"it took no bytes for {self.write_timeout:g}s") from None
        self._writing_since = None

    def stalled(self, seconds: float) -> bool:
        """Whether a write to this replica has been waiting that long."""
        since = self._writing_since
        return since is not None and time.monotonic() - since >= seconds

    async def caught_up(self) -> None:
        """Return once the replica has every transaction this node has."""
        while any(
            self.sent.get(name) != position for name, position in self.store.positions().items()
        ):
            await asyncio.sleep(0.01)

    def _changed(self, name: str, change: Change) -> None:
        """Store listener: runs in whichever thread changed the database."""
        self._loop.call_soon_threadsafe(self._mark, name)

    def _mark(self, name: str) -> None:
        self._pending.add(name)
        self._wake.set()

    async def run(self) -> None:
        """Catch up, say READY, follow commits; when this node stops being
        the primary, send what it committed first, then HANDOFF (if it is
        handing off), then END."""
        self.store.add_listener(self._changed)
        try:
            ready = False
            while self.store.is_primary:
                try:
                    await asyncio.wait_for(self._wake.wait(), protocol.HEARTBEAT_INTERVAL)
                except TimeoutError:
                    if self.store.is_primary:
                        await self.write(protocol.clock_frame(FrameType.HEARTBEAT, time.time()))
                    continue
                self._wake.clear()
                await self._send_pending()
                if not ready:
                    await self.write(protocol.clock_frame(FrameType.READY, time.time()))
                    ready = True
            self._pending.update(db.name for db in self.store.databases())
            await self._send_pending()
            if self.handoff_target is not None:
                lease = self._handoff_lease
                await self.write(protocol.handoff_frame(self.handoff_target, lease))
                self.lease_sent = lease is not None
            await self.write(protocol.frame(FrameType.END, b"this node is no longer the primary"))
        finally:
            self.store.remove_listener(self._changed)

    async def _send_pending(self) -> None:
        names, self._pending = sorted(self._pending), set()
        for name in names:
            await self._send_database(name)

    def announce_handoff(self, target: str, lease: str | None) -> None:
        """Name the node taking over (and hand it the lease); sent after the
        last transaction, before END."""
        self.handoff_target = target
        self._handoff_lease = lease
        self._wake.set()

    async def _send_database(self, name: str) -> None:
        db = self.store.database(name)
        if db is None or db.position.txid == 0:
            if name in self.sent and db is None:
                await self.write(protocol.frame(FrameType.DROP, name.encode()))
                del self.sent[name]
            return
        have = self.sent.get(name, EMPTY_POSITION)
        if have == db.position:
            return
        files = db.files_after(have)
        try:
            for path in files or ():
                await self._send_file(name, path)
        except FileNotFoundError:
            files = None
        if files is None:
            await self._send_snapshot(name)

    async def _send_snapshot(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        path, position = await loop.run_in_executor(None, self.store.write_snapshot, name)
        try:
            log.info("sending %s a snapshot at %s", name, position)
            await self._send_file(name, path)
            self.metrics.snapshots.inc()
        finally:
            path.unlink(missing_ok=True)

    async def _send_file(self, name: str, path: Path) -> None:
        """Stream one LTX file; the replica's position afterwards comes from
        the file's own header (max TXID) and trailer (post-apply checksum)."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header = os.pread(f.fileno(), ltx.HEADER_SIZE, 0)
            trailer = os.pread(f.fileno(), ltx.TRAILER_SIZE, size - ltx.TRAILER_SIZE)
            head = protocol.frame(FrameType.LTX, name.encode())
            if size <= SEND_SLICE:
                await self.write(head + protocol.chunk(f.read()) + protocol.END_OF_FILE)
            else:
                await self.write(head)
                await self._send_chunks(f, size)
                await self.write(protocol.END_OF_FILE)
        max_txid = ltx.Header.unpack(header).max_txid
        self.sent[name] = Position(max_txid, int.from_bytes(trailer[:8], "big"))
        self.metrics.ltx_bytes.inc(size)

    async def _send_chunks(self, f: BinaryIO, size: int) -> None:
        """The file as protocol chunks of up to MAX_CHUNK bytes, each handed
        to the connection a slice at a time."""
        remaining = size
        while remaining:
            length = min(protocol.MAX_CHUNK, remaining)
            await self.write(protocol.chunk_header(length))
            left = length
            while left:
                block = f.read(min(SEND_SLICE, left))
                if not block:
                    raise OSError(f"{f.name} shrank while being sent")
                await self.write(block)
                left -= len(block)
            remaining -= length
