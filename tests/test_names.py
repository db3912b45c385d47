"""Names in the mount: the files the mount generates, and the names they reserve."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from conftest import StartNode
from node_process import NodeProcess
from waiting import wait_for

pytestmark = pytest.mark.fuse


def refused(action: object) -> int:
    with pytest.raises(OSError) as caught:
        action()  # type: ignore[operator]
    return caught.value.errno or 0


def lag(node: NodeProcess) -> int:
    return int((node.mount_dir / ".lag").read_text())


@pytest.mark.parametrize("name", [".primary", ".lag"])
def test_generated_root_names_cannot_be_created_on_the_primary(
    primary: NodeProcess, name: str
) -> None:
    path = primary.mount_dir / name
    before = sorted(os.listdir(primary.mount_dir))
    assert refused(lambda: path.write_text("x")) in (errno.EPERM, errno.EACCES)
    assert refused(lambda: path.mkdir()) in (errno.EPERM, errno.EEXIST)
    assert sorted(os.listdir(primary.mount_dir)) == before
    assert not (primary.data_dir / "dbs" / name).exists()


def test_refusal_of_a_reserved_name_is_logged(primary: NodeProcess) -> None:
    refused(lambda: (primary.mount_dir / ".primary").write_text("x"))
    assert "refused: .primary is reserved" in primary.log()


def test_no_database_or_directory_name_ends_in_pos(primary: NodeProcess) -> None:
    mount = primary.mount_dir
    primary.sqlite("bar", "CREATE TABLE t (x);")
    assert refused(lambda: (mount / "bar-pos").write_text("x")) == errno.EACCES  # read-only
    assert refused(lambda: (mount / "lonely-pos").write_text("x")) == errno.EPERM
    assert refused(lambda: (mount / "dir-pos").mkdir()) == errno.EPERM
    (mount / "sub").mkdir()
    assert refused(lambda: (mount / "sub" / "x.db-pos").write_text("x")) == errno.EPERM
    primary.sqlite("other.db", "CREATE TABLE t (x);")
    assert refused(lambda: (mount / "other.db").rename(mount / "zz-pos")) in (
        errno.EPERM,
        errno.EINVAL,
    )
    names = os.listdir(mount)
    assert len(names) == len(set(names))
    assert (mount / "bar-pos").read_text().startswith("0000000000000001/")


def test_lag_is_zero_on_the_primary_and_on_a_current_replica(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    primary, replica = pair
    assert ".lag" not in os.listdir(primary.mount_dir)  # read by name, like -pos
    assert lag(primary) == 0
    primary.sqlite("my.db", "CREATE TABLE t (x); INSERT INTO t VALUES (1);")
    wait_for(lambda: lag(replica) == 0, 30, "the replica to be current")
    for _ in range(5):  # across heartbeats
        assert lag(replica) == 0
        time.sleep(0.5)


def test_lag_grows_on_a_replica_that_lost_its_primary(
    start_node: StartNode, tmp_path: Path
) -> None:
    primary = start_node("primary")
    replica = start_node("replica", candidate=False, primary=primary)
    wait_for(lambda: lag(replica) == 0, 30, "the replica to be current")
    primary.stop()
    wait_for(lambda: lag(replica) > 2500, 30, "the lag to grow")
    first = lag(replica)
    time.sleep(0.5)
    assert lag(replica) >= first + 400
    assert refused(lambda: (replica.mount_dir / ".lag").write_text("0")) in (
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
    )


def test_a_database_with_a_name_reserved_since_is_kept_and_explained(
    start_node: StartNode,
) -> None:
    node = start_node("primary")
    node.sqlite("old.db", "CREATE TABLE t (x); INSERT INTO t VALUES (7);")
    node.stop()
    (node.data_dir / "dbs" / "old.db").rename(node.data_dir / "dbs" / ".primary")
    node.start()
    assert "database .primary: .primary is reserved" in node.log()
    assert "litefs export -name .primary FILE" in node.log()
