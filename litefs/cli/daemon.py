"""`litefs mount` (and plain `litefs -config FILE`): run a node.

Start-up order: configuration, logging, the data directory (locked so two
daemons never share one), the store (which recovers every database), the
mount point (clearing a stale mount a crashed daemon left), then the node's
services and the FUSE loop. Shutdown runs the same steps backwards, and the
mount is gone afterwards even when applications still hold files open.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import faulthandler
import fcntl
import json
import logging
import os
import shlex
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from litefs import config as configuration
from litefs.cli import EXIT_USAGE, CommandError
from litefs.config import AUTH_TOKEN_ENV, Config, ExecCommand
from litefs.mountpoint import (
    abort_connection,
    answers_within,
    fuse_connection,
    is_mounted,
    unmount,
)

STALE_MOUNT_PROBE = 5.0
"""Seconds a mount left at the mount point has to answer before it counts as stale."""

log = logging.getLogger("litefs")


CONFIG_HELP = (
    "configuration file (default: ./litefs.yml, then /etc/litefs.yml; "
    "docs/configuration.md describes it)"
)


def add_config_flag(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """`-config` is accepted before the command and after it. The command's
    copy leaves the value alone when not given (SUPPRESS), so a flag given
    before the command is not overwritten by the command's default."""
    parser.add_argument(
        "-config",
        "--config",
        dest="config",
        metavar="FILE",
        help=CONFIG_HELP,
        default=None if top_level else argparse.SUPPRESS,
    )


def register(commands: argparse._SubParsersAction) -> None:
    mount = commands.add_parser(
        "mount",
        help="mount the filesystem and run a node",
        description="Mount the filesystem and run a node until SIGINT or SIGTERM, or until "
        "the application it runs exits. Without -config the configuration is read from "
        "./litefs.yml, then /etc/litefs.yml.",
    )
    add_config_flag(mount)
    mount.add_argument(
        "-check",
        "--check",
        dest="check",
        action="store_true",
        help="check the configuration file and exit without mounting",
    )
    mount.add_argument(
        "command",
        nargs="*",
        metavar="-- CMD ARGS",
        help="run CMD with ARGS as the application once the node is ready, instead of exec",
    )
    mount.set_defaults(handler=run_mount)

    config = commands.add_parser("config", help="work with the configuration file")
    config_commands = config.add_subparsers(
        title="commands", metavar="COMMAND", parser_class=type(config), required=True
    )
    check = config_commands.add_parser(
        "check",
        help="check a configuration file without mounting",
        description="Check a configuration file and exit: status 0 and a summary when it is "
        "usable, status 2 and the mistake otherwise.",
    )
    add_config_flag(check)
    check.set_defaults(handler=run_config_check)

    handoff = commands.add_parser(
        "handoff", help="hand the primary role to a caught-up replica (Consul and etcd leases)"
    )
    add_config_flag(handoff)
    handoff.add_argument(
        "-to", "--to", dest="to", required=True, metavar="NAME", help="the replica's lease hostname"
    )
    handoff.add_argument(
        "-url",
        "--url",
        dest="url",
        metavar="URL",
        help="the primary's HTTP URL (default: this node's http.addr)",
    )
    handoff.set_defaults(handler=run_handoff)


def load_config(path: str | None) -> Config:
    """The configuration, or the one-line mistake and exit status 2."""
    try:
        return configuration.load(path)
    except configuration.ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


def node_url(args: argparse.Namespace) -> str:
    """The node to talk to: `-url`, or this node's own `http.addr`."""
    url: str | None = getattr(args, "url", None)
    if url is None:
        cfg = load_config(getattr(args, "config", None))
        host = cfg.http.host or "127.0.0.1"
        return f"http://{'[' + host + ']' if ':' in host else host}:{cfg.http.port}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CommandError(
            f"-url must be an http:// or https:// URL naming a host, got {url!r}", EXIT_USAGE
        )
    return url.rstrip("/")


def run_config_check(args: argparse.Namespace) -> int:
    return report_config(load_config(getattr(args, "config", None)))


def report_config(cfg: Config) -> int:
    """What a node started with `cfg` would do, in a few lines."""
    print(f"{cfg.source}: ok")
    print(f"  mount {cfg.fuse.dir}, data {cfg.data.dir}, http {cfg.http.addr}")
    role = "candidate" if cfg.lease.candidate else "replica only"
    print(f"  lease {cfg.lease.type} ({role}), hostname {cfg.lease.hostname}")
    for command in cfg.exec:
        when = " (if candidate)" if command.if_candidate else ""
        print(f"  exec {shlex.join(command.argv)}{when}")
    return 0


def run_handoff(args: argparse.Namespace) -> int:
    """Ask the primary to hand its role over, and report what it answered."""
    url = node_url(args)
    target = f"{url}/handoff?{urllib.parse.urlencode({'to': args.to})}"
    answer = request_json(
        url, target, method="POST", failure="handoff refused", token=node_token(args)
    )
    print(f"primary role handed off to {answer.get('primary', args.to)}")
    return 0


def node_token(args: argparse.Namespace) -> str | None:
    """The shared secret a node may require: the configuration's (which
    falls back to the environment's), or the environment's alone for a
    node named by `-url` without a configuration."""
    if getattr(args, "url", None) is not None and getattr(args, "config", None) is None:
        return os.environ.get(AUTH_TOKEN_ENV) or None
    return load_config(getattr(args, "config", None)).http.auth_token


def request_json(
    url: str, target: str, *, method: str, failure: str, token: str | None = None
) -> dict[str, object]:
    """One HTTP request to a node; its JSON error becomes the message."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(
        target, method=method, data=b"" if method == "POST" else None, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer: dict[str, object] = json.load(response)
            return answer
    except urllib.error.HTTPError as exc:
        raise CommandError(f"{failure} ({exc.code}): {error_message(exc)}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CommandError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None


def error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.load(exc).get("error", exc.reason))
    except ValueError:
        return str(exc.reason)


def run_mount(args: argparse.Namespace) -> int:
    from litefs.logs import setup_logging
    from litefs.node import Node

    cfg = load_config(getattr(args, "config", None))
    command = getattr(args, "command", None)
    if command:
        cfg = dataclasses.replace(cfg, exec=(ExecCommand(tuple(command)),))
    if getattr(args, "check", False):
        return report_config(cfg)
    setup_logging(cfg.log.format, cfg.log.debug)
    # A crash in native code (pyfuse3, libfuse) leaves no Python traceback:
    # have the interpreter write every thread's stack to the log instead.
    faulthandler.enable()
    lock = lock_data_dir(cfg.data.dir)
    try:
        prepare_mount_dir(cfg.fuse.dir)
        node = Node(cfg)
        return node.run()
    finally:
        os.close(lock)


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on the data directory for the daemon's lifetime."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CommandError(f"cannot use data directory {data_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CommandError(
            f"data directory {data_dir} is in use by another litefs process"
        ) from None
    return fd


def prepare_mount_dir(mount_dir: Path) -> None:
    """Make the mount point usable, clearing a mount whose daemon is gone."""
    if is_mounted(mount_dir) and not answers_within(mount_dir, STALE_MOUNT_PROBE):
        log.warning(
            "clearing a mount at %s whose daemon no longer answers (aborting its FUSE connection)",
            mount_dir,
        )
        connection = fuse_connection(mount_dir)
        if connection is not None:
            abort_connection(connection)
        unmount(mount_dir)
        return
    try:
        os.statvfs(mount_dir)  # stat() may answer from the kernel's cache; statfs never does
    except FileNotFoundError:
        mount_dir.mkdir(parents=True)
        return
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise CommandError(
                f"mount directory {mount_dir} is not a directory", EXIT_USAGE
            ) from None
        if exc.errno != errno.ENOTCONN:
            raise CommandError(f"cannot use mount directory {mount_dir}: {exc.strerror}") from None
        log.warning("clearing a stale mount at %s left by a daemon that is gone", mount_dir)
        unmount(mount_dir)
        return
    if is_mounted(mount_dir):
        raise CommandError(
            f"{mount_dir} is already mounted (is another litefs running?); "
            f"unmount it first with: fusermount3 -u {mount_dir}"
        )
    if not mount_dir.is_dir():
        raise CommandError(f"mount directory {mount_dir} is not a directory", EXIT_USAGE)
