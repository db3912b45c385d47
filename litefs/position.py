"""Where a database is in its history, as nodes and the wire speak of it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Position:
    """Where a database is in its history: last TXID and the checksum after it."""

    txid: int
    checksum: int

    def __str__(self) -> str:
        return f"{self.txid:016x}/{self.checksum:016x}"


EMPTY_POSITION = Position(0, 0)
