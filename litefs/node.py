"""A running node: the store, its role, the mount and the background services.

The FUSE loop runs on trio in the main thread. The HTTP server, the lease
and the replica's stream run on asyncio in one second thread. The store is
where they meet. Start-up binds the HTTP port before mounting (so a busy
port leaves nothing mounted), and shutdown gives the lease up before the
mount goes away, so another node can take over at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine

import pyfuse3
import trio

from litefs import watchdog
from litefs.application import Application
from litefs.capture import CrashPoints
from litefs.cli import CommandError
from litefs.config import Config, LeaseConfig
from litefs.db import DatabaseError
from litefs.fuse import FileSystem
from litefs.http.client import HandoffToUs, Lag, ReplicaClient
from litefs.http.limits import raise_descriptor_limit
from litefs.http.metrics import Metrics
from litefs.http.server import Server
from litefs.lease import (
    Lease,
    LeaseError,
    LeaseLost,
    Leaser,
    PrimaryExists,
    PrimaryInfo,
    Standing,
)
from litefs.lease.static import StaticLeaser
from litefs.mountpoint import fuse_connection, is_mounted, unmount
from litefs.proxy import Proxy
from litefs.store import Change, NullObserver, Role, Store

log = logging.getLogger("litefs")

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
HANDOVER_DRAIN = 10.0
"""Seconds a primary that steps down waits for its streams to deliver what it
committed before it releases the lease, and a replica waits for them."""
DRAIN_IDLE = 0.3
"""Seconds of silence after which a stream whose primary lost the lease is
taken to have nothing more to send."""
END_TO_RELEASE = 1.0
"""Seconds a replica that received END waits for the lease to change hands."""
HANDOFF_GRACE = 5.0
"""Seconds a node that is not a handoff's target leaves the lease to it."""
RENEW_MARGIN = 1.0
"""Seconds before the lease's deadline at which a primary that could not
renew stops accepting writes."""
LAG_MARGIN = 1.0
"""Seconds beyond twice the lease's TTL a replica may have trailed its lost
primary and still compete for the lease at once. Twice: Consul may take up to
twice the TTL to end a session, and etcd was seen to take 1.85 times it
behind a frozen primary, all the while the replicas hear nothing."""
CAUGHT_UP_HEADSTART = 3.0
"""Seconds a replica that trailed its lost primary leaves the lease to the
others (after any lock-delay): one of them may hold what it missed."""
STANDING_GATHER = 0.2
"""Seconds a candidate that has just stated its standing waits for the
others' before comparing: they noticed the lease free at about the same time."""


def make_leaser(lease: LeaseConfig) -> Leaser:
    advertise_url = lease.advertise_url or ""
    if lease.type == "consul" and lease.consul is not None:
        from litefs.lease.consul import ConsulLeaser

        consul = lease.consul
        return ConsulLeaser(
            consul.url,
            consul.key,
            consul.ttl,
            consul.lock_delay,
            lease.hostname,
            advertise_url,
            lease.candidate,
        )
    if lease.type == "etcd" and lease.etcd is not None:
        from litefs.lease.etcd import EtcdLeaser

        etcd = lease.etcd
        return EtcdLeaser(
            etcd.endpoints, etcd.key, etcd.ttl, lease.hostname, advertise_url, lease.candidate
        )
    return StaticLeaser(lease.hostname, advertise_url, lease.candidate)


def node_name(config: Config) -> str:
    """How this node names itself to others. A static lease's hostname is the
    primary's, so a static replica goes by its machine and HTTP port."""
    lease = config.lease
    if lease.type == "static" and not lease.candidate:
        return f"{socket.gethostname()}:{config.http.port}"
    return lease.hostname


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(
            config.data.dir,
            retention=config.data.retention,
            mount_dir=config.fuse.dir,
            crash=CrashPoints.from_environment(),
        )
        self.leaser = make_leaser(config.lease)
        self.metrics = Metrics(self.store)
        self.store.add_listener(self._count_commit)
        self.fs: FileSystem | None = None
        self.name = node_name(config)
        self.ready = threading.Event()
        """Set once the node is the primary, or a replica caught up with its
        primary: the application may start."""
        self.application = (
            Application(
                config.exec,
                self.environment,
                lambda: self.store.is_primary,
                config.lease.candidate,
            )
            if config.exec
            else None
        )
        self.exit_status = 0
        self._stopping = False
        self._watchdog: subprocess.Popen[bytes] | None = None
        self.descriptors = raise_descriptor_limit()
        self._services = Services(self)

    def _count_commit(self, name: str, change: Change) -> None:
        if change is Change.COMMITTED:
            self.metrics.transactions.labels(name).inc()

    def run(self) -> int:
        """Mount and serve until SIGINT or SIGTERM; returns the exit status."""
        try:
            self.store.open()
        except (DatabaseError, OSError) as exc:
            raise CommandError(
                f"cannot open data directory {self.config.data.dir}: {exc}"
            ) from None
        self._initial_role()
        self._services.start()
        try:
            self._mount_and_serve()
        finally:
            self._services.stop()
            self.store.close()
        log.info("stopped, unmounted %s", self.config.fuse.dir)
        return self.exit_status

    def environment(self) -> dict[str, str]:
        """What the application is told about where it stands, when it starts."""
        store = self.store
        primary = store.primary
        if store.is_primary or primary is None:
            name, url = self.name, self.config.lease.advertise_url or ""
        else:
            name, url = primary.hostname, primary.advertise_url
        return {
            "LITEFS_NODE": self.name,
            "LITEFS_ROLE": store.role.value,
            "LITEFS_PRIMARY": name,
            "LITEFS_PRIMARY_URL": url,
            "LITEFS_MOUNT_DIR": str(self.config.fuse.dir),
        }

    def _initial_role(self) -> None:
        """A static lease is known before mounting: the mount starts in the right mode."""
        lease = self.config.lease
        if lease.type != "static":
            self.store.set_role(Role.REPLICA, None)
            return
        if lease.candidate:
            self.store.set_role(Role.PRIMARY, None)
        else:
            info = PrimaryInfo(lease.hostname, lease.advertise_url or "")
            self.store.set_role(Role.REPLICA, info)

    def _mount_and_serve(self) -> None:
        self.fs = FileSystem(self.store)
        mount_dir = self.config.fuse.dir
        options = set(pyfuse3.default_options)
        options.update({"fsname=litefs", "subtype=litefs"})
        if self.config.fuse.allow_other:
            options.add("allow_other")
        if self.config.fuse.debug:
            options.add("debug")
        try:
            pyfuse3.init(self.fs, str(mount_dir), options)
        except RuntimeError as exc:
            raise CommandError(f"cannot mount {mount_dir}: {exc}") from None
        self.store.observer = self.fs
        log.info("mounted %s (data in %s)", mount_dir, self.config.data.dir)
        self._services.mounted.set()
        try:
            trio.run(self._serve)
        finally:
            self._services.stop()
            if self._watchdog is not None:
                watchdog.stop(self._watchdog)
            self._unmount()
            self.store.release_locks()  # the mount is gone: closing cannot wait on it

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._start_watchdog)
            nursery.start_soon(self._watch_signals)
            nursery.start_soon(self._enforce_retention)
            if self.application is not None:
                nursery.start_soon(self._run_application, self.application)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    async def _start_watchdog(self) -> None:
        """Once the mount answers, and off its loop: finding the connection
        looks at the mount, and the child closes the descriptors it
        inherits, some of them perhaps in the mount."""
        self._watchdog = await trio.to_thread.run_sync(self._spawn_watchdog)

    def _spawn_watchdog(self) -> subprocess.Popen[bytes] | None:
        connection = fuse_connection(self.config.fuse.dir)
        return watchdog.start(connection, self.config.fuse.dir) if connection is not None else None

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                application = self.application
                if application is not None and application.running:
                    application.pass_signal(signum)
                    continue  # the node stops once the application has exited
                log.info("received %s, stopping", signal.Signals(signum).name)
                if application is not None:
                    application.stopping = True
                await self._stop()
                return

    async def _run_application(self, application: Application) -> None:
        """Run the commands once the node is ready; the node stops with them."""
        self.exit_status = await application.run(self._wait_ready)
        await self._stop()

    async def _wait_ready(self) -> None:
        if not self.ready.is_set():
            log.info("waiting to be the primary or caught up with it before starting commands")
        await trio.to_thread.run_sync(self.ready.wait, abandon_on_cancel=True)

    async def _stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        await trio.to_thread.run_sync(self._stop_services)
        pyfuse3.terminate()

    def _stop_services(self) -> None:
        """Give the lease up and stop replicating while the mount still serves:
        both may be waiting on a request to it, and closing a descriptor
        opened through it needs an answer from it."""
        self._services.stop()
        self.store.release_locks()

    async def _enforce_retention(self) -> None:
        interval = self.config.data.retention_monitor_interval
        while True:
            await trio.sleep(interval)
            removed = await trio.to_thread.run_sync(self.store.enforce_retention)
            if removed:
                log.debug("retention removed %d LTX files", removed)

    def _unmount(self) -> None:
        assert self.fs is not None
        still_open = self.fs.open_handles()
        if still_open:
            pids = sorted({pid for _, pid in still_open})
            log.warning(
                "applications still hold %d files open (pids %s); unmounting lazily: "
                "their next file operation fails",
                len(still_open),
                ", ".join(map(str, pids)),
            )
        self.store.observer = NullObserver()
        pyfuse3.close(unmount=True)
        if is_mounted(self.config.fuse.dir):
            unmount(self.config.fuse.dir)
        log.debug("unmounted %s", self.config.fuse.dir)


class Services:
    """The asyncio thread: HTTP server, lease, and replication stream."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.mounted = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._server: Server | None = None
        self._resign: asyncio.Event | None = None
        self._handoff_target: str | None = None
        self._handoff_until = 0.0
        self._handoff_lease: str | None = None
        """The lease a primary handing its role to this node sent it."""
        self._lease: Lease | None = None
        self.lag = Lag()
        self._defer_until = 0.0
        self._behind_at_loss = 0.0
        self._stated: Standing | None = None
        self._deferred_to: dict[str, float] = {}
        """Candidates this node left the lease to, and the time of the
        statement it did so on: a candidate that said nothing since and did
        not take the lease is dead or stuck, and is not waited for again."""

    def start(self) -> None:
        """Start the thread and wait until the HTTP port is bound (or failed)."""
        self._thread = threading.Thread(target=self._run, name="litefs-services", daemon=True)
        self._thread.start()
        if not self._started.wait(STARTUP_TIMEOUT):
            raise CommandError("the HTTP server did not start in time")
        if self._error is not None:
            raise CommandError(str(self._error))

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.mounted.set()
        self._thread.join(STOP_TIMEOUT)
        self._thread = None

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        node = self.node
        config = node.config
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._resign = asyncio.Event()
        server = self._server = Server(
            node.store, node.name, node.metrics, config.http, node.descriptors
        )
        if not isinstance(node.leaser, StaticLeaser):
            server.on_handoff = self.handoff
        try:
            await server.start(config.http.host, config.http.port)
        except OSError as exc:
            self._error = OSError(f"cannot listen on {config.http.addr}: {exc.strerror}")
            self._started.set()
            return
        proxy = await self._start_proxy(server)
        self._started.set()
        if self._error is not None:
            await server.stop()
            return
        roles = asyncio.create_task(self._after_mount(self._roles()))
        try:
            await self._stop.wait()
        finally:
            roles.cancel()
            await asyncio.gather(roles, return_exceptions=True)
            if proxy is not None:
                await proxy.stop()
            await server.stop()
            await node.leaser.close()

    async def _start_proxy(self, server: Server) -> Proxy | None:
        """Start the proxy in front of the application, when one is configured."""
        config = self.node.config.proxy
        if config is None:
            return None
        proxy = Proxy(
            config,
            self.node.store,
            self.node.name,
            self.replication_lag,
            auth_token=self.node.config.http.auth_token,
        )
        try:
            await proxy.start()
        except OSError as exc:
            self._error = OSError(f"cannot listen on {config.listen.addr}: {exc.strerror}")
            return None
        server.proxy_url = config.advertise_url
        return proxy

    def replication_lag(self) -> float:
        """Seconds since this replica last had all the primary had: 0 while
        its stream is caught up and alive, infinite before it ever was."""
        return self.lag.behind(time.time())

    async def _after_mount(self, work: Coroutine[None, None, None]) -> None:
        """Roles need the mount: a replica takes SQLite's locks through it."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.mounted.wait)
        except BaseException:
            work.close()
            raise
        await work

    async def _roles(self) -> None:
        """Become primary when the lease allows, follow the primary otherwise."""
        node = self.node
        leaser = node.leaser
        backoff = 0.1
        idle = 0.05
        while True:
            info: PrimaryInfo | None = None
            if leaser.candidate:
                await self._respect_handoff()
                await self._defer_to_caught_up_candidates()
                await self._defer_to_fresher_candidates()
                try:
                    lease = await self._acquire()
                except PrimaryExists as exc:
                    info = exc.info
                except LeaseError as exc:
                    log.warning("cannot reach the lease: %s; retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                else:
                    backoff = 0.1
                    await self._lead(lease)
                    continue
            else:
                try:
                    info = await leaser.primary_info()
                except LeaseError as exc:
                    log.warning("cannot reach the lease: %s; retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
            if info is None:
                # Nobody holds the lease, or it is in its lock-delay: try again soon.
                await asyncio.sleep(idle)
                idle = min(idle * 2, 1.0)
                continue
            idle = 0.05
            await self._follow(info)

    # -- handoff ------------------------------------------------------------

    async def handoff(self, target: str) -> None:
        """Hand the primary role to `target`, a caught-up replica.

        Writes stop here, every replica hears who takes over (so the others
        do not compete for the lease), and the target is sent the lease
        itself, which it takes over without the key ever being free: a node
        that did not hear of the handoff (one starting) cannot take it.
        """
        log.info("handing the primary role off to %s", target)
        self._note_handoff(target)
        self.node.store.set_role(Role.REPLICA, None)
        assert self._server is not None and self._resign is not None
        assert self._lease is not None
        self._server.announce_handoff(target, self._lease.handle)
        self._resign.set()

    def _note_handoff(self, target: str, lease: str | None = None) -> None:
        self._handoff_target = target
        self._handoff_until = time.monotonic() + HANDOFF_GRACE
        self._handoff_lease = lease if target == self.node.name else None

    async def _respect_handoff(self) -> None:
        """During a handoff to another node, let it take the lease first."""
        target = self._handoff_target
        if target == self.node.name:
            return
        await self._leave_lease(self._handoff_until, lambda current: current.hostname == target)

    async def _defer_to_caught_up_candidates(self) -> None:
        """After trailing a primary that lost its lease, let the others try
        first: a node that is caught up holds transactions this one never
        received, which would be lost if this one won."""
        until, self._defer_until = self._defer_until, 0.0
        if time.monotonic() >= until:
            return
        behind = self._behind_at_loss
        log.info(
            "%s the lost primary; leaving the lease to caught-up nodes for %.1fs",
            "never caught up with" if math.isinf(behind) else f"trailed by {behind:.1f}s",
            until - time.monotonic(),
        )
        await self._leave_lease(until, lambda current: True)

    async def _defer_to_fresher_candidates(self) -> None:
        """Leave the lease to a candidate whose state is more recent than
        this node's: it holds commits of the lost primary this one lacks."""
        name = self.node.name
        if self._handoff_target == name:
            return  # the old primary chose this node; it waits for us
        mine = self.lag.current_at
        stated = self._stated
        if (
            stated is None
            or stated.current_at != mine
            or time.time() - stated.said_at > self._standing_lifetime / 2
        ):
            stated = await self._state_standing()
            if stated is None:
                return
        await asyncio.sleep(max(0.0, stated.said_at + STANDING_GATHER - time.time()))
        try:
            standings = await self.node.leaser.standings()
        except LeaseError:
            return
        fresher = [other for other in standings if self._worth_waiting_for(other, mine)]
        if not fresher:
            return
        best = max(fresher, key=lambda other: other.current_at)
        self._deferred_to[best.hostname] = best.said_at
        log.info(
            "%s holds %s of the lost primary's commits than this node; leaving the lease to it "
            "for %.1fs",
            best.hostname,
            "more" if math.isinf(mine) else f"{(best.current_at - mine) * 1000:.0f} ms more",
            CAUGHT_UP_HEADSTART,
        )
        await self._leave_lease(time.monotonic() + CAUGHT_UP_HEADSTART, lambda current: True)

    def _worth_waiting_for(self, other: Standing, mine: float) -> bool:
        """Another candidate with more recent state, that spoke in this
        election (a lease can take twice its TTL to run out, and a Consul
        lock-delay is spent re-stating) and was not already waited for in
        vain."""
        return (
            other.hostname != self.node.name
            and other.current_at > mine
            and time.time() - other.said_at <= self._standing_lifetime
            and other.said_at > self._deferred_to.get(other.hostname, -math.inf)
        )

    @property
    def _standing_lifetime(self) -> float:
        return 2 * self.node.leaser.ttl + LAG_MARGIN

    async def _state_standing(self) -> Standing | None:
        """Publish how recent this node's state is; None when the backend
        holds no elections or cannot be reached (then nobody compares)."""
        standing = Standing(self.node.name, self.lag.current_at, time.time())
        try:
            kept = await self.node.leaser.publish_standing(standing)
        except LeaseError as exc:
            log.debug("could not publish this node's standing: %s", exc)
            return None
        if not kept:
            return None
        self._stated = standing
        return standing

    async def _leave_lease(self, until: float, taken: Callable[[PrimaryInfo], bool]) -> None:
        """Wait until `until` or until the lease is held as `taken` says."""
        leaser = self.node.leaser
        while time.monotonic() < until:
            try:
                current = await leaser.primary_info()
            except LeaseError:
                current = None
            if current is not None and taken(current):
                return
            await asyncio.sleep(0.05)

    async def _acquire(self) -> Lease:
        """Acquire the lease; the target of a handoff takes over the one it
        was sent, or else keeps trying briefly, as the old primary releases
        the lease a moment after announcing when it could not send it."""
        leaser = self.node.leaser
        handed, self._handoff_lease = self._handoff_lease, None
        if handed is not None and self._handoff_target == self.node.name:
            try:
                return await leaser.adopt(handed)
            except LeaseError as exc:
                log.warning("could not take over the lease handed to this node: %s", exc)
        while True:
            try:
                return await leaser.acquire()
            except PrimaryExists:
                targeted = self._handoff_target == self.node.name
                if not targeted or time.monotonic() >= self._handoff_until:
                    raise
                await asyncio.sleep(0.02)

    async def _lead(self, lease: Lease) -> None:
        """Be the primary while the lease lasts.

        Commits stop a margin before the lease's deadline unless a renewal
        has succeeded by then, however long the backend takes to answer and
        even if this loop runs late (the store checks the deadline on every
        commit): after the deadline another node may hold the lease. On the
        way out the replicas are sent everything committed before the lease
        is released, so none of it is lost to the next primary.
        """
        node = self.node
        store = node.store
        margin = min(RENEW_MARGIN, lease.ttl / 4)
        assert self._resign is not None
        self._resign.clear()
        self._handoff_target = None
        self._handoff_until = 0.0
        self._lease = lease
        store.set_role(Role.PRIMARY, None)
        store.commit_deadline = lease.deadline - margin
        log.info("acquired the lease; this node is the primary")
        node.ready.set()
        try:
            wait = lease.renew_interval
            while True:
                stop_at = lease.deadline - margin
                try:
                    await asyncio.wait_for(
                        self._resign.wait(), max(0.0, min(wait, stop_at - time.monotonic()))
                    )
                    return
                except TimeoutError:
                    pass
                remaining = lease.deadline - margin - time.monotonic()
                if remaining <= 0:
                    log.error("the lease could not be renewed in time; stepping down")
                    return
                try:
                    await asyncio.wait_for(lease.renew(), remaining)
                except LeaseLost as exc:
                    log.error("lost the lease: %s; stepping down", exc)
                    return
                except (LeaseError, TimeoutError) as exc:
                    log.warning("lease renewal failed: %s; retrying", str(exc) or "timed out")
                    wait = min(lease.renew_interval, 0.5)
                    continue
                store.commit_deadline = lease.deadline - margin
                wait = lease.renew_interval
        finally:
            store.set_role(Role.REPLICA, None)
            self.lag.heard(time.time())  # all there was, this node committed
            self._lease = None
            if self._server is not None:
                await self._server.drain(HANDOVER_DRAIN)
            if self._server is not None and self._server.lease_handed_over():
                log.info("the lease went to %s with the primary role", self._handoff_target)
            else:
                await lease.release()

    async def _follow(self, info: PrimaryInfo) -> None:
        """Replicate from `info` until the lease names another primary, or
        until that primary hands its role to this node."""
        node = self.node
        node.store.set_role(Role.REPLICA, info)
        client = ReplicaClient(
            node.store,
            node.name,
            node.metrics,
            self._note_handoff,
            auth_token=node.config.http.auth_token,
            lag=self.lag,
            candidate=node.leaser.candidate,
        )
        stream = asyncio.create_task(client.follow(info.advertise_url))
        change = asyncio.create_task(self._primary_change(info))
        caught_up = asyncio.create_task(self._caught_up(client))
        try:
            await asyncio.wait({stream, change}, return_when=asyncio.FIRST_COMPLETED)
            if change.done() and node.leaser.candidate:
                await self._state_standing()  # before draining: the others compare soon
            if not stream.done():
                await self._drain_stream(client, stream)
            elif not change.done() and not _handed_to_us(stream):
                # END came first: the old primary releases the lease a moment
                # later; competing before that would only find it still held.
                await asyncio.wait({change}, timeout=END_TO_RELEASE)
            if change.done() and not _ended(stream) and info.hostname != node.name:
                self._note_lag_at_loss(client)
        finally:
            for task in (stream, change, caught_up):
                task.cancel()
            await asyncio.gather(stream, change, caught_up, return_exceptions=True)
            await client.drain()

    def _note_lag_at_loss(self, client: ReplicaClient) -> None:
        """The lease moved without the primary saying END. A replica that
        had heard nothing from it for longer than a lease can take to run out,
        or that it was still catching up, may have missed commits: it will
        compete only after the others."""
        behind = client.behind_at_loss(time.time())
        leaser = self.node.leaser
        if behind > 2 * leaser.ttl + LAG_MARGIN:
            self._behind_at_loss = behind
            self._defer_until = time.monotonic() + leaser.acquire_delay + CAUGHT_UP_HEADSTART

    async def _caught_up(self, client: ReplicaClient) -> None:
        await client.ready.wait()
        self.node.ready.set()

    async def _drain_stream(self, client: ReplicaClient, stream: asyncio.Task[None]) -> None:
        """The lease moved. A primary that stepped down cleanly has already
        sent its last transactions and END: take them before competing. A
        dead one sends nothing more, and is not waited for."""
        deadline = time.monotonic() + HANDOVER_DRAIN
        while not stream.done() and client.connected and time.monotonic() < deadline:
            if not client.applying and time.monotonic() - client.last_frame > DRAIN_IDLE:
                return
            await asyncio.wait({stream}, timeout=0.01)

    async def _primary_change(self, info: PrimaryInfo) -> None:
        async for current in self.node.leaser.watch():
            if current != info:
                return
        await asyncio.Event().wait()  # a static lease never changes


def _handed_to_us(stream: asyncio.Task[None]) -> bool:
    return not stream.cancelled() and isinstance(stream.exception(), HandoffToUs)


def _ended(stream: asyncio.Task[None]) -> bool:
    """Whether the stream finished as it should: END, or a handoff to us.
    Either way the primary sent all it committed."""
    return (
        stream.done()
        and not stream.cancelled()
        and (stream.exception() is None or _handed_to_us(stream))
    )
