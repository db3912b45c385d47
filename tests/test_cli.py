"""The `litefs` command line: version, help, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from litefs import __version__
from localcluster import free_port, litefs_command


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


def test_version_flag() -> None:
    result = litefs("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"litefs {__version__}"


def test_mount_help_says_where_the_configuration_is_looked_for() -> None:
    result = litefs("mount", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "./litefs.yml, then /etc/litefs.yml" in text
    assert "-- CMD ARGS" in text


def write_config(tmp_path: Path, mount_dir: Path) -> Path:
    config = tmp_path / "litefs.yml"
    config.write_text(
        f"fuse: {{dir: {mount_dir}}}\n"
        f"data: {{dir: {tmp_path / 'data'}}}\n"
        "lease: {type: static, advertise-url: 'http://127.0.0.1:1'}\n"
        "exec: 'myapp -addr :8080'\n"
    )
    return config


@pytest.mark.parametrize(
    "order",
    [("-config", "CONFIG", "mount"), ("mount", "-config", "CONFIG")],
    ids=["before-the-command", "after-the-command"],
)
def test_config_flag_works_before_and_after_the_command(
    tmp_path: Path, order: tuple[str, ...]
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    config = write_config(tmp_path, not_a_directory)
    result = litefs(*(str(config) if arg == "CONFIG" else arg for arg in order))
    assert result.returncode == 2
    assert result.stderr == f"litefs: mount directory {not_a_directory} is not a directory\n"


def test_config_check_validates_without_mounting(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "mnt")
    for args in (
        ("config", "check", "-config", str(config)),
        ("mount", "-check", "-config", str(config)),
    ):
        result = litefs(*args)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{config}: ok")
        assert "exec myapp -addr :8080" in result.stdout
    assert not (tmp_path / "mnt").exists()
    assert not (tmp_path / "data").exists()


def test_config_check_reports_the_mistake_with_status_2(tmp_path: Path) -> None:
    config = tmp_path / "litefs.yml"
    config.write_text("fuse: {dir: /mnt}\nlease: {type: statik}\n")
    result = litefs("config", "check", "-config", str(config))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_handoff_to_a_malformed_url_is_one_line_and_status_2() -> None:
    result = litefs("handoff", "-to", "x", "-url", "notaurl")
    assert result.returncode == 2
    assert (
        result.stderr
        == "litefs: -url must be an http:// or https:// URL naming a host, got 'notaurl'\n"
    )


def test_handoff_to_a_node_that_is_not_there_is_one_line() -> None:
    result = litefs("handoff", "-to", "x", "-url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert result.stderr.startswith("litefs: cannot reach http://127.0.0.1:")
    assert result.stderr.count("\n") == 1


def test_cluster_prints_litefs_commands_that_work_as_printed() -> None:
    command = litefs_command()
    result = subprocess.run(
        f"{command} --version", shell=True, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
