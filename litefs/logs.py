"""Log output for the daemon: plain text lines or one JSON object per line.

A client misbehaving in a loop must not fill the disk with one message
repeated: every message is limited to a few lines per interval, and the next
line that gets through says how many were held back.
"""

from __future__ import annotations

import json
import logging
import sys
import time

FLOOD_INTERVAL = 10.0
FLOOD_BURST = 5
"""Lines of one message (same logger, same format string) let through per interval."""

LIBRARY_LOGGERS = ("asyncio", "aiohttp")
"""Loggers of libraries the daemon runs, routed through the same handler."""


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class FloodLimit(logging.Filter):
    """Let `burst` records of each message through per `interval` seconds."""

    def __init__(self, interval: float = FLOOD_INTERVAL, burst: int = FLOOD_BURST) -> None:
        super().__init__()
        self.interval = interval
        self.burst = burst
        self._windows: dict[tuple[str, object], list[float | int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval:
            held = int(window[2]) if window is not None else 0
            self._windows[key] = [now, 1, 0]
            if len(self._windows) > 1000:
                self._forget(now)
            if held:
                record.msg = f"{record.msg} ({held} more like this were not logged)"
            return True
        if window[1] < self.burst:
            window[1] += 1
            return True
        window[2] += 1
        return False

    def _forget(self, now: float) -> None:
        for key, window in list(self._windows.items()):
            if now - window[0] >= self.interval and not window[2]:
                del self._windows[key]


def setup_logging(format: str = "text", debug: bool = False) -> None:
    """Route every `litefs.*` logger, and the libraries' own, to stderr in the
    configured format, each message limited against floods."""
    handler = logging.StreamHandler(sys.stderr)
    if format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(message)s", "%H:%M:%S")
        )
    handler.addFilter(FloodLimit())
    root = logging.getLogger("litefs")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers[:] = [handler]
        library.setLevel(logging.WARNING)
        library.propagate = False
