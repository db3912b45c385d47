"""The static lease: the configuration names the primary and nothing moves.

The candidate node is primary for as long as it runs; every other node is a
replica of the hostname and advertise URL the configuration gives.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

from litefs.lease import Lease, Leaser, PrimaryExists, PrimaryInfo


class StaticLease(Lease):
    """A lease that never expires and needs no renewal."""

    def __init__(self) -> None:
        self.ttl = math.inf
        self.renewed_at = 0.0

    @property
    def renew_interval(self) -> float:
        return 3600.0

    @property
    def handle(self) -> str:
        return ""

    async def renew(self) -> None:
        return None

    async def release(self) -> None:
        return None


class StaticLeaser(Leaser):
    def __init__(self, hostname: str, advertise_url: str, candidate: bool) -> None:
        self.hostname = hostname
        self.advertise_url = advertise_url
        self.candidate = candidate
        self._info = PrimaryInfo(hostname, advertise_url)

    async def acquire(self) -> Lease:
        if not self.candidate:
            raise PrimaryExists(self._info)
        return StaticLease()

    async def primary_info(self) -> PrimaryInfo | None:
        return self._info

    async def watch(self) -> AsyncIterator[PrimaryInfo | None]:
        yield self._info
