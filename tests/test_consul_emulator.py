"""Consul's documented session and KV behaviour, pinned against the emulator.

With CONSUL_HTTP_ADDR set, the same checks run against that Consul instead
(fault injection excepted), which is how the emulator is kept honest.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from consul_emulator import (
    ConsulEmulator,
    ConsulTarget,
    ThreadedConsulEmulator,
    consul_target,
    format_duration,
    parse_duration,
    real_consul_url,
    unique_prefix,
)

REAL = real_consul_url() is not None
emulator_only = pytest.mark.skipif(REAL, reason="needs the emulator's fault injection")
FAST_TTL = 0.4
SLACK = 0.25


def waits_for_ttl(test: Callable[[], None]) -> Callable[[], None]:
    """Against a real Consul, TTL tests last up to twice 10s."""
    return pytest.mark.slow(test) if REAL else test


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def index(self) -> int:
        return int(self.headers["X-Consul-Index"])


class Api:
    """Plain HTTP calls, so the tests state Consul's API and nothing of ours."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = unique_prefix()
        self._sessions: list[str] = []
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        self._http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            for session_id in self._sessions:
                await self.call("PUT", f"/v1/session/destroy/{session_id}")
            await self.call("DELETE", f"/v1/kv/{self.prefix}", params={"recurse": ""})
        except aiohttp.ClientError:
            pass
        finally:
            assert self._http is not None
            await self._http.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        data: bytes | None = None,
        body: object = None,
        timeout: float = 10.0,
    ) -> Reply:
        assert self._http is not None
        if body is not None:
            data = json.dumps(body).encode()
        async with self._http.request(
            method,
            self.url + path,
            params=params,
            data=data,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            return Reply(response.status, dict(response.headers), await response.read())

    def key(self, name: str) -> str:
        return self.prefix + name

    async def session(
        self, ttl: float | None = None, lock_delay: str = "0s", behavior: str = "release"
    ) -> str:
        spec: dict[str, str] = {"Name": "test", "LockDelay": lock_delay, "Behavior": behavior}
        if ttl is not None:
            spec["TTL"] = format_duration(ttl)
        reply = await self.call("PUT", "/v1/session/create", body=spec)
        assert reply.status == 200, reply.body
        session_id: str = reply.json()["ID"]
        self._sessions.append(session_id)
        return session_id

    async def get(self, key: str, timeout: float = 10.0, **params: str) -> Reply:
        return await self.call("GET", f"/v1/kv/{key}", params=params, timeout=timeout)

    async def put(self, key: str, value: bytes = b"", **params: str) -> Reply:
        return await self.call("PUT", f"/v1/kv/{key}", params=params, data=value)

    async def acquire(self, key: str, session_id: str, value: bytes = b"") -> Any:
        return (await self.put(key, value, acquire=session_id)).json()

    async def entry(self, key: str) -> dict[str, Any] | None:
        reply = await self.get(key)
        if reply.status == 404:
            return None
        assert reply.status == 200, reply.body
        entry: dict[str, Any] = reply.json()[0]
        return entry


def run(scenario: Callable[[ConsulTarget, Api], Awaitable[None]], **emulator_options: Any) -> None:
    async def main() -> None:
        async with consul_target(**emulator_options) as target, Api(target.url) as api:
            await scenario(target, api)

    asyncio.run(main())


async def eventually(check: Callable[[], Awaitable[bool]], within: float) -> float:
    """Seconds until `check` held; fails after `within` seconds."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < within, "condition not reached in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def test_durations_parse_like_go() -> None:
    assert parse_duration("10s") == 10.0
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("250ms") == pytest.approx(0.25)
    assert parse_duration("0") == 0.0
    assert format_duration(10.0) == "10s"
    assert format_duration(0.4) == "400ms"
    for bad in ("", "10", "s", "1x", "1.5"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_session_create_returns_an_id_that_info_reports() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        session_id = await api.session(ttl=30.0, lock_delay="2s", behavior="delete")
        reply = await api.call("GET", f"/v1/session/info/{session_id}")
        assert reply.status == 200
        (info,) = reply.json()
        assert info["ID"] == session_id
        assert info["Behavior"] == "delete"
        assert info["LockDelay"] == 2_000_000_000
        assert parse_duration(info["TTL"]) == 30.0
        assert reply.index >= 1

    run(scenario)


def test_session_ttl_must_lie_between_10s_and_a_day() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        for bad in ("5s", "86401s", "forever"):
            reply = await api.call("PUT", "/v1/session/create", body={"TTL": bad})
            if REAL:
                assert reply.status >= 400, bad
            else:
                assert reply.status == 400, bad
        for good in (10.0, 86400.0):
            await api.session(ttl=good)

    run(scenario)


def test_lock_delay_numbers_below_1000_are_seconds_above_are_nanoseconds() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        for raw, nanoseconds in ((3, 3_000_000_000), (1_500_000_000, 1_500_000_000)):
            reply = await api.call("PUT", "/v1/session/create", body={"LockDelay": raw})
            session_id = reply.json()["ID"]
            info = (await api.call("GET", f"/v1/session/info/{session_id}")).json()[0]
            await api.call("PUT", f"/v1/session/destroy/{session_id}")
            assert info["LockDelay"] == nanoseconds

    run(scenario)


@waits_for_ttl
def test_session_is_invalidated_when_not_renewed_and_renew_then_404s() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        ttl = target.ttl(FAST_TTL)
        session_id = await api.session(ttl=ttl)
        created = time.monotonic()

        async def gone() -> bool:
            reply = await api.call("GET", f"/v1/session/info/{session_id}")
            return reply.json() in ([], None)

        elapsed = await eventually(gone, within=target.expiry_bound(ttl) + SLACK + 1.0)
        assert time.monotonic() - created >= ttl - 0.05
        assert elapsed <= target.expiry_bound(ttl) + SLACK + 1.0
        reply = await api.call("PUT", f"/v1/session/renew/{session_id}")
        assert reply.status == 404

    run(scenario, min_ttl=0.1)


@waits_for_ttl
def test_renewal_keeps_a_session_alive_past_its_ttl() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        ttl = target.ttl(FAST_TTL)
        session_id = await api.session(ttl=ttl)
        deadline = time.monotonic() + 2.5 * ttl
        while time.monotonic() < deadline:
            reply = await api.call("PUT", f"/v1/session/renew/{session_id}")
            assert reply.status == 200
            (renewed,) = reply.json()
            assert renewed["ID"] == session_id
            await asyncio.sleep(ttl / 3)

    run(scenario, min_ttl=0.1)


def test_renew_of_an_unknown_session_is_404() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        reply = await api.call("PUT", "/v1/session/renew/00000000-0000-0000-0000-000000000000")
        assert reply.status == 404

    run(scenario)


def test_acquire_with_an_unknown_session_is_a_500() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        reply = await api.put(api.key("k"), b"v", acquire="00000000-0000-0000-0000-000000000000")
        assert reply.status == 500
        assert b"session" in reply.body.lower()
        assert await api.entry(api.key("k")) is None

    run(scenario)


def test_acquire_and_release_rules() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        key = api.key("lock")
        first, second = await api.session(), await api.session()
        assert await api.acquire(key, first, b"one") is True
        entry = await api.entry(key)
        assert entry is not None
        assert entry["Session"] == first
        assert base64.b64decode(entry["Value"]) == b"one"
        assert entry["LockIndex"] == 1

        assert await api.acquire(key, second, b"two") is False
        assert await api.acquire(key, first, b"one again") is True
        entry = await api.entry(key)
        assert entry is not None
        assert base64.b64decode(entry["Value"]) == b"one again"
        assert entry["LockIndex"] == 1

        assert (await api.put(key, release=second)).json() is False
        assert (await api.put(key, release=first)).json() is True
        entry = await api.entry(key)
        assert entry is not None
        assert not entry.get("Session")
        assert (await api.put(key, release=first)).json() is False

        assert await api.acquire(key, second, b"two") is True
        entry = await api.entry(key)
        assert entry is not None
        assert entry["Session"] == second
        assert entry["LockIndex"] == 2

    run(scenario)


def test_plain_put_keeps_the_lock_and_cas_checks_the_modify_index() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        key = api.key("k")
        holder = await api.session()
        assert await api.acquire(key, holder, b"v1") is True
        assert (await api.put(key, b"v2")).json() is True
        entry = await api.entry(key)
        assert entry is not None
        assert entry["Session"] == holder
        assert base64.b64decode(entry["Value"]) == b"v2"

        assert (await api.put(key, b"v3", cas="0")).json() is False
        assert (await api.put(key, b"v3", cas=str(entry["ModifyIndex"] + 1000))).json() is False
        assert (await api.put(key, b"v3", cas=str(entry["ModifyIndex"]))).json() is True
        assert (await api.put(api.key("new"), b"x", cas="0")).json() is True

        entry = await api.entry(key)
        assert entry is not None
        deleted = await api.call("DELETE", f"/v1/kv/{key}", params={"cas": "1"})
        assert deleted.json() is False
        deleted = await api.call(
            "DELETE", f"/v1/kv/{key}", params={"cas": str(entry["ModifyIndex"])}
        )
        assert deleted.json() is True
        assert await api.entry(key) is None

    run(scenario)


def test_release_then_destroy_leaves_no_lock_delay() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        key = api.key("lock")
        holder, other = await api.session(lock_delay="10s"), await api.session()
        assert await api.acquire(key, holder) is True
        assert (await api.put(key, release=holder)).json() is True
        await api.call("PUT", f"/v1/session/destroy/{holder}")
        assert await api.acquire(key, other) is True

    run(scenario)


def test_destroying_the_holder_starts_lock_delay_and_releases_the_key() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        key = api.key("lock")
        lock_delay = 1.0
        holder = await api.session(lock_delay=format_duration(lock_delay))
        other = await api.session()
        assert await api.acquire(key, holder, b"held") is True
        destroyed = await api.call("PUT", f"/v1/session/destroy/{holder}")
        assert destroyed.status == 200
        start = time.monotonic()
        entry = await api.entry(key)
        assert entry is not None
        assert not entry.get("Session")
        assert base64.b64decode(entry["Value"]) == b"held"
        assert await api.acquire(key, other) is False

        async def acquired() -> bool:
            return bool(await api.acquire(key, other))

        await eventually(acquired, within=lock_delay + 2.0)
        assert time.monotonic() - start >= lock_delay - 0.1

    run(scenario)


def test_lock_delay_applies_even_to_a_session_that_does_not_exist() -> None:
    """Consul checks lock-delay before it looks the session up."""

    async def scenario(target: ConsulTarget, api: Api) -> None:
        key = api.key("lock")
        holder = await api.session(lock_delay="5s")
        assert await api.acquire(key, holder) is True
        await api.call("PUT", f"/v1/session/destroy/{holder}")
        reply = await api.put(key, acquire="00000000-0000-0000-0000-000000000000")
        assert reply.status == 200
        assert reply.json() is False

    run(scenario)


@waits_for_ttl
def test_expiry_with_release_behavior_keeps_the_key_unlocked_under_lock_delay() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        key = api.key("lock")
        ttl = target.ttl(FAST_TTL)
        holder = await api.session(ttl=ttl, lock_delay="1s", behavior="release")
        other = await api.session()
        assert await api.acquire(key, holder, b"held") is True
        before = await api.entry(key)
        assert before is not None

        async def unlocked() -> bool:
            entry = await api.entry(key)
            return entry is not None and not entry.get("Session")

        await eventually(unlocked, within=target.expiry_bound(ttl) + SLACK + 1.0)
        released_at = time.monotonic()
        after = await api.entry(key)
        assert after is not None
        assert after["ModifyIndex"] > before["ModifyIndex"]
        assert base64.b64decode(after["Value"]) == b"held"
        assert await api.acquire(key, other) is False

        async def acquired() -> bool:
            return bool(await api.acquire(key, other))

        await eventually(acquired, within=3.0)
        assert time.monotonic() - released_at >= 1.0 - 0.2

    run(scenario, min_ttl=0.1)


@waits_for_ttl
def test_expiry_with_delete_behavior_deletes_the_key() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        key = api.key("lock")
        ttl = target.ttl(FAST_TTL)
        holder = await api.session(ttl=ttl, lock_delay="0s", behavior="delete")
        assert await api.acquire(key, holder, b"held") is True

        async def deleted() -> bool:
            return await api.entry(key) is None

        await eventually(deleted, within=target.expiry_bound(ttl) + SLACK + 1.0)

    run(scenario, min_ttl=0.1)


@emulator_only
def test_ttl_multiplier_delays_invalidation_up_to_twice_the_ttl() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        session_id = await api.session(ttl=0.3)
        await asyncio.sleep(0.45)
        alive = await api.call("GET", f"/v1/session/info/{session_id}")
        assert alive.json() != []
        await asyncio.sleep(0.3)
        gone = await api.call("GET", f"/v1/session/info/{session_id}")
        assert gone.json() == []

    run(scenario, min_ttl=0.1, ttl_multiplier=2.0)


def test_missing_key_is_404_with_an_index() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        reply = await api.get(api.key("absent"))
        assert reply.status == 404
        assert reply.index >= 1

    run(scenario)


def test_blocking_query_returns_promptly_on_change() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        key = api.key("watched")
        await api.put(key, b"v1")
        first = await api.get(key)
        blocked = asyncio.create_task(api.get(key, index=str(first.index), wait="10s"))
        await asyncio.sleep(0.3)
        assert not blocked.done()
        changed_at = time.monotonic()
        await api.put(key, b"v2")
        reply = await blocked
        assert time.monotonic() - changed_at < 0.5
        assert reply.index > first.index
        assert base64.b64decode(reply.json()[0]["Value"]) == b"v2"

    run(scenario)


def test_blocking_query_on_a_missing_key_returns_when_it_is_created() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        key = api.key("later")
        missing = await api.get(key)
        blocked = asyncio.create_task(api.get(key, index=str(missing.index), wait="10s"))
        await asyncio.sleep(0.2)
        await api.put(key, b"here")
        reply = await asyncio.wait_for(blocked, 1.0)
        assert reply.status == 200

    run(scenario)


def test_blocking_query_returns_unchanged_when_the_wait_elapses() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        key = api.key("quiet")
        await api.put(key, b"v")
        first = await api.get(key)
        start = time.monotonic()
        reply = await api.get(key, index=str(first.index), wait="1s")
        elapsed = time.monotonic() - start
        assert 1.0 - 0.05 <= elapsed <= 1.0 + 1.0 / 16 + SLACK
        assert reply.status == 200
        assert reply.json()[0]["ModifyIndex"] == first.json()[0]["ModifyIndex"]

    run(scenario)


@emulator_only
def test_blocking_query_is_not_woken_by_other_keys() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        key = api.key("watched")
        await api.put(key, b"v")
        first = await api.get(key)
        blocked = asyncio.create_task(api.get(key, index=str(first.index), wait="1s"))
        await asyncio.sleep(0.1)
        await api.put(api.key("neighbour"), b"x")
        await asyncio.sleep(0.2)
        assert not blocked.done()
        await blocked

    run(scenario)


def test_consul_index_never_goes_backwards() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        key = api.key("k")
        session_id = await api.session()
        indexes = [(await api.get(key)).index]
        for step in range(3):
            await api.put(key, str(step).encode())
            indexes.append((await api.get(key)).index)
            await api.acquire(key, session_id)
            indexes.append((await api.get(key)).index)
            await api.put(key, release=session_id)
            indexes.append((await api.get(key)).index)
        await api.call("DELETE", f"/v1/kv/{key}")
        indexes.append((await api.get(key)).index)
        assert indexes == sorted(indexes)
        assert len(set(indexes)) == len(indexes)

    run(scenario)


@emulator_only
def test_refuse_cuts_open_connections_and_resume_restores_service() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        assert target.emulator is not None
        key = api.key("k")
        await api.put(key, b"v")
        first = await api.get(key)
        blocked = asyncio.create_task(api.get(key, index=str(first.index), wait="10s"))
        await asyncio.sleep(0.1)
        await target.emulator.refuse()
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(blocked, 2.0)
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.get(key)
        await target.emulator.resume()
        assert (await api.get(key)).status == 200

    run(scenario)


@emulator_only
def test_stall_answers_nothing_until_resumed() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        assert target.emulator is not None
        key = api.key("k")
        target.emulator.stall()
        with pytest.raises(TimeoutError):
            await api.get(key, timeout=0.3)
        late = asyncio.create_task(api.get(key))
        await asyncio.sleep(0.1)
        assert not late.done()
        await target.emulator.resume()
        assert (await asyncio.wait_for(late, 1.0)).status == 404

    run(scenario)


@emulator_only
def test_invalidate_session_acts_like_a_failed_health_check() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        assert target.emulator is not None
        key = api.key("lock")
        holder = await api.session(lock_delay="0s", behavior="delete")
        assert await api.acquire(key, holder) is True
        assert target.emulator.invalidate_session(holder) is True
        assert await api.entry(key) is None
        assert target.emulator.invalidate_session(holder) is False

    run(scenario)


@emulator_only
def test_emulator_counts_requests_by_kind() -> None:
    async def scenario(target: ConsulTarget, api: Api) -> None:
        assert target.emulator is not None
        await api.session()
        await api.get(api.key("k"))
        await api.get(api.key("k"))
        assert target.emulator.requests["PUT session/create"] == 1
        assert target.emulator.requests["GET kv"] == 2

    run(scenario)


@emulator_only
def test_emulator_rejects_a_multiplier_outside_consuls_range() -> None:
    with pytest.raises(ValueError):
        ConsulEmulator(ttl_multiplier=3.0)


@emulator_only
def test_threaded_emulator_serves_synchronous_callers() -> None:
    import urllib.error
    import urllib.request

    with ThreadedConsulEmulator(min_ttl=0.1) as emulator:
        request = urllib.request.Request(
            emulator.url + "/v1/session/create", data=b'{"TTL": "200ms"}', method="PUT"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            session_id = json.load(response)["ID"]
        assert session_id
        emulator.refuse()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(emulator.url + "/v1/kv/k", timeout=5)
        emulator.resume()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(emulator.url + "/v1/kv/k", timeout=5)
        assert missing.value.code == 404
        assert emulator.requests()["GET kv"] == 1


@emulator_only
def test_emulator_runs_as_a_process_with_remote_fault_control() -> None:
    import urllib.error
    import urllib.request

    script = Path(__file__).with_name("consul_emulator.py")
    process = subprocess.Popen(
        [sys.executable, str(script), "--addr", "127.0.0.1:0", "--min-ttl", "1s"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.removeprefix("listening on ")

        def put(path: str, body: bytes = b"") -> Any:
            request = urllib.request.Request(url + path, data=body, method="PUT")
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.load(response)

        assert put("/v1/session/create", b'{"TTL": "1s"}')["ID"]
        assert put("/_emulator/outage?mode=refuse&duration=500ms")["mode"] == "refuse"
        with pytest.raises(urllib.error.URLError):
            put("/v1/kv/k", b"v")
        time.sleep(0.8)
        assert put("/v1/kv/k", b"v") is True
        with urllib.request.urlopen(url + "/_emulator/requests", timeout=5) as response:
            counts = json.load(response)["requests"]
        assert counts["PUT kv"] == 1
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
