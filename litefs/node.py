"""A running node: the store, its role, the mount and the background services.

The FUSE loop runs on trio in the main thread. Anything a node does besides
serving the mount (retention now; the lease and HTTP in their own asyncio
thread) is started here and stopped here, in reverse order.
"""

from __future__ import annotations

import logging
import signal

import pyfuse3
import trio

from litefs.cli import CommandError
from litefs.config import Config, LeaseConfig
from litefs.db import DatabaseError
from litefs.fuse import FileSystem
from litefs.lease import Leaser
from litefs.lease.static import StaticLeaser
from litefs.mountpoint import is_mounted, unmount
from litefs.store import Role, Store

log = logging.getLogger("litefs")


def make_leaser(lease: LeaseConfig) -> Leaser:
    if lease.type == "static":
        return StaticLeaser(lease.hostname, lease.advertise_url or "", lease.candidate)
    raise CommandError(f"lease type {lease.type!r} is not available in this build")


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.data.dir, retention=config.data.retention)
        self.leaser = make_leaser(config.lease)
        self.fs: FileSystem | None = None

    def run(self) -> int:
        """Mount and serve until SIGINT or SIGTERM; returns the exit status."""
        try:
            self.store.open()
        except (DatabaseError, OSError) as exc:
            raise CommandError(
                f"cannot open data directory {self.config.data.dir}: {exc}"
            ) from None
        if self.config.lease.type == "static" and self.config.lease.candidate:
            self.store.set_role(Role.PRIMARY, None)
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
        log.info("mounted %s (data in %s)", mount_dir, self.config.data.dir)
        try:
            trio.run(self._serve)
        finally:
            self._unmount()
            self.store.close()
        log.info("stopped")
        return 0

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            nursery.start_soon(self._enforce_retention)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("received %s, stopping", signal.Signals(signum).name)
                pyfuse3.terminate()
                return

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
        pyfuse3.close(unmount=True)
        if is_mounted(self.config.fuse.dir):
            unmount(self.config.fuse.dir)
        log.info("unmounted %s", self.config.fuse.dir)
