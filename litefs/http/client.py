"""The replica's side of the stream: connect, receive, verify, apply, repeat.

Each LTX file is written to the scratch directory as it arrives (a snapshot
never sits in memory), then handed to the store, which verifies it in full
and applies it under SQLite's lock in a worker thread. Anything wrong with
the stream (a malformed frame, a truncated or corrupt file, a file that does
not follow our position, a primary that vanishes) ends this connection with
one log line; the next connection sends our real positions, and the primary
answers with whatever brings us back in line, a snapshot if need be.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import aiohttp

from litefs import ltx
from litefs.db import DatabaseError
from litefs.http import protocol
from litefs.http.metrics import Metrics
from litefs.http.protocol import FrameType
from litefs.store import Store

log = logging.getLogger("litefs.replica")

CONNECT_TIMEOUT = 5.0
MIN_BACKOFF = 0.05
MAX_BACKOFF = 5.0


class ReplicationError(Exception):
    """This connection to the primary cannot go on."""


class NotPrimary(ReplicationError):
    """The node the lease names says it is not the primary: it commits nothing."""


class HandoffToUs(Exception):
    """The primary is handing its role to this node."""


class StreamEnded(Exception):
    """The primary said END: it has sent all it committed and is primary no more."""


class Lag:
    """How far this replica trails its primary.

    Measured against the primary's wall clock, which READY, HEARTBEAT and
    every LTX header carry, rather than against when frames arrive: frames
    that waited in a socket buffer while this process was stopped, or while
    it applied more slowly than the primary committed, arrive late but say
    how old they are. Clocks are assumed to agree to well under a second.
    """

    def __init__(self) -> None:
        self.current_at = -math.inf
        """The primary's time at which this replica last held all it had."""
        self.gone_at: float | None = None
        """When the primary closed the stream or refused a connection: from
        then on it was committing nothing this replica could hear of."""

    def heard(self, primary_time: float) -> None:
        self.current_at = max(self.current_at, primary_time)

    def primary_gone(self, now: float) -> None:
        if self.gone_at is None:
            self.gone_at = now

    def connected(self) -> None:
        self.gone_at = None

    def behind(self, now: float) -> float:
        """Seconds of the primary's commits this replica may be missing now."""
        return max(0.0, now - self.current_at - protocol.HEARTBEAT_INTERVAL)

    def behind_at_loss(self, now: float) -> float:
        """Seconds of commits this replica may have missed from a primary
        that has just lost its lease. When the primary was seen to go away,
        it committed nothing after; otherwise (a timeout, a partition) it may
        have committed until now."""
        return self.behind(self.gone_at if self.gone_at is not None else now)


class ReplicaClient:
    def __init__(
        self,
        store: Store,
        hostname: str,
        metrics: Metrics,
        on_handoff: Callable[[str, str | None], None] | None = None,
        *,
        auth_token: str | None = None,
        lag: Lag | None = None,
        candidate: bool = True,
    ) -> None:
        self.store = store
        self.candidate = candidate
        self.lag = lag if lag is not None else Lag()
        self.headers = {"Content-Type": "application/json"}
        if auth_token:
            self.headers["Authorization"] = f"Bearer {auth_token}"
        self.hostname = hostname
        self.metrics = metrics
        self.on_handoff = on_handoff
        self.ready = asyncio.Event()
        self._applying: asyncio.Future[object] | None = None
        self.connected = False
        self.served = False
        """The primary accepted a stream from this client at least once."""
        self.was_ready = False
        """The primary said READY on one of this client's streams."""
        self.last_frame = 0.0
        """Monotonic time the last frame arrived (or a file finished applying)."""

    def behind_at_loss(self, now: float) -> float:
        """Seconds of commits this replica may have missed from its primary,
        which has just lost its lease. A replica the primary was still
        catching up missed some, however recent its clock says it is."""
        if self.served and not self.was_ready:
            return math.inf
        return self.lag.behind_at_loss(now)

    @property
    def applying(self) -> bool:
        return self._applying is not None and not self._applying.done()

    async def drain(self) -> None:
        """Wait for a file being applied in a worker thread, even after this
        client was cancelled: nothing may write the database once it returns."""
        if self._applying is not None:
            await asyncio.gather(self._applying, return_exceptions=True)

    async def follow(self, url: str) -> None:
        """Stream from the primary at `url`, reconnecting with backoff, until
        it says END (it is primary no more) or hands its role to this node
        (`HandoffToUs`)."""
        backoff = MIN_BACKOFF
        timeout = aiohttp.ClientTimeout(
            total=None, connect=CONNECT_TIMEOUT, sock_read=protocol.READ_TIMEOUT
        )
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                started = time.monotonic()
                gone = True
                try:
                    await self._stream(session, url)
                    reason = "the primary closed the stream"
                except StreamEnded:
                    return
                except (asyncio.IncompleteReadError, aiohttp.ClientPayloadError):
                    reason = f"the stream from {url} ended in the middle of a frame"
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    reason = f"connection to {url} failed: {_describe(exc)}"
                    gone = _refused_or_closed(exc)
                except (protocol.ProtocolError, ReplicationError) as exc:
                    reason = str(exc)
                    gone = isinstance(exc, NotPrimary)
                self.ready.clear()
                if gone:
                    self.lag.primary_gone(time.time())
                if time.monotonic() - started > 10 * MAX_BACKOFF:
                    backoff = MIN_BACKOFF
                log.warning("replication interrupted: %s; reconnecting in %.2fs", reason, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _stream(self, session: aiohttp.ClientSession, url: str) -> None:
        body = protocol.encode_request(self.hostname, self.store.positions(), self.candidate)
        async with session.post(
            url + protocol.STREAM_PATH,
            data=body,
            headers=self.headers,
        ) as response:
            if response.status != 200:
                text = await response.text()
                problem = f"primary at {url} answered {response.status}: {text[:200]}"
                if response.status == 503 and _names_a_primary(text):
                    raise NotPrimary(problem)
                raise ReplicationError(problem)
            if response.content_type != protocol.CONTENT_TYPE:
                raise ReplicationError(f"{url} answered with {response.content_type}, not a stream")
            log.info("connected to primary at %s", url)
            reader = response.content
            self.connected = True
            self.served = True
            self.lag.connected()
            try:
                await self._read_frames(reader, url)
            finally:
                self.connected = False

    async def _read_frames(self, reader: aiohttp.StreamReader, url: str) -> None:
        while True:
            frame = await protocol.read_frame(reader)
            self.last_frame = time.monotonic()
            if frame.type is FrameType.LTX:
                self.store.replica_heard(current=False)
                await self._receive(reader, protocol.database_name(frame))
            elif frame.type is FrameType.READY:
                if not self.ready.is_set():
                    log.info("caught up with primary at %s", url)
                self.ready.set()
                self.was_ready = True
                self._heard(frame)
            elif frame.type is FrameType.HEARTBEAT:
                if self.ready.is_set():
                    self._heard(frame)
            elif frame.type is FrameType.DROP:
                name = protocol.database_name(frame)
                await asyncio.get_running_loop().run_in_executor(
                    None, self.store.drop_database, name
                )
            elif frame.type is FrameType.HANDOFF:
                target, lease = protocol.handoff_target(frame)
                log.info("primary at %s is handing off to %s", url, target)
                if self.on_handoff is not None:
                    self.on_handoff(target, lease)
                if target == self.hostname:
                    raise HandoffToUs(target)
            elif frame.type is FrameType.END:
                log.info("primary ended the stream: %s", frame.text)
                self.lag.heard(time.time())  # it sent all it committed
                raise StreamEnded(frame.text)
            self.store.replica_heard(current=self.ready.is_set())

    def _heard(self, frame: protocol.Frame) -> None:
        """The primary had nothing more to send at the time the frame says."""
        clock = protocol.frame_clock(frame)
        self.lag.heard(clock if clock is not None else time.time())

    async def _receive_file(self, reader: protocol.Reader, path: Path) -> tuple[int, ltx.Header]:
        try:
            with open(path, "wb") as out:
                first, size = await self._store_chunks(reader, out)
        except ConnectionError:
            raise
        except OSError as exc:  # a full disk: the next connection tries again
            raise ReplicationError(
                f"cannot store an incoming LTX file: {exc.strerror or exc}"
            ) from None
        try:
            header = ltx.Header.unpack(first)
        except ltx.LTXError as exc:
            raise ReplicationError(f"received LTX file has a bad header: {exc}") from None
        return size, header

    async def _store_chunks(self, reader: protocol.Reader, out: BinaryIO) -> tuple[bytes, int]:
        size = 0
        first = b""
        while chunk := await protocol.read_chunk(reader):
            self.last_frame = time.monotonic()
            if len(first) < ltx.HEADER_SIZE:
                first += chunk[: ltx.HEADER_SIZE - len(first)]
            out.write(chunk)
            size += len(chunk)
        out.flush()
        return first, size

    async def _receive(self, reader: protocol.Reader, name: str) -> None:
        path = self.store.incoming_path(name)
        try:
            size, header = await self._receive_file(reader, path)
            try:
                self._applying = asyncio.get_running_loop().run_in_executor(
                    None, self.store.apply_ltx, name, path
                )
                await asyncio.shield(self._applying)
                self.last_frame = time.monotonic()
            except ltx.LTXError as exc:
                raise ReplicationError(f"rejected LTX file for {name}: {exc}") from None
            except DatabaseError as exc:
                raise ReplicationError(str(exc)) from None
            except OSError as exc:
                raise ReplicationError(
                    f"cannot apply the LTX file for {name}: {exc.strerror or exc}"
                ) from None
        finally:
            path.unlink(missing_ok=True)
        if self.ready.is_set():
            self.lag.heard(header.timestamp / 1000)
        self.metrics.ltx_bytes.inc(size)
        if header.is_snapshot:
            self.metrics.snapshots.inc()
        self.metrics.applied(name, header.timestamp)


def _names_a_primary(text: str) -> bool:
    """Whether an error answer is the protocol's "not the primary", which
    carries a `primary` field (the URL it knows of, or null)."""
    try:
        body = json.loads(text)
    except ValueError:
        return False
    return isinstance(body, dict) and "primary" in body


def _refused_or_closed(exc: BaseException) -> bool:
    """Whether the primary's host answered that nothing listens or the
    connection is over, rather than not answering at all."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    if isinstance(exc, aiohttp.ClientConnectorError):
        exc = exc.os_error
    return isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
