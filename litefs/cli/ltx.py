"""`litefs ltx ...`: operator tools for LTX files."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    commands.add_parser("ltx", help="inspect, verify, apply and create LTX files")
