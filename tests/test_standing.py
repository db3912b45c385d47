"""A candidate's standing: what it publishes beside the lease for the others to compare."""

from __future__ import annotations

import json
import math

import pytest

from litefs.lease import LeaseError, Standing, parse_standings


def test_a_standing_survives_the_round_trip_even_when_never_caught_up() -> None:
    for standing in (Standing("n1", 1700000000.25, 1700000001.5), Standing("n2", -math.inf, 3.0)):
        assert Standing.from_json(standing.to_json()) == standing


def test_never_caught_up_is_written_as_null_since_json_has_no_infinity() -> None:
    assert json.loads(Standing("n", -math.inf, 3.0).to_json())["current-at"] is None


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"hostname": "n"}',
        b'{"hostname": 5, "current-at": 1, "said-at": 2}',
        b'{"hostname": "n", "current-at": "soon", "said-at": 2}',
    ],
)
def test_a_malformed_standing_is_a_lease_error(raw: bytes) -> None:
    with pytest.raises(LeaseError):
        Standing.from_json(raw)


def test_malformed_values_among_standings_are_skipped() -> None:
    good = Standing("n1", 5.0, 6.0)
    assert parse_standings([b"{", good.to_json(), b"\xff"]) == [good]
