"""Empty files made ahead of time, so that a commit need not create one.

Creating a file costs a filesystem far more than renaming one (on ext4
here, about 0.5 ms against 0.02 ms when other work keeps the disk busy),
and every commit writes one new LTX file. A directory's spares are made by
one background thread, in a batch once half of them are taken (waking the
thread costs a commit about as much as a page's encoding); a commit writes
into a spare and renames it to the LTX file's name, or creates the file
itself when none is left. A spare's name never parses as an LTX file's, so
nothing else of the history ever sees one; those a run leaves (a crash may
leave one half-written) are removed at the next start.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
from pathlib import Path

log = logging.getLogger("litefs.spares")

PREFIX = ".spare-"
KEEP = 8


class SpareFiles:
    """The spares of one directory."""

    def __init__(self, directory: Path, keep: int = KEEP) -> None:
        self.directory = directory
        self.keep = keep
        self._lock = threading.Lock()
        self._ready: list[Path] = []
        self._closed = False

    def adopt(self) -> None:
        """Remove the spares a previous run left and have new ones made."""
        for old in self.directory.glob(PREFIX + "*"):
            old.unlink(missing_ok=True)
        _REFILLER.ask(self)

    def take(self) -> Path | None:
        """An empty spare to write, or None when none is ready (create the
        file then). A spare taken is the caller's, to rename or remove: it
        is never truncated for reuse, which ext4 answers by writing the
        file's data back when it is closed."""
        with self._lock:
            spare = self._ready.pop() if self._ready else None
            low = len(self._ready) <= self.keep // 2
        if low:
            _REFILLER.ask(self)
        return spare

    def close(self) -> None:
        """Remove the spares: the directory may be about to go."""
        with self._lock:
            self._closed = True
            spares, self._ready = self._ready, []
        for spare in spares:
            spare.unlink(missing_ok=True)

    def refill(self) -> None:
        while True:
            with self._lock:
                if self._closed or len(self._ready) >= self.keep:
                    return
            path = self.directory / f"{PREFIX}{secrets.token_hex(8)}"
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
            except OSError as exc:
                log.debug("no spare file in %s: %s", self.directory, exc)
                return
            with self._lock:
                if self._closed:
                    path.unlink(missing_ok=True)
                    return
                self._ready.append(path)


class _Refiller:
    """The one thread that makes spares, for every directory."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[SpareFiles] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def ask(self, spares: SpareFiles) -> None:
        self._queue.put(spares)
        if self._thread is None:
            with self._start:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="litefs-spares", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        while True:
            spares = self._queue.get()
            try:
                spares.refill()
            except Exception:  # commits create their files themselves meanwhile
                log.exception("making spare files in %s failed", spares.directory)


_REFILLER = _Refiller()
