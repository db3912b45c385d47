"""The Consul lease against the Consul emulator (or a real Consul via CONSUL_HTTP_ADDR)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import pytest
from consul_emulator import (
    ConsulTarget,
    consul_target,
    real_consul_url,
    unique_prefix,
)

from litefs.lease import LeaseError, LeaseLost, PrimaryExists, PrimaryInfo, Standing
from litefs.lease.consul import ConsulLeaser, ConsulUnreachable

REAL = real_consul_url() is not None
emulator_only = pytest.mark.skipif(REAL, reason="needs the emulator's fault injection")
FAST_TTL = 0.5
PROMPT = 0.5
_Test = TypeVar("_Test", bound=Callable[..., None])


def waits_for_ttl(test: _Test) -> _Test:
    """Against a real Consul the TTL is at least 10s and expiry may take twice that."""
    return pytest.mark.slow(test) if REAL else test


class Cluster:
    """Leasers of one test, all competing for one fresh key."""

    def __init__(self, target: ConsulTarget) -> None:
        self.target = target
        self.prefix = unique_prefix()
        self.key = self.prefix + "primary"
        self.ttl = target.ttl(FAST_TTL)
        self._leasers: list[ConsulLeaser] = []
        self._http = aiohttp.ClientSession()

    def leaser(self, name: str, **options: Any) -> ConsulLeaser:
        options.setdefault("ttl", self.ttl)
        options.setdefault("lock_delay", 0.0)
        leaser = ConsulLeaser(
            url=self.target.url,
            key=self.key,
            hostname=f"{name}-{self.prefix.split('/')[1][:8]}",
            advertise_url=f"http://{name}.test:20202",
            **options,
        )
        self._leasers.append(leaser)
        return leaser

    async def raw(self, method: str, path: str, **params: str) -> tuple[int, Any]:
        async with self._http.request(
            method, self.target.url + path, params=params, timeout=aiohttp.ClientTimeout(total=10)
        ) as response:
            body = await response.json(content_type=None) if response.status == 200 else None
            return response.status, body

    async def sessions_named(self, hostname: str) -> list[dict[str, Any]]:
        _, sessions = await self.raw("GET", "/v1/session/list")
        return [s for s in sessions or [] if s.get("Name") == f"litefs-{hostname}"]

    async def close(self) -> None:
        for leaser in self._leasers:
            await leaser.close()
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            await self.raw("DELETE", f"/v1/kv/{self.prefix}", recurse="")
        await self._http.close()


def run(scenario: Callable[[Cluster], Awaitable[None]], **emulator_options: Any) -> None:
    emulator_options.setdefault("min_ttl", 0.1)

    async def main() -> None:
        async with consul_target(**emulator_options) as target:
            cluster = Cluster(target)
            try:
                await scenario(cluster)
            finally:
                await cluster.close()

    asyncio.run(main())


async def next_within(watch: AsyncIterator[PrimaryInfo | None], seconds: float) -> Any:
    return await asyncio.wait_for(anext(watch), seconds)


def test_second_node_sees_the_first_as_primary() -> None:
    async def scenario(cluster: Cluster) -> None:
        a, b = cluster.leaser("a"), cluster.leaser("b")
        lease = await a.acquire()
        with pytest.raises(PrimaryExists) as exists:
            await b.acquire()
        assert exists.value.info == PrimaryInfo(a.hostname, a.advertise_url)
        assert await b.primary_info() == PrimaryInfo(a.hostname, a.advertise_url)
        assert await cluster.sessions_named(b.hostname) == []
        await lease.release()

    run(scenario)


def test_acquire_takes_renewed_at_before_the_request() -> None:
    async def scenario(cluster: Cluster) -> None:
        before = time.monotonic()
        lease = await cluster.leaser("a").acquire()
        after = time.monotonic()
        assert before <= lease.renewed_at <= after
        assert lease.deadline == lease.renewed_at + cluster.ttl
        assert lease.renew_interval == cluster.ttl / 2
        await lease.release()

    run(scenario)


@waits_for_ttl
def test_renewing_keeps_the_lease_past_its_ttl() -> None:
    async def scenario(cluster: Cluster) -> None:
        a, b = cluster.leaser("a"), cluster.leaser("b")
        lease = await a.acquire()
        end = time.monotonic() + 2.5 * cluster.ttl
        while time.monotonic() < end:
            await asyncio.sleep(lease.renew_interval)
            before = time.monotonic()
            await lease.renew()
            assert before <= lease.renewed_at <= time.monotonic()
            assert not lease.expired()
        with pytest.raises(PrimaryExists):
            await b.acquire()
        await lease.release()

    run(scenario)


def test_release_lets_another_node_acquire_at_once() -> None:
    async def scenario(cluster: Cluster) -> None:
        a = cluster.leaser("a", lock_delay=10.0)
        b = cluster.leaser("b", lock_delay=10.0)
        lease = await a.acquire()
        await lease.release()
        assert await a.primary_info() is None
        assert await cluster.sessions_named(a.hostname) == []
        started = time.monotonic()
        successor = await b.acquire()
        assert time.monotonic() - started < 1.0
        assert await a.primary_info() == PrimaryInfo(b.hostname, b.advertise_url)
        with pytest.raises(LeaseLost):
            await lease.renew()
        await lease.release()
        await successor.release()

    run(scenario)


def test_an_adopted_lease_names_its_new_holder_and_the_key_is_never_unlocked() -> None:
    async def scenario(cluster: Cluster) -> None:
        a = cluster.leaser("a", lock_delay=10.0)
        b = cluster.leaser("b", lock_delay=10.0)
        c = cluster.leaser("c", lock_delay=10.0)
        lease = await a.acquire()
        _, before = await cluster.raw("GET", f"/v1/kv/{cluster.key}")
        taken = await b.adopt(lease.handle)
        assert taken.handle == lease.handle
        assert await c.primary_info() == PrimaryInfo(b.hostname, b.advertise_url)
        _, after = await cluster.raw("GET", f"/v1/kv/{cluster.key}")
        assert after[0]["Session"] == lease.handle
        assert after[0]["LockIndex"] == before[0]["LockIndex"]
        with pytest.raises(PrimaryExists):
            await c.acquire()
        await taken.renew()
        await taken.release()
        assert await c.primary_info() is None

    run(scenario)


def test_a_lease_that_ended_cannot_be_adopted() -> None:
    async def scenario(cluster: Cluster) -> None:
        a, b = cluster.leaser("a"), cluster.leaser("b")
        lease = await a.acquire()
        await lease.release()
        with pytest.raises(LeaseLost):
            await b.adopt(lease.handle)
        assert await b.primary_info() is None

    run(scenario)


def test_a_session_no_longer_holding_the_key_cannot_adopt_it() -> None:
    async def scenario(cluster: Cluster) -> None:
        a, b, c = cluster.leaser("a"), cluster.leaser("b"), cluster.leaser("c")
        lease = await a.acquire()
        await a._unlock(lease.handle)
        held = await c.acquire()
        with pytest.raises(PrimaryExists) as raised:
            await b.adopt(lease.handle)
        assert raised.value.info == PrimaryInfo(c.hostname, c.advertise_url)
        await held.release()
        await lease.release()

    run(scenario)


@waits_for_ttl
@pytest.mark.parametrize(
    "multiplier", [1.0, pytest.param(2.0, marks=emulator_only)], ids=["ttl", "2xttl"]
)
def test_a_silent_primary_loses_the_key_after_the_ttl_and_lock_delay_holds_off_the_next(
    multiplier: float,
) -> None:
    async def scenario(cluster: Cluster) -> None:
        lock_delay = 1.0
        a = cluster.leaser("a", lock_delay=lock_delay)
        b = cluster.leaser("b", lock_delay=lock_delay)
        lease = await a.acquire()

        await asyncio.sleep(max(0.0, lease.deadline - 0.1 - time.monotonic()))
        assert await b.primary_info() == PrimaryInfo(a.hostname, a.advertise_url)

        latest_expiry = lease.renewed_at + cluster.target.expiry_bound(cluster.ttl) + 1.0
        while await b.primary_info() is not None:
            assert time.monotonic() < latest_expiry, "key outlived the session TTL"
            await asyncio.sleep(0.02)
        gone_at = time.monotonic()
        assert gone_at >= lease.deadline
        status, _ = await cluster.raw("GET", f"/v1/kv/{cluster.key}")
        assert status == 404

        while True:
            try:
                successor = await b.acquire()
                break
            except PrimaryExists as exc:
                assert exc.info is None
                assert time.monotonic() < gone_at + lock_delay + 2.0
                await asyncio.sleep(0.05)
        assert time.monotonic() - gone_at >= lock_delay - 0.1
        await successor.release()

    run(scenario, ttl_multiplier=multiplier)


@waits_for_ttl
def test_renew_after_expiry_raises_lease_lost() -> None:
    async def scenario(cluster: Cluster) -> None:
        a = cluster.leaser("a")
        lease = await a.acquire()
        latest = lease.renewed_at + cluster.target.expiry_bound(cluster.ttl) + 1.0
        while await a.primary_info() is not None:
            assert time.monotonic() < latest
            await asyncio.sleep(0.05)
        with pytest.raises(LeaseLost):
            await lease.renew()

    run(scenario)


def test_renew_raises_lease_lost_when_the_key_was_deleted_by_hand() -> None:
    async def scenario(cluster: Cluster) -> None:
        lease = await cluster.leaser("a").acquire()
        status, _ = await cluster.raw("DELETE", f"/v1/kv/{cluster.key}")
        assert status == 200
        with pytest.raises(LeaseLost):
            await lease.renew()
        await lease.release()

    run(scenario)


def test_primary_info_is_none_without_a_holder() -> None:
    async def scenario(cluster: Cluster) -> None:
        a = cluster.leaser("a")
        assert await a.primary_info() is None
        lease = await a.acquire()
        assert await a.primary_info() == a.info
        await lease.release()
        status, _ = await cluster.raw("GET", f"/v1/kv/{cluster.key}")
        assert status in (200, 404)
        assert await a.primary_info() is None

    run(scenario)


def test_a_malformed_lease_value_is_a_lease_error() -> None:
    async def scenario(cluster: Cluster) -> None:
        _, created = await cluster.raw("PUT", "/v1/session/create")
        async with cluster._http.put(
            f"{cluster.target.url}/v1/kv/{cluster.key}",
            params={"acquire": created["ID"]},
            data=b"not json",
        ) as response:
            assert await response.json() is True
        with pytest.raises(LeaseError, match="malformed"):
            await cluster.leaser("a").primary_info()
        await cluster.raw("PUT", f"/v1/session/destroy/{created['ID']}")

    run(scenario)


def test_a_node_that_is_not_a_candidate_never_acquires() -> None:
    async def scenario(cluster: Cluster) -> None:
        with pytest.raises(LeaseError, match="not a candidate"):
            await cluster.leaser("r", candidate=False).acquire()

    run(scenario)


def test_settings_are_checked_when_the_leaser_is_made() -> None:
    good: dict[str, Any] = {
        "url": "http://127.0.0.1:8500",
        "key": "litefs/primary",
        "ttl": 10.0,
        "lock_delay": 1.0,
        "hostname": "a",
        "advertise_url": "http://a:20202",
    }
    ConsulLeaser(**good)
    for change in ({"url": "127.0.0.1:8500"}, {"key": "/"}, {"ttl": 0}, {"lock_delay": -1}):
        with pytest.raises(ValueError):
            ConsulLeaser(**(good | change))


def test_watch_yields_the_current_primary_then_each_change_promptly() -> None:
    async def scenario(cluster: Cluster) -> None:
        a, b = cluster.leaser("a"), cluster.leaser("b")
        watcher = cluster.leaser("w", candidate=False)
        watch = watcher.watch()
        assert await next_within(watch, PROMPT) is None

        changed = time.monotonic()
        lease = await a.acquire()
        assert await next_within(watch, PROMPT) == a.info
        assert time.monotonic() - changed < PROMPT

        changed = time.monotonic()
        await lease.release()
        assert await next_within(watch, PROMPT) is None
        assert time.monotonic() - changed < PROMPT

        changed = time.monotonic()
        successor = await b.acquire()
        assert await next_within(watch, PROMPT) == b.info
        assert time.monotonic() - changed < PROMPT
        await successor.release()
        await watch.aclose()

    run(scenario)


def test_watch_starts_with_a_primary_already_in_place() -> None:
    async def scenario(cluster: Cluster) -> None:
        a = cluster.leaser("a")
        lease = await a.acquire()
        watch = cluster.leaser("w").watch()
        assert await next_within(watch, PROMPT) == a.info
        await watch.aclose()
        await lease.release()

    run(scenario)


@emulator_only
def test_watch_blocks_instead_of_polling() -> None:
    async def scenario(cluster: Cluster) -> None:
        emulator = cluster.target.emulator
        assert emulator is not None
        a = cluster.leaser("a", ttl=10.0)
        watch = cluster.leaser("w").watch()
        assert await next_within(watch, PROMPT) is None
        reads_before = emulator.requests["GET kv"]
        pending = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(1.5)
        assert not pending.done()
        assert emulator.requests["GET kv"] - reads_before <= 1

        lease = await a.acquire()
        assert await asyncio.wait_for(pending, PROMPT) == a.info
        await asyncio.sleep(0.5)
        assert emulator.requests["GET kv"] - reads_before <= 3
        await watch.aclose()
        await lease.release()

    run(scenario)


@emulator_only
def test_watch_survives_an_outage_and_logs_it_sparingly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="litefs.lease.consul")

    async def scenario(cluster: Cluster) -> None:
        emulator = cluster.target.emulator
        assert emulator is not None
        a = cluster.leaser("a", ttl=10.0)
        watch = cluster.leaser("w").watch()
        assert await next_within(watch, PROMPT) is None
        pending = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.1)

        await emulator.refuse()
        await asyncio.sleep(1.5)
        assert not pending.done()
        await emulator.resume()
        lease = await a.acquire()
        assert await asyncio.wait_for(pending, 3.0) == a.info
        await watch.aclose()
        await lease.release()

    run(scenario)
    records = [r for r in caplog.records if r.name == "litefs.lease.consul"]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert 1 <= len(warnings) <= 2
    assert "unreachable" in warnings[0].getMessage()
    assert any("recovered" in r.getMessage() for r in records)


def test_unreachable_consul_is_a_lease_error_naming_the_url() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"

    async def scenario() -> None:
        leaser = ConsulLeaser(url, "litefs/primary", 10.0, 1.0, "a", "http://a:20202")
        try:
            with pytest.raises(ConsulUnreachable) as failure:
                await leaser.acquire()
            assert isinstance(failure.value, LeaseError)
            assert url in str(failure.value)
            assert "unreachable" in str(failure.value)
            assert "create a session" in str(failure.value)
            with pytest.raises(ConsulUnreachable, match="read key litefs/primary"):
                await leaser.primary_info()
        finally:
            await leaser.close()

    asyncio.run(scenario())


@emulator_only
def test_renew_while_consul_is_down_is_an_error_to_retry_not_a_lost_lease() -> None:
    async def scenario(cluster: Cluster) -> None:
        emulator = cluster.target.emulator
        assert emulator is not None
        lease = await cluster.leaser("a", ttl=5.0).acquire()
        renewed_at = lease.renewed_at
        await emulator.refuse()
        with pytest.raises(ConsulUnreachable) as failure:
            await lease.renew()
        assert not isinstance(failure.value, LeaseLost)
        assert "renew the session" in str(failure.value)
        assert lease.renewed_at == renewed_at
        await emulator.resume()
        await lease.renew()
        assert lease.renewed_at > renewed_at
        await lease.release()

    run(scenario)


@emulator_only
def test_a_consul_that_stops_answering_times_out() -> None:
    async def scenario(cluster: Cluster) -> None:
        emulator = cluster.target.emulator
        assert emulator is not None
        lease = await cluster.leaser("a", ttl=5.0, timeout=0.3).acquire()
        emulator.stall()
        started = time.monotonic()
        with pytest.raises(ConsulUnreachable, match=r"did not answer within 0\.3s"):
            await lease.renew()
        assert time.monotonic() - started < 1.0
        await emulator.resume()
        await lease.release()

    run(scenario)


@emulator_only
def test_an_acquire_that_fails_midway_leaves_no_session_behind() -> None:
    async def scenario(cluster: Cluster) -> None:
        emulator = cluster.target.emulator
        assert emulator is not None
        a = cluster.leaser("a")
        lease = await a.acquire()
        b = cluster.leaser("b")
        for _ in range(3):
            with pytest.raises(PrimaryExists):
                await b.acquire()
        assert await cluster.sessions_named(b.hostname) == []
        assert len(await cluster.sessions_named(a.hostname)) == 1
        await lease.release()
        assert await cluster.sessions_named(a.hostname) == []

    run(scenario)


def test_candidates_read_each_others_latest_standing() -> None:
    async def scenario(cluster: Cluster) -> None:
        a, b = cluster.leaser("a"), cluster.leaser("b")
        assert await a.standings() == []
        assert await a.publish_standing(Standing(a.hostname, -math.inf, 100.0))
        assert await b.publish_standing(Standing(b.hostname, 41.5, 101.0))
        assert await b.publish_standing(Standing(b.hostname, 42.5, 102.0))
        assert sorted(await a.standings(), key=lambda s: s.hostname) == [
            Standing(a.hostname, -math.inf, 100.0),
            Standing(b.hostname, 42.5, 102.0),
        ]
        assert await b.primary_info() is None, "standings are not the lease key"
        lease = await b.acquire()
        assert await a.primary_info() == b.info
        await lease.release()

    run(scenario)
