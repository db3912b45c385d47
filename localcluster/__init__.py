"""A LiteFS cluster on this one machine: `python -m localcluster`.

Each node is a real `litefs mount` process with its own mount directory, data
directory and HTTP port, configured with a static lease. `make run` uses this
to give a working cluster to try; the benchmarks, the fault campaign and the
end-to-end tests use `LocalNode` to start and stop daemons the same way. It
is not part of the `litefs` package: nothing a node runs needs it.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from litefs.mountpoint import (
    abort_connection,
    fuse_connection,
    is_mounted,
    responds,
    unmount,
)

MOUNT_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalNode:
    """One `litefs mount` process under `<root>/<name>/` (mnt, data, log)."""

    def __init__(
        self,
        root: Path,
        name: str = "node1",
        *,
        candidate: bool = True,
        primary: LocalNode | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        settings: dict[str, Any] | None = None,
        command: tuple[str, ...] = (),
        nofile: int | None = None,
    ) -> None:
        self.name = name
        self.command = command
        """An application to run under the node (`mount -- CMD ARGS`)."""
        self.nofile = nofile
        """When set, the daemon starts with this many descriptors (soft and hard limit)."""
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mount_dir = self.dir / "mnt"
        self.data_dir = self.dir / "data"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = self.dir / "litefs.yml"
        self.log_path = self.dir / "litefs.log"
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        owner = primary or self
        config: dict[str, Any] = {
            "fuse": {"dir": str(self.mount_dir)},
            "data": {"dir": str(self.data_dir)},
            "http": {"addr": f"127.0.0.1:{self.port}"},
            "lease": {
                "type": "static",
                "hostname": owner.name,
                "advertise-url": owner.url,
                "candidate": candidate,
            },
        }
        for section, values in (settings or {}).items():
            if isinstance(values, dict):
                config.setdefault(section, {}).update(values)
            else:
                config[section] = values
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, *, wait: bool = True, env: dict[str, str] | None = None) -> LocalNode:
        environment = {**os.environ, **self.env, **(env or {})}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "litefs", "mount", "-config", str(self.config_path)),
                    *(("--", *self.command) if self.command else ()),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=environment,
                preexec_fn=self._limit_descriptors if self.nofile else None,
            )
        if wait:
            self.wait_mounted()
        return self

    def _limit_descriptors(self) -> None:
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def wait_mounted(self, timeout: float = MOUNT_TIMEOUT) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.process.returncode}:\n{self.log()}"
                )
            # ismount() is false for a plain directory and a stale mount alike:
            # is_mounted() then responds() could see a stale mount, then the
            # directory under it once a new daemon has cleared it.
            if os.path.ismount(self.mount_dir) and responds(self.mount_dir):
                return
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not mount within {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGINT) -> int:
        """Signal the daemon and wait for it; returns its exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        status = self.process.returncode
        self.process = None
        return status

    def kill(self) -> None:
        """SIGKILL, as a crash would; the restart clears the stale mount."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
            self.process = None

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        assert self.process is not None
        status = self.process.wait(timeout)
        self.process = None
        return status

    def cleanup(self) -> None:
        """Stop the daemon whatever state it is in and leave no mount behind."""
        connection = fuse_connection(self.mount_dir)
        try:
            self.stop()
        except subprocess.TimeoutExpired:
            # A daemon stuck on a request to its own mount cannot even die.
            if connection is not None:
                abort_connection(connection)
        finally:
            if self.process is not None:
                self.process.kill()
                try:
                    self.process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    if connection is not None:
                        abort_connection(connection)
                    self.process.wait(STOP_TIMEOUT)
                self.process = None
            if is_mounted(self.mount_dir):
                unmount(self.mount_dir)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def db_dir(self, name: str) -> Path:
        return self.data_dir / "dbs" / name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m localcluster",
        description="Run a LiteFS cluster of local nodes until interrupted.",
    )
    parser.add_argument("--dir", default=".cluster", help="where nodes keep mounts and data")
    parser.add_argument("--nodes", type=int, default=2, help="number of nodes (first is primary)")
    parser.add_argument("--port", type=int, default=20202, help="HTTP port of the first node")
    args = parser.parse_args(argv)
    root = Path(args.dir).resolve()
    primary = LocalNode(root, "node1", port=args.port)
    nodes = [primary] + [
        LocalNode(root, f"node{i + 1}", candidate=False, primary=primary, port=args.port + i)
        for i in range(1, args.nodes)
    ]
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        for node in nodes:
            node.start()
        _print_welcome(nodes)
        while not stopping:
            for node in nodes:
                if node.process is not None and node.process.poll() is not None:
                    print(f"{node.name} exited; see {node.log_path}", file=sys.stderr)
                    return 1
            time.sleep(0.2)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        for node in reversed(nodes):
            node.cleanup()
    return 0


def litefs_command() -> str:
    """How to run `litefs` from a shell: it need not be on the PATH."""
    script = Path(sys.executable).parent / "litefs"
    if not script.exists():
        return f"{sys.executable} -m litefs"
    on_path = shutil.which("litefs")
    if on_path is not None and Path(on_path).resolve() == script.resolve():
        return "litefs"
    return os.path.relpath(script)


def _print_welcome(nodes: list[LocalNode]) -> None:
    primary, replicas = nodes[0], nodes[1:]
    print(f"primary  {primary.name}: mount {primary.mount_dir}  http {primary.url}")
    for node in replicas:
        print(f"replica  {node.name}: mount {node.mount_dir}  http {node.url}")
    print("\nTry it:")
    print(f"  sqlite3 {primary.mount_dir}/my.db 'CREATE TABLE t (x); INSERT INTO t VALUES (1);'")
    print(f"  cat {primary.mount_dir}/my.db-pos")
    for node in replicas:
        print(f"  sqlite3 {node.mount_dir}/my.db 'SELECT * FROM t;'")
    print(f"  {litefs_command()} ltx list {primary.data_dir / 'dbs/my.db/ltx'}/*.ltx")
    print(f"\nLogs: {nodes[0].log_path.parent.parent}/*/litefs.log. Ctrl-C stops every node.")
    sys.stdout.flush()
