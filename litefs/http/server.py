"""The node's HTTP server: the replication stream, /info, /metrics, /import,
/export and /handoff.

It runs on asyncio in the daemon's second thread. The stream handler wakes on
store change notices (delivered with `call_soon_threadsafe`), never polls,
and does anything that blocks (snapshots) in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from litefs import ltx, sqlitefile
from litefs.db import EMPTY_POSITION, DatabaseError, Position
from litefs.http import protocol
from litefs.http.metrics import Metrics
from litefs.http.protocol import FrameType
from litefs.store import InvalidName, NotPrimary, Store, check_new_name

log = logging.getLogger("litefs.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SMALL_FILE = 1 << 20
UPLOAD_CHUNK = 1 << 20
HANDOFF_CATCH_UP = 5.0


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


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

    def __init__(self, store: Store, hostname: str, metrics: Metrics) -> None:
        self.store = store
        self.hostname = hostname
        self.metrics = metrics
        self.replicas: dict[int, str] = {}
        self.sessions: dict[int, StreamSession] = {}
        self.on_handoff: Callable[[str], Awaitable[None]] | None = None
        self.proxy_url: str | None = None
        """This node's write-forwarding proxy, advertised in /info."""
        self.app = web.Application(
            middlewares=[errors_as_json], client_max_size=protocol.MAX_REQUEST
        )
        self.app.router.add_post(protocol.STREAM_PATH, self.stream)
        self.app.router.add_get("/info", self.info)
        self.app.router.add_get("/metrics", self.render_metrics)
        self.app.router.add_get("/export", self.export)
        self._add_change("/handoff", self.handoff)
        self._add_change("/import", self.import_database)
        self._runner: web.AppRunner | None = None

    def _add_change(self, path: str, handler: Handler) -> None:
        """Every request that changes the cluster's state is routed here, so
        a check that applies to all of them has one place to go."""
        self.app.router.add_post(path, handler)

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host or None, port, reuse_address=True)
        await site.start()
        log.info("http server listening on %s:%d", host or "*", port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

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
        if not self.store.is_primary:
            return json_error(409, "this node is not the primary")
        if self.on_handoff is None:
            return json_error(409, "this lease cannot be handed off")
        session = self.session_of(target)
        if session is None:
            names = ", ".join(sorted(self.replicas.values())) or "none"
            return json_error(404, f"no replica named {target!r} is connected (connected: {names})")
        try:
            await asyncio.wait_for(session.caught_up(), HANDOFF_CATCH_UP)
        except TimeoutError:
            return json_error(409, f"replica {target!r} did not catch up in {HANDOFF_CATCH_UP:g}s")
        await self.on_handoff(target)
        return web.json_response({"primary": target})

    def session_of(self, name: str) -> StreamSession | None:
        for key, replica in self.replicas.items():
            if replica == name and key in self.sessions:
                return self.sessions[key]
        return None

    def announce_handoff(self, target: str) -> None:
        """Tell every replica which node is about to take over."""
        for session in list(self.sessions.values()):
            session.announce_handoff(target)

    async def drain(self, timeout: float) -> None:
        """Wait (a while) for every stream to end once this node stopped being
        the primary: each sends its replica what was committed, then END."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)

    # -- the stream ---------------------------------------------------------

    async def stream(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != "application/json":
            return json_error(415, "the stream request body must be application/json")
        try:
            replica, positions = protocol.decode_request(await request.read())
        except protocol.BadRequest as exc:
            return json_error(400, str(exc))
        if not self.store.is_primary:
            primary = self.store.primary
            return json_error(
                503,
                "this node is not the primary",
                primary=primary.advertise_url if primary else None,
            )
        response = web.StreamResponse(headers={"Content-Type": protocol.CONTENT_TYPE})
        await response.prepare(request)
        session = StreamSession(self.store, response, positions, self.metrics)
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
    ) -> None:
        self.store = store
        self.response = response
        self.sent = dict(positions)
        self.metrics = metrics
        self._pending: set[str] = set(positions) | {db.name for db in store.databases()}
        self._wake = asyncio.Event()
        self._wake.set()
        self.handoff_target: str | None = None
        self._loop = asyncio.get_running_loop()

    async def caught_up(self) -> None:
        """Return once the replica has every transaction this node has."""
        while any(
            self.sent.get(name) != position for name, position in self.store.positions().items()
        ):
            await asyncio.sleep(0.01)

    def _changed(self, name: str) -> None:
        """Store listener: runs in whichever thread committed."""
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
                        await self.response.write(protocol.frame(FrameType.HEARTBEAT))
                    continue
                self._wake.clear()
                await self._send_pending()
                if not ready:
                    await self.response.write(protocol.frame(FrameType.READY))
                    ready = True
            self._pending.update(db.name for db in self.store.databases())
            await self._send_pending()
            if self.handoff_target is not None:
                await self.response.write(
                    protocol.frame(FrameType.HANDOFF, self.handoff_target.encode())
                )
            await self.response.write(
                protocol.frame(FrameType.END, b"this node is no longer the primary")
            )
        finally:
            self.store.remove_listener(self._changed)

    async def _send_pending(self) -> None:
        names, self._pending = sorted(self._pending), set()
        for name in names:
            await self._send_database(name)

    def announce_handoff(self, target: str) -> None:
        """Name the node taking over; sent after the last transaction, before END."""
        self.handoff_target = target
        self._wake.set()

    async def _send_database(self, name: str) -> None:
        db = self.store.database(name)
        if db is None or db.position.txid == 0:
            if name in self.sent and db is None:
                await self.response.write(protocol.frame(FrameType.DROP, name.encode()))
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
            head = protocol.frame(FrameType.LTX, name.encode())
            if size <= SMALL_FILE:
                data = f.read()
                await self.response.write(head + protocol.chunk(data) + protocol.END_OF_FILE)
                header, trailer = data[: ltx.HEADER_SIZE], data[-ltx.TRAILER_SIZE :]
            else:
                await self.response.write(head)
                header = b""
                while block := f.read(protocol.MAX_CHUNK):
                    header = header or block[: ltx.HEADER_SIZE]
                    await self.response.write(protocol.chunk(block))
                await self.response.write(protocol.END_OF_FILE)
                f.seek(size - ltx.TRAILER_SIZE)
                trailer = f.read(ltx.TRAILER_SIZE)
        max_txid = ltx.Header.unpack(header).max_txid
        self.sent[name] = Position(max_txid, int.from_bytes(trailer[:8], "big"))
        self.metrics.ltx_bytes.inc(size)
