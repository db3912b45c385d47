"""The etcd lease against a real etcd: election, renewal, hand-off, watches, outages."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import math
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

import pytest
from etcd_server import EtcdServer, dead_url, etcd_server, shared_etcd_server

from litefs.lease import LeaseError, LeaseLost, PrimaryExists, PrimaryInfo, Standing, etcd
from litefs.lease.etcd import EtcdLease, EtcdLeaser, EtcdUnavailable

__all__ = ["etcd_server", "shared_etcd_server"]

TTL = 2.0
PROMPT = 0.5
T = TypeVar("T")
_keys = itertools.count()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 45))


def unique_key() -> str:
    return f"/litefs/test/{time.monotonic_ns()}-{next(_keys)}"


def etcd_post(server: EtcdServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """Act on etcd behind the leasers' backs, as an operator with etcdctl would."""
    request = urllib.request.Request(
        server.url + path, data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        answer: dict[str, Any] = json.load(resp)
        return answer


def lease_ids(server: EtcdServer) -> set[int]:
    return {
        int(lease["ID"]) for lease in etcd_post(server, "/v3/lease/leases", {}).get("leases", [])
    }


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@asynccontextmanager
async def leasers(
    endpoints: list[str], key: str, *names: str, ttl: float = TTL
) -> AsyncIterator[list[EtcdLeaser]]:
    made = [EtcdLeaser(endpoints, key, ttl, name, f"http://{name}:20202") for name in names]
    try:
        yield made
    finally:
        for leaser in made:
            await leaser.close()


class Watcher:
    """Collects what `watch()` yields, with arrival times, in a background task."""

    def __init__(self, leaser: EtcdLeaser) -> None:
        self.queue: asyncio.Queue[tuple[float, PrimaryInfo | None]] = asyncio.Queue()
        self._leaser = leaser
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        async for info in self._leaser.watch():
            self.queue.put_nowait((time.monotonic(), info))

    async def next(self, timeout: float = 5.0) -> tuple[float, PrimaryInfo | None]:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def expect(self, info: PrimaryInfo | None, since: float, within: float) -> float:
        """Wait for `info` to be reported; return how long after `since` it arrived."""
        at, got = await self.next(timeout=within + 5)
        assert got == info
        assert at - since < within, f"watch reported {info} after {at - since:.3f} s"
        return at - since


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float) -> float:
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def acquired(leaser: EtcdLeaser) -> bool:
    try:
        lease = await leaser.acquire()
    except PrimaryExists:
        return False
    await lease.release()
    return True


def test_second_leaser_sees_the_first_as_primary(shared_etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        key = unique_key()
        async with leasers([shared_etcd_server.url], key, "node-a", "node-b") as (a, b):
            assert await b.primary_info() is None
            lease = await a.acquire()
            assert isinstance(lease, EtcdLease)
            assert lease.ttl == TTL
            assert lease.renew_interval == pytest.approx(TTL / 3)
            before = lease_ids(shared_etcd_server)
            with pytest.raises(PrimaryExists) as caught:
                await b.acquire()
            assert caught.value.info == a.info
            assert await b.primary_info() == a.info
            assert lease_ids(shared_etcd_server) - before == set(), "loser's lease not revoked"
            await lease.release()

    run(scenario())


def test_sub_minimum_ttl_reports_what_etcd_granted(shared_etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        async with leasers([shared_etcd_server.url], unique_key(), "a", ttl=0.3) as (a,):
            lease = await a.acquire()
            assert lease.ttl >= 1
            await lease.release()

    run(scenario())


def test_keepalive_holds_the_lease_past_its_ttl(shared_etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        async with leasers([shared_etcd_server.url], unique_key(), "a", "b") as (a, b):
            lease = await a.acquire()
            first_deadline = lease.deadline
            held_until = time.monotonic() + 2 * TTL
            while time.monotonic() < held_until:
                await asyncio.sleep(lease.renew_interval)
                before = time.monotonic()
                await lease.renew()
                assert lease.renewed_at <= before + 0.001
                assert not lease.expired()
            assert lease.deadline > first_deadline + TTL
            with pytest.raises(PrimaryExists):
                await b.acquire()
            assert await b.primary_info() == a.info
            await lease.release()

    run(scenario())


def test_release_hands_over_at_once(shared_etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        async with leasers([shared_etcd_server.url], unique_key(), "a", "b") as (a, b):
            lease = await a.acquire()
            with pytest.raises(PrimaryExists):
                await b.acquire()
            started = time.monotonic()
            await lease.release()
            second = await b.acquire()
            elapsed = time.monotonic() - started
            assert elapsed < PROMPT, f"hand-over took {elapsed:.3f} s"
            assert await a.primary_info() == b.info
            with pytest.raises(LeaseLost):
                await lease.renew()
            await second.release()

    run(scenario())


def test_an_adopted_lease_names_its_new_holder_and_the_key_is_never_free(
    shared_etcd_server: EtcdServer,
) -> None:
    async def scenario() -> None:
        key = unique_key()
        async with leasers([shared_etcd_server.url], key, "a", "b", "c") as (a, b, c):
            lease = await a.acquire()
            created = etcd_post(shared_etcd_server, "/v3/kv/range", {"key": b64(key)})["kvs"][0]
            taken = await b.adopt(lease.handle)
            assert taken.id == lease.id
            assert await c.primary_info() == b.info
            kv = etcd_post(shared_etcd_server, "/v3/kv/range", {"key": b64(key)})["kvs"][0]
            assert kv["create_revision"] == created["create_revision"]
            with pytest.raises(PrimaryExists):
                await c.acquire()
            await taken.renew()
            await taken.release()
            assert await c.primary_info() is None

    run(scenario())


def test_a_lease_that_ended_cannot_be_adopted(shared_etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        async with leasers([shared_etcd_server.url], unique_key(), "a", "b") as (a, b):
            lease = await a.acquire()
            await lease.release()
            with pytest.raises(LeaseLost, match="expired or was revoked"):
                await b.adopt(lease.handle)
            assert await b.primary_info() is None

    run(scenario())


def test_a_lease_no_longer_holding_the_key_cannot_be_adopted(
    shared_etcd_server: EtcdServer,
) -> None:
    async def scenario() -> None:
        key = unique_key()
        async with leasers([shared_etcd_server.url], key, "a", "b", "c") as (a, b, c):
            lease = await a.acquire()
            etcd_post(shared_etcd_server, "/v3/kv/deleterange", {"key": b64(key)})
            held = await c.acquire()
            with pytest.raises(PrimaryExists) as raised:
                await b.adopt(lease.handle)
            assert raised.value.info == c.info
            await held.release()

    run(scenario())


def test_unrenewed_lease_expires_after_ttl_and_renew_reports_it_lost(
    shared_etcd_server: EtcdServer,
) -> None:
    async def scenario() -> None:
        async with leasers([shared_etcd_server.url], unique_key(), "a", "b") as (a, b):
            lease = await a.acquire()
            waited = await until(lambda: acquired(b), timeout=TTL + 3)
            assert waited >= TTL - 0.6, f"lease vanished after only {waited:.2f} s"
            assert lease.expired()
            with pytest.raises(LeaseLost):
                await lease.renew()

    run(scenario())


def test_renew_reports_a_lease_revoked_behind_our_back(shared_etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        async with leasers([shared_etcd_server.url], unique_key(), "a") as (a,):
            lease = await a.acquire()
            etcd_post(shared_etcd_server, "/v3/lease/revoke", {"ID": str(lease.id)})
            assert not lease.expired()
            with pytest.raises(LeaseLost, match="expired or was revoked"):
                await lease.renew()

    run(scenario())


def test_renew_reports_a_key_deleted_or_taken_behind_our_back(
    shared_etcd_server: EtcdServer,
) -> None:
    async def scenario() -> None:
        key = unique_key()
        async with leasers([shared_etcd_server.url], key, "a") as (a,):
            lease = await a.acquire()
            await lease.renew()
            etcd_post(shared_etcd_server, "/v3/kv/deleterange", {"key": b64(key)})
            with pytest.raises(LeaseLost, match="deleted"):
                await lease.renew()
            await lease.release()

            lease = await a.acquire()
            value = b64(json.dumps({"hostname": "x", "advertise-url": "http://x"}))
            etcd_post(shared_etcd_server, "/v3/kv/put", {"key": b64(key), "value": value})
            with pytest.raises(LeaseLost, match="belongs to lease 0"):
                await lease.renew()
            await lease.release()

    run(scenario())


def test_watch_reports_changes_promptly(shared_etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        key = unique_key()
        async with (
            leasers([shared_etcd_server.url], key, "a", "b", "watcher") as (a, b, w),
            Watcher(w) as watcher,
        ):
            _, first = await watcher.next()
            assert first is None

            started = time.monotonic()
            lease_a = await a.acquire()
            await watcher.expect(a.info, started, PROMPT)

            started = time.monotonic()
            await lease_a.release()
            await watcher.expect(None, started, PROMPT)

            started = time.monotonic()
            lease_b = await b.acquire()
            await watcher.expect(b.info, started, PROMPT)

            expires = lease_b.deadline
            await watcher.expect(None, expires, 1.0)
            assert watcher.queue.empty()

    run(scenario())


def test_watch_starts_with_the_current_primary(shared_etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        async with leasers([shared_etcd_server.url], unique_key(), "a", "w") as (a, w):
            lease = await a.acquire()
            async with Watcher(w) as watcher:
                _, first = await watcher.next(timeout=PROMPT)
                assert first == a.info
            await lease.release()

    run(scenario())


def test_idle_watch_reconnects_without_losing_changes(
    shared_etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(etcd, "WATCH_IDLE_RECONNECT", 0.2)

    async def scenario() -> None:
        async with (
            leasers([shared_etcd_server.url], unique_key(), "a", "w") as (a, w),
            Watcher(w) as watcher,
        ):
            assert (await watcher.next())[1] is None
            await asyncio.sleep(1.0)
            assert watcher.queue.empty()
            started = time.monotonic()
            lease = await a.acquire()
            await watcher.expect(a.info, started, PROMPT)
            await asyncio.sleep(0.5)
            started = time.monotonic()
            await lease.release()
            await watcher.expect(None, started, PROMPT)

    run(scenario())


def test_requests_fail_over_to_the_next_endpoint(shared_etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        dead = dead_url()
        endpoints = [dead, shared_etcd_server.url]
        async with leasers(endpoints, unique_key(), "a", "b") as (a, b):
            lease = await a.acquire()
            assert a.endpoint == shared_etcd_server.url
            await lease.renew()
            assert await b.primary_info() == a.info
            async with Watcher(b) as watcher:
                _, first = await watcher.next(timeout=PROMPT)
                assert first == a.info
                started = time.monotonic()
                await lease.release()
                await watcher.expect(None, started, PROMPT)

    run(scenario())


def test_unreachable_etcd_names_every_endpoint_tried() -> None:
    async def scenario() -> None:
        endpoints = [dead_url(), dead_url()]
        async with leasers(endpoints, unique_key(), "a") as (a,):
            started = time.monotonic()
            with pytest.raises(EtcdUnavailable) as caught:
                await a.acquire()
            assert time.monotonic() - started < 1.0
            message = str(caught.value)
            for url in endpoints:
                assert f"{url} (connection refused)" in message
            assert isinstance(caught.value, LeaseError)
            with pytest.raises(EtcdUnavailable):
                await a.primary_info()

    run(scenario())


def test_short_etcd_outage_is_ridden_out(etcd_server: EtcdServer) -> None:
    ttl = 6.0

    async def scenario() -> None:
        async with leasers([etcd_server.url], unique_key(), "a", "w", ttl=ttl) as (a, w):
            lease = await a.acquire()
            async with Watcher(w) as watcher:
                assert (await watcher.next())[1] == a.info
                etcd_server.stop()
                with pytest.raises(LeaseError) as caught:
                    await lease.renew()
                assert not isinstance(caught.value, LeaseLost)
                assert etcd_server.url in str(caught.value)
                assert "connection refused" in str(caught.value)
                await asyncio.to_thread(etcd_server.start)
                assert not lease.expired(), "etcd restart took longer than the test allows"
                await lease.renew()
                started = time.monotonic()
                await lease.release()
                await watcher.expect(None, started, PROMPT + 1.0)

    run(scenario())


def test_lease_that_ran_out_during_an_outage_is_lost(etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        async with leasers([etcd_server.url], unique_key(), "a", "b", "w") as (a, b, w):
            lease = await a.acquire()
            async with Watcher(w) as watcher:
                assert (await watcher.next())[1] == a.info
                etcd_server.stop()
                with pytest.raises(EtcdUnavailable):
                    await lease.renew()
                await asyncio.sleep(max(0.0, lease.deadline - time.monotonic()) + 0.1)
                await asyncio.to_thread(etcd_server.start)

                remaining = etcd_post(etcd_server, "/v3/lease/timetolive", {"ID": str(lease.id)})
                assert int(remaining["TTL"]) > 0, "etcd no longer restores leases on restart"

                with pytest.raises(LeaseLost, match="deadline"):
                    await lease.renew()
                started = time.monotonic()
                second = await b.acquire()
                assert time.monotonic() - started < PROMPT
                _, seen = await watcher.next(timeout=PROMPT + 1.0)
                if seen is None:
                    _, seen = await watcher.next(timeout=PROMPT)
                assert seen == b.info
                await second.release()

    run(scenario())


def test_candidates_read_each_others_latest_standing(shared_etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        key = unique_key()
        async with leasers([shared_etcd_server.url], key, "node-a", "node-b") as (a, b):
            assert await a.standings() == []
            assert await a.publish_standing(Standing("node-a", -math.inf, 100.0))
            assert await b.publish_standing(Standing("node-b", 41.5, 101.0))
            assert await b.publish_standing(Standing("node-b", 42.5, 102.0))
            assert sorted(await a.standings(), key=lambda s: s.hostname) == [
                Standing("node-a", -math.inf, 100.0),
                Standing("node-b", 42.5, 102.0),
            ]
            assert await b.primary_info() is None, "standings are not the lease key"

    run(scenario())


def test_a_foreign_value_beside_the_standings_is_skipped(shared_etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        key = unique_key()
        async with leasers([shared_etcd_server.url], key, "node-a") as (a,):
            etcd_post(
                shared_etcd_server,
                "/v3/kv/put",
                {"key": b64(f"{key}/standing/junk"), "value": b64("not json")},
            )
            await a.publish_standing(Standing("node-a", 7.0, 8.0))
            assert await a.standings() == [Standing("node-a", 7.0, 8.0)]

    run(scenario())
