"""Running the application under a node: `exec` and `mount -- CMD ARGS`."""

from __future__ import annotations

import shlex
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from conftest import StartNode
from etcd_server import EtcdServer
from etcd_server import etcd_server as etcd_server
from node_process import NodeProcess, is_mounted
from waiting import wait_for

pytestmark = pytest.mark.fuse

APP_TIMEOUT = 30.0


def environment_of(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value for key, value in pairs if key.startswith("LITEFS_")}


def shell(script: str) -> tuple[str, ...]:
    return ("sh", "-c", script)


def test_application_starts_once_primary_and_is_told_where_it_stands(
    start_node: StartNode, tmp_path: Path
) -> None:
    out = tmp_path / "env"
    app = shell(
        f'env > {out}.tmp && mv {out}.tmp {out} && sqlite3 "$LITEFS_MOUNT_DIR/app.db" '
        f"'CREATE TABLE t (x); INSERT INTO t VALUES (1);' && exec sleep 60"
    )
    node = start_node("primary", command=app)
    wait_for(out.exists, APP_TIMEOUT, "the application to start")
    env = environment_of(out)
    assert env["LITEFS_ROLE"] == "primary"
    assert env["LITEFS_PRIMARY"] == env["LITEFS_NODE"] == "primary"
    assert env["LITEFS_PRIMARY_URL"] == node.url
    assert env["LITEFS_MOUNT_DIR"] == str(node.mount_dir)
    wait_for(lambda: (node.mount_dir / "app.db-pos").exists(), APP_TIMEOUT, "the app's commit")


def test_replica_application_starts_after_catching_up(
    start_node: StartNode, tmp_path: Path
) -> None:
    primary = start_node("primary")
    primary.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES (42);")
    out = tmp_path / "seen"
    env_out = tmp_path / "env"
    app = shell(
        f'env > {env_out} && sqlite3 "$LITEFS_MOUNT_DIR/my.db" "SELECT x FROM t" > {out}.tmp '
        f"&& mv {out}.tmp {out} && exec sleep 60"
    )
    start_node("replica", candidate=False, primary=primary, command=app)
    wait_for(out.exists, APP_TIMEOUT, "the replica's application")
    assert out.read_text().strip() == "42"
    env = environment_of(env_out)
    assert env["LITEFS_ROLE"] == "replica"
    assert env["LITEFS_PRIMARY"] == "primary"
    assert env["LITEFS_PRIMARY_URL"] == primary.url


def test_exec_runs_migrations_in_order_then_the_application(
    start_node: StartNode, tmp_path: Path
) -> None:
    trail = tmp_path / "trail"
    exec_ = [
        {"cmd": f"sh -c 'echo first >> {trail}'", "if-candidate": True},
        {"cmd": f"sh -c 'echo second >> {trail}'"},
        {"cmd": f"sh -c 'echo app >> {trail}; exec sleep 60'"},
    ]
    start_node("primary", settings={"exec": exec_})
    wait_for(lambda: trail.exists() and "app" in trail.read_text(), APP_TIMEOUT, "the app")
    assert trail.read_text().split() == ["first", "second", "app"]


def test_if_candidate_commands_are_skipped_on_a_replica(
    start_node: StartNode, tmp_path: Path
) -> None:
    trail = tmp_path / "trail"
    exec_ = [
        {"cmd": f"sh -c 'echo migrate >> {trail}'", "if-candidate": True},
        {"cmd": f"sh -c 'echo app >> {trail}; exec sleep 60'"},
    ]
    primary = start_node("primary")
    replica = start_node("replica", candidate=False, primary=primary, settings={"exec": exec_})
    wait_for(lambda: trail.exists() and "app" in trail.read_text(), APP_TIMEOUT, "the app")
    assert trail.read_text().split() == ["app"]
    assert "skipping sh -c 'echo migrate" in replica.log()


def test_if_candidate_commands_run_only_on_the_candidate_that_became_primary(
    start_node: StartNode, tmp_path: Path, etcd_server: EtcdServer
) -> None:
    trail = tmp_path / "trail"
    settings = {
        "lease": {
            "type": "etcd",
            "candidate": True,
            "etcd": {"endpoints": [etcd_server.url], "key": "litefs/primary", "ttl": "2s"},
        },
        "exec": [
            {"cmd": f"sh -c 'echo migrate $LITEFS_NODE >> {trail}'", "if-candidate": True},
            {"cmd": f"sh -c 'echo app $LITEFS_NODE $LITEFS_ROLE >> {trail}; exec sleep 60'"},
        ],
    }
    start_node("node1", settings=settings)
    wait_for(lambda: trail.exists() and "app" in trail.read_text(), APP_TIMEOUT, "node1's app")
    node2 = start_node("node2", settings=settings)
    wait_for(lambda: "app node2" in trail.read_text(), APP_TIMEOUT, "node2's app")
    assert trail.read_text().splitlines() == [
        "migrate node1",
        "app node1 primary",
        "app node2 replica",
    ]
    assert "another node is the primary" in node2.log()


def test_application_exit_stops_the_node_with_its_status(start_node: StartNode) -> None:
    node = start_node("primary", command=shell("exit 3"), wait=False)
    assert node.wait_exit(APP_TIMEOUT) == 3
    assert not is_mounted(node.mount_dir)
    assert "exited with status 3; stopping" in node.log()
    assert "stopped, unmounted" in node.log()


def test_failing_migration_stops_the_node_before_the_application(
    start_node: StartNode, tmp_path: Path
) -> None:
    marker = tmp_path / "app-ran"
    exec_ = [{"cmd": "sh -c 'exit 4'"}, {"cmd": f"touch {marker}"}]
    node = start_node("primary", settings={"exec": exec_}, wait=False)
    assert node.wait_exit(APP_TIMEOUT) == 4
    assert not marker.exists()
    assert not is_mounted(node.mount_dir)


def test_command_that_cannot_start_is_one_line_and_a_failure(start_node: StartNode) -> None:
    node = start_node("primary", command=("/nonexistent/app", "--flag"), wait=False)
    assert node.wait_exit(APP_TIMEOUT) == 127
    assert not is_mounted(node.mount_dir)
    lines = [line for line in node.log().splitlines() if "cannot start" in line]
    assert len(lines) == 1 and "/nonexistent/app --flag" in lines[0]
    assert "Traceback" not in node.log()


APP_THAT_TRAPS = """
import os, signal, sqlite3, sys, time
database, out = os.environ["LITEFS_MOUNT_DIR"] + "/app.db", sys.argv[1]
def stop(signum, frame):
    # The mount still serves while the application shuts down.
    conn = sqlite3.connect(database, isolation_level=None)
    conn.execute("INSERT INTO t VALUES ('bye')")
    conn.close()
    with open(out, "w") as f:
        f.write(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
conn = sqlite3.connect(database, isolation_level=None)
conn.execute("CREATE TABLE t (x)")
conn.close()
open(out + ".ready", "w").close()
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_goes_to_the_application_first(
    start_node: StartNode, tmp_path: Path, sig: int
) -> None:
    script = tmp_path / "app.py"
    script.write_text(APP_THAT_TRAPS)
    out = tmp_path / "out"
    node = start_node("primary", command=(sys.executable, str(script), str(out)))
    wait_for(Path(f"{out}.ready").exists, APP_TIMEOUT, "the application to start")
    assert node.stop(sig) == 0
    assert out.read_text() == signal.Signals(sig).name
    assert not is_mounted(node.mount_dir)
    database = node.db_dir("app.db") / "database"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [("bye",)]
    log = node.log()
    assert log.index(f"passing {signal.Signals(sig).name}") < log.index("unmounted")


def test_application_command_line_overrides_exec(start_node: StartNode, tmp_path: Path) -> None:
    marker = tmp_path / "from-exec"
    node = start_node(
        "primary",
        settings={"exec": f"touch {marker}"},
        command=shell("exit 5"),
        wait=False,
    )
    assert node.wait_exit(APP_TIMEOUT) == 5
    assert not marker.exists()


def test_shell_quoting_in_exec_string(start_node: StartNode, tmp_path: Path) -> None:
    out = tmp_path / "two words"
    node = start_node("primary", settings={"exec": f"touch {shlex.quote(str(out))}"}, wait=False)
    assert node.wait_exit(APP_TIMEOUT) == 0
    assert out.exists()


def test_a_replica_without_its_primary_waits_and_stops_cleanly_before_starting(
    start_node: StartNode, tmp_path: Path
) -> None:
    absent = NodeProcess(tmp_path, "absent")  # configured, never started
    marker = tmp_path / "started"
    node = start_node("replica", candidate=False, primary=absent, command=("touch", str(marker)))
    wait_for(lambda: "waiting to be the primary" in node.log(), APP_TIMEOUT, "the wait")
    time.sleep(0.5)
    assert not marker.exists()
    assert node.stop(signal.SIGTERM) == 0
    assert not marker.exists()
    assert not is_mounted(node.mount_dir)
