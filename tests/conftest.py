"""Shared fixtures: real daemons on real FUSE mounts, always cleaned up."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from node_process import NodeProcess

StartNode = Callable[..., NodeProcess]


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[StartNode]:
    """Start `litefs` daemons; every one is stopped and unmounted afterwards."""
    started: list[NodeProcess] = []

    def start(name: str = "node1", *, wait: bool = True, **kwargs: object) -> NodeProcess:
        env = kwargs.pop("start_env", None)
        root = kwargs.pop("root", tmp_path)
        node = NodeProcess(root, name, **kwargs)  # type: ignore[arg-type]
        started.append(node)
        node.start(wait=wait, env=env)  # type: ignore[arg-type]
        return node

    yield start
    for node in reversed(started):
        node.cleanup()


@pytest.fixture
def primary(start_node: StartNode) -> NodeProcess:
    return start_node("primary")


@pytest.fixture
def pair(start_node: StartNode) -> tuple[NodeProcess, NodeProcess]:
    """A primary and a replica following it, both with static leases."""
    primary = start_node("primary")
    replica = start_node("replica", candidate=False, primary=primary)
    return primary, replica


def litefs_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "litefs", *args], capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"litefs {' '.join(args)} failed: {result.stderr}")
    return result
