"""The `litefs` command: argument parsing and dispatch to subcommands.

Flags follow the original's Go style (`-config FILE`, `-db DB`) and the
double-dash spelling is accepted as well. Every user mistake ends as one line
on stderr and a non-zero exit status; tracebacks are for our bugs only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from litefs import __version__

EXIT_FAILURE = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A failure to report to the user as one line, with an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{self.prog}: {message}", EXIT_USAGE)


Handler = Callable[[argparse.Namespace], int]


def build_parser() -> Parser:
    from litefs.cli import daemon, databases, ltx

    parser = Parser(
        prog="litefs",
        description="LiteFS: a FUSE filesystem that replicates SQLite databases.",
    )
    daemon.add_config_flag(parser, top_level=True)
    parser.add_argument("--version", "-version", action="version", version=f"litefs {__version__}")
    parser.set_defaults(handler=daemon.run_mount)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)

    version = commands.add_parser("version", help="print the version and exit")
    version.set_defaults(handler=_print_version)

    daemon.register(commands)
    databases.register(commands)
    ltx.register(commands)
    return parser


def _print_version(args: argparse.Namespace) -> int:
    print(f"litefs {__version__}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        handler: Handler = args.handler
        return handler(args)
    except CommandError as exc:
        print(f"litefs: {exc}" if not str(exc).startswith("litefs") else str(exc), file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_FAILURE
