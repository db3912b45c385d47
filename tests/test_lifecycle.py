"""Starting and stopping a node: signals, stale mounts, retention, bad input."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import StartNode
from node_process import NodeProcess, is_mounted

pytestmark = pytest.mark.fuse


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_and_unmounts(start_node: StartNode, sig: int) -> None:
    node = start_node("primary")
    node.sqlite("my.db", "CREATE TABLE t (x);")
    assert node.stop(sig) == 0
    assert not is_mounted(node.mount_dir)
    assert "unmounted" in node.log()


def test_open_files_at_shutdown_are_reported_and_no_mount_is_left(
    start_node: StartNode,
) -> None:
    node = start_node("primary")
    node.sqlite("my.db", "CREATE TABLE t (x);")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; f=open(sys.argv[1],'rb'); time.sleep(60)",
            str(node.mount_dir / "my.db"),
        ],
    )
    try:
        time.sleep(0.5)
        assert node.stop() == 0
        assert not is_mounted(node.mount_dir)
        assert f"still hold 1 files open (pids {holder.pid})" in node.log()
    finally:
        holder.kill()
        holder.wait()


def test_stale_mount_of_a_killed_daemon_is_cleared(start_node: StartNode) -> None:
    node = start_node("primary")
    node.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES (1);")
    node.kill()
    assert is_mounted(node.mount_dir)
    node.start()
    assert "clearing a stale mount" in node.log()
    assert node.sqlite("my.db", "SELECT x FROM t;").stdout.strip() == "1"


def test_mount_held_by_a_live_daemon_is_refused(start_node: StartNode, tmp_path: Path) -> None:
    first = start_node("primary")
    second = NodeProcess(tmp_path, "second")
    config = second.config_path.read_text().replace(str(second.mount_dir), str(first.mount_dir))
    second.config_path.write_text(config)
    second.start(wait=False)
    assert second.wait_exit() == 1
    assert "already mounted" in second.log()
    assert "Traceback" not in second.log()
    assert is_mounted(first.mount_dir)
    first.sqlite("my.db", "CREATE TABLE t (x);")


def test_mount_whose_daemon_never_answers_is_aborted_and_cleared(
    start_node: StartNode, tmp_path: Path
) -> None:
    """A daemon frozen for good (as one whose thread is stuck in the kernel
    after kill -9) holds its mount's requests for ever: a new daemon for the
    same mount point aborts that connection instead of waiting on it."""
    first = start_node("primary")
    assert first.process is not None
    second = NodeProcess(tmp_path, "second")
    config = second.config_path.read_text().replace(str(second.mount_dir), str(first.mount_dir))
    second.config_path.write_text(config)
    first.process.send_signal(signal.SIGSTOP)
    try:
        second.start(wait=False)
        deadline = time.monotonic() + 30
        while "mounted " + str(first.mount_dir) not in second.log():
            assert second.process is not None and second.process.poll() is None, second.log()
            assert time.monotonic() < deadline, second.log()
            time.sleep(0.05)
        assert "whose daemon no longer answers" in second.log()
        result = subprocess.run(
            ["sqlite3", "-bail", str(first.mount_dir / "my.db"), "CREATE TABLE t (x);"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    finally:
        first.process.send_signal(signal.SIGCONT)
        second.stop()


def test_data_directory_in_use_is_refused(start_node: StartNode, tmp_path: Path) -> None:
    first = start_node("primary")
    second = NodeProcess(tmp_path, "second")
    config = second.config_path.read_text().replace(str(second.data_dir), str(first.data_dir))
    second.config_path.write_text(config)
    second.start(wait=False)
    assert second.wait_exit() == 1
    assert "in use by another litefs process" in second.log()
    assert not is_mounted(second.mount_dir)


def test_bad_configuration_exits_2_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "litefs.yml"
    config.write_text("fuse:\n  dir: /mnt/x\nlease:\n  type: static\n  bogus: 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "litefs", "-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert str(config) in result.stderr
    assert not Path("/mnt/x").exists() or not is_mounted(Path("/mnt/x"))


def test_retention_removes_old_ltx_files_but_keeps_the_newest(start_node: StartNode) -> None:
    node = start_node(
        "primary",
        settings={"data": {"retention": "1s", "retention-monitor-interval": "200ms"}},
    )
    node.sqlite("my.db", "CREATE TABLE t (x);")
    for i in range(5):
        node.sqlite("my.db", f"INSERT INTO t VALUES ({i});")
    assert len(node.ltx_files("my.db")) == 6
    deadline = time.monotonic() + 10
    while len(node.ltx_files("my.db")) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p.name for p in node.ltx_files("my.db")] == ["0000000000000006-0000000000000006.ltx"]
    node.sqlite("my.db", "INSERT INTO t VALUES (9);")
    assert (node.mount_dir / "my.db-pos").read_text().startswith("0000000000000007/")
