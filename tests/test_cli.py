"""The `litefs` command line: version, help, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

from litefs import __version__


def litefs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "litefs", *args], capture_output=True, text=True, timeout=60
    )


def test_version_prints_the_package_version() -> None:
    result = litefs("version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"litefs {__version__}"


def test_help_lists_the_commands() -> None:
    result = litefs("--help")
    assert result.returncode == 0
    for command in ("version", "mount", "ltx"):
        assert command in result.stdout


def test_unknown_command_is_one_line_and_status_2() -> None:
    result = litefs("frobnicate")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
