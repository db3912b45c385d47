"""Waiting for a condition in tests: one function, one failure message."""

from __future__ import annotations

import time
from collections.abc import Callable

POLL = 0.01


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> float:
    """Seconds until `condition()` held; fails naming `what` after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or condition}")
        time.sleep(POLL)
    return time.monotonic() - started
