"""How far a replica trails its primary, on the primary's clock.

The lag decides whether a replica's proxy reports it healthy, and whether,
when the primary's lease is lost, the replica competes for the lease at once
or leaves it first to nodes that may hold commits it never received.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from pathlib import Path

from aiohttp import web
from node_process import free_port

from litefs.http import protocol
from litefs.http.client import Lag, ReplicaClient
from litefs.http.metrics import Metrics
from litefs.http.protocol import HEARTBEAT_INTERVAL
from litefs.store import Store


def test_a_replica_that_never_caught_up_is_infinitely_behind() -> None:
    lag = Lag()
    assert lag.behind(1000.0) == math.inf
    assert lag.behind_at_loss(1000.0) == math.inf


def test_a_heartbeat_within_its_interval_means_no_lag() -> None:
    lag = Lag()
    lag.heard(1000.0)
    assert lag.behind(1000.0 + HEARTBEAT_INTERVAL) == 0.0
    assert lag.behind(1000.0 + HEARTBEAT_INTERVAL + 2.5) == 2.5


def test_an_old_frame_read_late_does_not_make_the_replica_current() -> None:
    lag = Lag()
    lag.heard(1000.0)
    lag.heard(990.0)  # a commit timestamp from a file that sat in a buffer
    assert lag.current_at == 1000.0


def test_a_primary_seen_going_away_stops_the_lag_growing_at_the_loss() -> None:
    lag = Lag()
    lag.heard(1000.0)
    lag.primary_gone(1000.5)
    lag.primary_gone(1003.0)  # failed reconnections say nothing new
    assert lag.behind_at_loss(1010.0) == 0.0
    assert lag.behind(1010.0) == 10.0 - HEARTBEAT_INTERVAL


def test_a_primary_that_went_silent_may_have_committed_until_its_lease_was_lost() -> None:
    lag = Lag()
    lag.heard(1000.0)
    assert lag.behind_at_loss(1010.0) == 10.0 - HEARTBEAT_INTERVAL


def test_reconnecting_forgets_that_the_primary_went_away() -> None:
    lag = Lag()
    lag.heard(1000.0)
    lag.primary_gone(1001.0)
    lag.connected()
    assert lag.behind_at_loss(1010.0) == 10.0 - HEARTBEAT_INTERVAL


def refusing_primary(answer: dict[str, object]) -> web.Application:
    async def stream(request: web.Request) -> web.Response:
        return web.json_response(answer, status=503)

    app = web.Application()
    app.router.add_post(protocol.STREAM_PATH, stream)
    return app


def streaming_primary(ready: bool) -> web.Application:
    """A primary that streams heartbeats, after READY or without it (as while
    a replica is still catching up)."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": protocol.CONTENT_TYPE})
        await response.prepare(request)
        if ready:
            await response.write(protocol.clock_frame(protocol.FrameType.READY, time.time()))
        with contextlib.suppress(ConnectionError):
            while True:
                await response.write(
                    protocol.clock_frame(protocol.FrameType.HEARTBEAT, time.time())
                )
                await asyncio.sleep(0.1)
        return response

    app = web.Application()
    app.router.add_post(protocol.STREAM_PATH, stream)
    return app


def follow_for_a_while(tmp_path: Path, app: web.Application) -> ReplicaClient:
    """A replica client after following the node `app` serves for half a second."""

    async def run() -> ReplicaClient:
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        store = Store(tmp_path / "data")
        store.open()
        client = ReplicaClient(store, "replica", Metrics(store))
        following = asyncio.create_task(client.follow(f"http://127.0.0.1:{port}"))
        try:
            await asyncio.sleep(0.5)
        finally:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
            await runner.cleanup()
            store.close()
        return client

    return asyncio.run(run())


def test_a_node_that_says_it_is_not_the_primary_counts_as_gone(tmp_path: Path) -> None:
    answer = {"error": "this node is not the primary", "primary": None}
    client = follow_for_a_while(tmp_path, refusing_primary(answer))
    assert client.lag.gone_at is not None


def test_a_primary_that_is_busy_does_not_count_as_gone(tmp_path: Path) -> None:
    answer = {"error": "too many streams (at most 64)"}
    client = follow_for_a_while(tmp_path, refusing_primary(answer))
    assert client.lag.gone_at is None


def test_a_replica_still_catching_up_missed_commits_whatever_its_clock(tmp_path: Path) -> None:
    client = follow_for_a_while(tmp_path, streaming_primary(ready=False))
    client.lag.heard(time.time())  # as a node that just stepped down as primary
    assert client.behind_at_loss(time.time()) == math.inf


def test_a_caught_up_replica_that_hears_heartbeats_missed_nothing(tmp_path: Path) -> None:
    client = follow_for_a_while(tmp_path, streaming_primary(ready=True))
    assert client.behind_at_loss(time.time()) == 0.0
