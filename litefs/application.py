"""The application a node runs once it is ready (`exec` or `mount -- CMD`).

Commands start only when the node is ready, so the application never sees
a database older than the primary's: the node is the primary, or a replica
that has caught up with the primary it found. Every command but the last
runs to completion in order (migrations); the last is the application, and
the node lives as long as it does. A command marked `if-candidate` runs only
on a node that is the primary once ready; anywhere else it is skipped.

Each command runs in its own process group, so a terminal's Ctrl-C reaches
it once, through the node: the node passes SIGINT and SIGTERM on, waits for
the command to exit, and only then gives up the lease and unmounts.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence

import trio

from litefs.config import ExecCommand

log = logging.getLogger("litefs.exec")

EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


class Application:
    """Runs the configured commands on the mount's event loop (trio)."""

    def __init__(
        self,
        commands: Sequence[ExecCommand],
        environment: Callable[[], Mapping[str, str]],
        is_primary: Callable[[], bool],
        candidate: bool,
    ) -> None:
        self.commands = tuple(commands)
        self.environment = environment
        self.is_primary = is_primary
        self.candidate = candidate
        self.process: trio.Process | None = None
        self.stopping = False
        """A stop was asked for: no further command starts."""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def pass_signal(self, signum: int) -> None:
        """Pass a stop signal to the running command; start no other."""
        self.stopping = True
        if self.running:
            assert self.process is not None
            log.info(
                "passing %s to %s (pid %d); stopping once it exits",
                signal.Signals(signum).name,
                _shown(self.process.args),
                self.process.pid,
            )
            self.process.send_signal(signum)

    async def run(self, ready: Callable[[], Awaitable[None]]) -> int:
        """Wait until the node is ready, then run every command in turn;
        returns the exit status the node should end with."""
        await ready()
        last = len(self.commands) - 1
        for index, command in enumerate(self.commands):
            if self.stopping:
                return 0
            if command.if_candidate and not self._may_run_here(command):
                continue
            status = await self._run(command)
            if self.stopping:
                return status
            if index < last and status != 0:
                log.error("%s exited with status %d; stopping", _shown(command.argv), status)
                return status
            if index == last:
                log.info("%s exited with status %d; stopping", _shown(command.argv), status)
                return status
        return 0

    def _may_run_here(self, command: ExecCommand) -> bool:
        if not self.candidate:
            log.info("skipping %s: this node is not a candidate", _shown(command.argv))
            return False
        if not self.is_primary():
            log.info("skipping %s: another node is the primary", _shown(command.argv))
            return False
        return True

    async def _run(self, command: ExecCommand) -> int:
        argv = list(command.argv)
        try:
            self.process = await trio.lowlevel.open_process(
                argv,
                env={**os.environ, **self.environment()},
                stdin=None,
                process_group=0,
            )
        except OSError as exc:
            log.error("cannot start %s: %s", _shown(argv), exc.strerror or exc)
            found = not isinstance(exc, FileNotFoundError)
            return EXIT_CANNOT_EXECUTE if found else EXIT_NOT_FOUND
        log.info("started %s (pid %d)", _shown(argv), self.process.pid)
        try:
            returncode = await self.process.wait()
        except trio.Cancelled:
            self._end_abandoned(self.process)
            raise
        return _exit_status(returncode, self.stopping)

    @staticmethod
    def _end_abandoned(process: trio.Process) -> None:
        """The node is going down without waiting (a second failure): the
        command must not outlive its mount."""
        if process.returncode is None:
            process.kill()


def _exit_status(returncode: int, stopping: bool) -> int:
    """A shell's exit status for a child's return code; a command that ended
    from the signal the node passed on stopped as asked, which is success."""
    if returncode >= 0:
        return returncode
    if stopping and -returncode in (signal.SIGINT, signal.SIGTERM):
        return 0
    return 128 - returncode


def _shown(argv: object) -> str:
    if isinstance(argv, (list, tuple)):
        return shlex.join(str(arg) for arg in argv)
    return str(argv)
