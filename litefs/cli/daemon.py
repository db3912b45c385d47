"""`litefs mount` (and plain `litefs -config FILE`): run a node.

Start-up order: configuration, logging, the data directory (locked so two
daemons never share one), the store (which recovers every database), the
mount point (clearing a stale mount a crashed daemon left), then the node's
services and the FUSE loop. Shutdown runs the same steps backwards, and the
mount is gone afterwards even when applications still hold files open.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
from pathlib import Path

from litefs.cli import EXIT_USAGE, CommandError
from litefs.mountpoint import is_mounted, unmount

log = logging.getLogger("litefs")


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-config", "--config", dest="config", metavar="FILE", help="configuration file"
    )


def register(commands: argparse._SubParsersAction) -> None:
    mount = commands.add_parser("mount", help="mount the filesystem and run a node")
    add_config_flag(mount)
    mount.set_defaults(handler=run_mount)

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


def run_handoff(args: argparse.Namespace) -> int:
    """Ask the primary to hand its role over, and report what it answered."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    from litefs import config as configuration

    url = args.url
    token = os.environ.get(configuration.AUTH_TOKEN_ENV) or None
    if url is None or args.config is not None:
        try:
            cfg = configuration.load(args.config)
        except configuration.ConfigError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
        token = cfg.http.auth_token
        if url is None:
            host = cfg.http.host or "127.0.0.1"
            url = f"http://{'[' + host + ']' if ':' in host else host}:{cfg.http.port}"
    target = f"{url.rstrip('/')}/handoff?{urllib.parse.urlencode({'to': args.to})}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(target, method="POST", data=b"", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise CommandError(f"handoff refused ({exc.code}): {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CommandError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    print(f"primary role handed off to {answer.get('primary', args.to)}")
    return 0


def run_mount(args: argparse.Namespace) -> int:
    from litefs import config as configuration
    from litefs.logs import setup_logging
    from litefs.node import Node

    try:
        cfg = configuration.load(args.config)
    except configuration.ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    setup_logging(cfg.log.format, cfg.log.debug)
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
    try:
        os.statvfs(mount_dir)  # stat() may answer from the kernel's cache; statfs never does
    except FileNotFoundError:
        mount_dir.mkdir(parents=True)
        return
    except OSError as exc:
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
        raise CommandError(f"mount directory {mount_dir} is not a directory")
