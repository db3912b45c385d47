"""What a database's state was when the daemon stopped cleanly.

At start a database's page checksums are computed from its file (a full
read: about a second per GB here) and its newest LTX file is verified
whole (a snapshot may be as large as the database). A clean stop saves
both results beside the database, with what identifies the files they
were taken from, so that the next start can trust them when nothing
changed in between. The record is removed as it is read: it speaks for
one start only, and after a crash there is none.
"""

from __future__ import annotations

import array
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"LiteFS clean stop 1\n"
_FIELDS = struct.Struct(">QQI")
_IDENTITY = struct.Struct(">QQQQQ")
_CRC = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class CleanStop:
    """The position and page checksums a database had at a clean stop."""

    txid: int
    checksum: int
    page_size: int
    checksums: array.array[int]


def _identity(path: Path) -> bytes:
    """What changes whenever the file does: ctime cannot be set by anyone."""
    st = os.stat(path)
    return _IDENTITY.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def save(record: Path, state: CleanStop, database: Path, newest_ltx: Path | None) -> None:
    """Write the record; the files it names must not change afterwards."""
    body = b"".join(
        (
            MAGIC,
            _FIELDS.pack(state.txid, state.checksum, state.page_size),
            _identity(database),
            _identity(newest_ltx) if newest_ltx is not None else bytes(_IDENTITY.size),
            state.checksums.tobytes(),
        )
    )
    scratch = record.with_name(record.name + ".tmp")
    with open(scratch, "wb") as f:
        f.write(body)
        f.write(_CRC.pack(zlib.crc32(body)))
    os.replace(scratch, record)


def take(record: Path, database: Path, newest_ltx: Path | None) -> CleanStop | None:
    """The record, if it still describes these files; removed either way."""
    try:
        data = record.read_bytes()
    except FileNotFoundError:
        return None
    record.unlink()
    body, crc = data[: -_CRC.size], data[-_CRC.size :]
    if len(data) < _CRC.size or _CRC.pack(zlib.crc32(body)) != crc or not body.startswith(MAGIC):
        return None
    offset = len(MAGIC)
    txid, checksum, page_size = _FIELDS.unpack_from(body, offset)
    offset += _FIELDS.size
    identities = body[offset : offset + 2 * _IDENTITY.size]
    expected = _identity(database) + (
        _identity(newest_ltx) if newest_ltx is not None else bytes(_IDENTITY.size)
    )
    if identities != expected:
        return None
    checksums = array.array("Q")
    checksums.frombytes(body[offset + 2 * _IDENTITY.size :])
    return CleanStop(txid, checksum, page_size, checksums)
