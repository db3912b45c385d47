"""Leases decide which node is the primary.

Each backend (static, consul, etcd) implements `Leaser`. The node asks its
leaser to `acquire()` when it is a candidate; the `Lease` it gets back must be
renewed every `renew_interval` seconds, and the node stops accepting writes at
`deadline` if no renewal succeeded by then: after that moment another node may
legitimately hold the lease. Nodes that are not primary learn who is from
`primary_info()` and follow changes with `watch()`, which blocks on the
backend (Consul blocking queries, etcd watches) rather than polling.

Candidates also publish their *standing* beside the lease key: how recent
the state they hold is. When the lease is free, a candidate that sees a
fresher one leaves the lease to it, so the node that received the most of
the lost primary's commits is the one that wins.

All methods are coroutines for the asyncio thread; none may block its loop.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PrimaryInfo:
    """What the lease key says about the primary node."""

    hostname: str
    advertise_url: str

    def to_json(self) -> bytes:
        return json.dumps({"hostname": self.hostname, "advertise-url": self.advertise_url}).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> PrimaryInfo:
        """Parse a lease value; raises `LeaseError` on anything malformed."""
        try:
            value = json.loads(raw)
            hostname, url = value["hostname"], value["advertise-url"]
        except (ValueError, TypeError, KeyError) as exc:
            raise LeaseError(f"malformed lease value: {raw!r}") from exc
        if not isinstance(hostname, str) or not isinstance(url, str):
            raise LeaseError(f"malformed lease value: {raw!r}")
        return cls(hostname, url)


@dataclass(frozen=True, slots=True)
class Standing:
    """How recent a candidate's state is, as it last said."""

    hostname: str
    current_at: float
    """The primary's wall-clock time at which the candidate last held all
    the primary had (-inf: never)."""
    said_at: float
    """The candidate's wall-clock time when it said so."""

    def to_json(self) -> bytes:
        current = self.current_at if math.isfinite(self.current_at) else None
        return json.dumps(
            {"hostname": self.hostname, "current-at": current, "said-at": self.said_at}
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Standing:
        """Parse a published standing; raises `LeaseError` on anything malformed."""
        try:
            value = json.loads(raw)
            hostname, current, said = value["hostname"], value["current-at"], value["said-at"]
            if not isinstance(hostname, str):
                raise TypeError(hostname)
            return cls(hostname, -math.inf if current is None else float(current), float(said))
        except (ValueError, TypeError, KeyError) as exc:
            raise LeaseError(f"malformed standing: {raw!r}") from exc


def parse_standings(values: Iterable[bytes | str]) -> list[Standing]:
    """The well-formed standings among values read from a backend: another
    program's key under the prefix must not stop an election."""
    standings = []
    for value in values:
        try:
            standings.append(Standing.from_json(value))
        except LeaseError:
            continue
    return standings


class LeaseError(Exception):
    """The lease backend failed or answered something unusable."""


class PrimaryExists(LeaseError):
    """Another node holds the lease."""

    def __init__(self, info: PrimaryInfo | None) -> None:
        super().__init__(f"primary exists: {info.hostname if info else 'unknown'}")
        self.info = info


class LeaseLost(LeaseError):
    """The lease can no longer be renewed; the holder must step down."""


class Lease(abc.ABC):
    """A lease this node holds."""

    ttl: float
    """Seconds the backend keeps the lease alive after a renewal."""

    renewed_at: float
    """`time.monotonic()` taken just *before* the last successful acquire or
    renew request was sent, so `deadline` is never later than the backend's."""

    @property
    @abc.abstractmethod
    def renew_interval(self) -> float:
        """Seconds between renewals (half the TTL for Consul, a third for etcd)."""

    @property
    def deadline(self) -> float:
        """Monotonic time after which another node could hold the lease."""
        return self.renewed_at + self.ttl

    def expired(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.deadline

    @abc.abstractmethod
    async def renew(self) -> None:
        """Extend the lease; raises `LeaseLost` when it is gone."""

    @property
    @abc.abstractmethod
    def handle(self) -> str:
        """What another node takes this lease over with (`Leaser.adopt`)."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Give the lease up so another node can take it at once (best effort)."""


class Leaser(abc.ABC):
    """One lease backend, configured for this node."""

    hostname: str
    advertise_url: str
    candidate: bool
    ttl: float = 0.0
    """Seconds a lease outlives its holder's last renewal."""

    @property
    def acquire_delay(self) -> float:
        """Seconds after a holder is gone during which nobody may take the
        lease (Consul's lock-delay)."""
        return 0.0

    @abc.abstractmethod
    async def acquire(self) -> Lease:
        """Try once to become primary; raises `PrimaryExists` if another node is."""

    async def adopt(self, handle: str) -> Lease:
        """Take over the lease the primary handing its role to this node
        holds, as the holder from now on: the key is never free in between,
        so no other node can take it. Raises `LeaseLost` when that lease has
        ended, `PrimaryExists` when the key is held under another."""
        raise LeaseError("this lease cannot be handed over")

    @abc.abstractmethod
    async def primary_info(self) -> PrimaryInfo | None:
        """The current primary, or None when no node holds the lease."""

    @abc.abstractmethod
    def watch(self) -> AsyncIterator[PrimaryInfo | None]:
        """Yield the current primary at once, then again each time it changes."""

    async def publish_standing(self, standing: Standing) -> bool:
        """Say how recent this candidate's state is, for the others to
        compare; False when this backend holds no elections (static)."""
        return False

    async def standings(self) -> list[Standing]:
        """What the candidates last said; malformed entries are skipped."""
        return []

    async def close(self) -> None:  # noqa: B027 - optional for backends without resources
        """Release client resources; does not release a held lease."""


class FailureRun:
    """A run of failures of one repeating activity (a watch reconnecting),
    logged once when it starts, then at most every `interval` seconds, and
    once more when it ends: a dead backend must not bury the log."""

    def __init__(self, log: logging.Logger, activity: str, interval: float) -> None:
        self.log = log
        self.activity = activity
        self.interval = interval
        self.count = 0
        self.since = 0.0
        self.logged_at = -float("inf")

    def failed(self, exc: BaseException, retry_in: float) -> None:
        now = time.monotonic()
        self.count += 1
        if self.count == 1:
            self.since = self.logged_at = now
            self.log.warning("%s failed: %s; retrying in %.2fs", self.activity, exc, retry_in)
        elif now - self.logged_at >= self.interval:
            self.logged_at = now
            self.log.warning(
                "%s still failing: %d attempts over %.0fs; last error: %s",
                self.activity,
                self.count,
                now - self.since,
                exc,
            )
        else:
            self.log.debug("%s still failing: %s", self.activity, exc)

    def note(self, message: str) -> None:
        """Something odd but not a failure, logged at the same pace."""
        now = time.monotonic()
        if now - self.logged_at >= self.interval:
            self.logged_at = now
            self.log.warning("%s: %s", self.activity, message)

    def recovered(self) -> None:
        if self.count:
            self.log.info(
                "%s recovered after %d failed attempts over %.1fs",
                self.activity,
                self.count,
                time.monotonic() - self.since,
            )
            self.count = 0
