"""`litefs mount`: run a node. Filled in by the daemon."""

from __future__ import annotations

import argparse

from litefs.cli import CommandError


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-config", "--config", dest="config", metavar="FILE", help="configuration file"
    )


def register(commands: argparse._SubParsersAction) -> None:
    mount = commands.add_parser("mount", help="mount the filesystem and run a node")
    add_config_flag(mount)
    mount.set_defaults(handler=run_mount)


def run_mount(args: argparse.Namespace) -> int:
    raise CommandError("mount is not available yet")
