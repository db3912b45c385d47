"""Bad input from the network never reaches a replica's database.

A scripted primary answers each of the replica's connections with one kind
of damage; the replica must reject each with one clear log line, reconnect,
and end up with exactly what the one good connection sent.
"""

from __future__ import annotations

import asyncio
import io
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web
from conftest import StartNode
from node_process import free_port

from litefs import ltx
from litefs.http import protocol
from litefs.http.protocol import FrameType

pytestmark = pytest.mark.fuse


def snapshot_of(tmp_path: Path, rows: int) -> tuple[bytes, bytes]:
    """A small SQLite database and the LTX snapshot of it."""
    path = tmp_path / f"source-{rows}.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(rows)])
    conn.commit()
    conn.close()
    out = io.BytesIO()
    ltx.encode_snapshot(path, out, txid=1, timestamp=1_700_000_000_000)
    return path.read_bytes(), out.getvalue()


def ltx_frame(name: str, data: bytes) -> bytes:
    return (
        protocol.frame(FrameType.LTX, name.encode()) + protocol.chunk(data) + protocol.END_OF_FILE
    )


class ScriptedPrimary:
    """Answers the n-th stream request with the n-th script; the last repeats."""

    def __init__(self, scripts: list[bytes | tuple[bytes, str]]) -> None:
        self.scripts = scripts
        self.requests = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = "scripted"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None

    async def stream(self, request: web.Request) -> web.StreamResponse:
        script = self.scripts[min(self.requests, len(self.scripts) - 1)]
        self.requests += 1
        response = web.StreamResponse(headers={"Content-Type": protocol.CONTENT_TYPE})
        await response.prepare(request)
        data, ending = script if isinstance(script, tuple) else (script, "heartbeat")
        await response.write(data)
        if ending == "close":
            assert request.transport is not None
            request.transport.close()
            return response
        try:
            while True:
                await asyncio.sleep(0.5)
                await response.write(protocol.frame(FrameType.HEARTBEAT))
        except ConnectionError:
            return response

    def _run(self) -> None:
        async def main() -> None:
            app = web.Application()
            app.router.add_post(protocol.STREAM_PATH, self.stream)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._stop = asyncio.Event()
            self._started.set()
            await self._stop.wait()
            await runner.cleanup()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())

    def __enter__(self) -> ScriptedPrimary:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def good_snapshot(tmp_path: Path) -> tuple[bytes, bytes]:
    return snapshot_of(tmp_path, 50)


def damaged_scripts(good: bytes, tmp_path: Path) -> Iterator[tuple[str, bytes | tuple[bytes, str]]]:
    corrupt = bytearray(good)
    corrupt[len(corrupt) // 2] ^= 0xFF
    yield "rejected LTX file for my.db", ltx_frame("my.db", bytes(corrupt))
    truncated = protocol.frame(FrameType.LTX, b"my.db") + protocol.chunk(good)[: len(good) // 2]
    yield "ended in the middle of a frame", (truncated, "close")
    yield "unknown frame type", protocol.frame(FrameType.READY)[:0] + b"Z\x00\x00\x00\x00"
    yield "exceeds", b"L\x00\x01\x00\x00"
    yield "no valid database", ltx_frame("../escape", good)

    _, other = snapshot_of(tmp_path, 7)
    header = ltx.Header.unpack(other[: ltx.HEADER_SIZE])
    assert header.is_snapshot
    yield "rejected LTX file for my.db", ltx_frame("my.db", other[:-20] + bytes(20))


def test_damaged_streams_are_rejected_and_the_replica_recovers(
    start_node: StartNode, tmp_path: Path, good_snapshot: tuple[bytes, bytes]
) -> None:
    database, good = good_snapshot
    damages = list(damaged_scripts(good, tmp_path))
    scripts: list[bytes | tuple[bytes, str]] = [script for _, script in damages]
    scripts.append(ltx_frame("my.db", good) + protocol.frame(FrameType.READY))

    with ScriptedPrimary(scripts) as fake:
        replica = start_node(
            "replica", candidate=False, primary=SimpleNamespace(name=fake.name, url=fake.url)
        )
        deadline = time.monotonic() + 60
        while fake.requests < len(scripts) or not (replica.mount_dir / "my.db").exists():
            assert time.monotonic() < deadline, replica.log()
            assert not (replica.db_dir("my.db")).exists() or fake.requests == len(scripts)
            time.sleep(0.01)

        log = replica.log()
        for expected, _ in damages:
            assert expected in log, f"no log line saying {expected!r}:\n{log}"
        assert "Traceback" not in log
        assert (replica.db_dir("my.db") / "database").read_bytes() == database
        assert [p.name for p in replica.ltx_files("my.db")] == [
            "0000000000000001-0000000000000001.ltx"
        ]
        assert replica.sqlite("my.db", "SELECT count(*) FROM t;").stdout.strip() == "50"


def test_file_that_does_not_follow_the_replica_is_not_applied(
    start_node: StartNode, tmp_path: Path, good_snapshot: tuple[bytes, bytes]
) -> None:
    database, good = good_snapshot
    # An incremental file (TXID 2) whose pre-apply checksum matches nothing the replica has.
    source = tmp_path / "source-50.db"
    out = io.BytesIO()
    page_size = 4096
    header = ltx.Header(
        flags=0,
        page_size=page_size,
        commit=len(database) // page_size,
        min_txid=2,
        max_txid=2,
        timestamp=1_700_000_000_000,
        pre_apply_checksum=ltx.CHECKSUM_FLAG | 0x1234,
    )
    encoder = ltx.Encoder(out, header)
    page = source.read_bytes()[:page_size]
    encoder.write_page(1, page)
    checksums = ltx.page_checksums(io.BytesIO(database), page_size, len(database) // page_size)
    encoder.finish(ltx.checksum_of(checksums))
    wrong = out.getvalue()

    scripts: list[bytes | tuple[bytes, str]] = [
        ltx_frame("my.db", good) + ltx_frame("my.db", wrong),
        ltx_frame("my.db", good) + protocol.frame(FrameType.READY),
    ]
    with ScriptedPrimary(scripts) as fake:
        replica = start_node(
            "replica", candidate=False, primary=SimpleNamespace(name=fake.name, url=fake.url)
        )
        deadline = time.monotonic() + 60
        while "pre-apply checksum mismatch" not in replica.log() or fake.requests < 2:
            assert time.monotonic() < deadline, replica.log()
            time.sleep(0.05)
        time.sleep(0.5)
        assert (replica.db_dir("my.db") / "database").read_bytes() == database
        assert [p.name for p in replica.ltx_files("my.db")] == [
            "0000000000000001-0000000000000001.ltx"
        ]
