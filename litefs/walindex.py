"""SQLite's wal-index: the start of the `-shm` file every connection maps.

Bytes in, facts out, as `walfile` is for the log itself. The index begins
with two copies of a 48-byte header (readers trust it only when both agree
and its checksum is right), then the checkpoint information: how many
frames are copied into the database file (`backfill`) and the five read
marks, each the last frame a reader may be using. Then come hash tables,
one per 32 KiB region, that map a page number to the frames holding it:
an array of page numbers, one per frame (the first region's is shorter by
the headers), and 8,192 two-byte slots probed linearly from
`pgno * 383 % 8192`, each holding a frame's position in its region.

Everything is in native byte order, checksummed natively, as SQLite keeps
it: the file is shared memory, not a format that leaves the machine.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass, replace

from litefs.walfile import FORMAT_VERSION, checksum

HEADER_SIZE = 48
INFO_SIZE = 136
"""Both copies of the header, then the checkpoint information."""
READ_MARKS = 5
READMARK_NOT_USED = 0xFFFFFFFF
REGION_SIZE = 32768
REGION_FRAMES = 4096
FIRST_REGION_FRAMES = REGION_FRAMES - INFO_SIZE // 4
SLOTS = 8192
_SLOTS_OFFSET = 4 * REGION_FRAMES
_MASK = 0xFFFFFFFF

_HEADER = struct.Struct("=IIIBBHII8s8s")
_HEADER_CHECKSUM = struct.Struct("=II")
_INFO = struct.Struct("=I5I8sII")
BACKFILL_OFFSET = 2 * HEADER_SIZE
_MARKS_OFFSET = BACKFILL_OFFSET + 4


@dataclass(frozen=True, slots=True)
class IndexHeader:
    change: int
    big_endian: bool
    page_size: int
    max_frame: int
    """Frames of the log that are committed; readers look no further."""
    page_count: int
    frame_checksum: bytes
    """The cumulative checksum after the last committed frame (two native words)."""
    salt: bytes
    """The log header's two salts, as they stand there."""

    def encode(self) -> bytes:
        size = self.page_size
        body = _HEADER.pack(
            FORMAT_VERSION,
            0,
            self.change & _MASK,
            1,
            int(self.big_endian),
            (size & 0xFF00) | (size >> 16),
            self.max_frame,
            self.page_count,
            self.frame_checksum,
            self.salt,
        )
        return body + _HEADER_CHECKSUM.pack(*checksum(sys.byteorder == "big", body))


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    backfill: int
    read_marks: tuple[int, ...]


def parse(data: bytes) -> tuple[IndexHeader, CheckpointInfo] | None:
    """The header and checkpoint information, or None when a reader would
    not trust them (and rebuild the index from the log instead)."""
    if len(data) < INFO_SIZE:
        return None
    first = data[:HEADER_SIZE]
    if first != data[HEADER_SIZE : 2 * HEADER_SIZE]:
        return None
    version, _unused, change, is_init, big_end, size, max_frame, pages, frame_sum, salt = (
        _HEADER.unpack_from(first)
    )
    if version != FORMAT_VERSION or not is_init:
        return None
    body = first[: _HEADER.size]
    if _HEADER_CHECKSUM.unpack_from(first, _HEADER.size) != checksum(sys.byteorder == "big", body):
        return None
    page_size = (size & 0xFE00) | ((size & 1) << 16)
    header = IndexHeader(change, bool(big_end), page_size, max_frame, pages, frame_sum, salt)
    backfill, *marks = _INFO.unpack_from(data, 2 * HEADER_SIZE)[:6]
    return header, CheckpointInfo(backfill, tuple(marks))


def restarted_info() -> bytes:
    """Checkpoint information of a log that starts again from its first
    frame: nothing copied, one read mark at zero, the others unused."""
    return struct.pack("=I5I", 0, 0, 0, *([READMARK_NOT_USED] * 3))


def read_mark_offset(index: int) -> int:
    return _MARKS_OFFSET + 4 * index


def region_of(frame: int) -> int:
    """The hash region holding frame `frame` (frames count from 1)."""
    return (frame + REGION_FRAMES - FIRST_REGION_FRAMES - 1) // REGION_FRAMES


def _first_frame(region: int) -> int:
    """The number of the frame before the region's first."""
    return 0 if region == 0 else FIRST_REGION_FRAMES + (region - 1) * REGION_FRAMES


def _pgno_offset(region: int) -> int:
    return region * REGION_SIZE + (INFO_SIZE if region == 0 else 0)


def _region_frames(region: int) -> int:
    return FIRST_REGION_FRAMES if region == 0 else REGION_FRAMES


def _slot(pgno: int) -> int:
    return (pgno * 383) & (SLOTS - 1)


class HashRegion:
    """One region's page numbers and hash slots, edited in memory and
    written back whole."""

    def __init__(self, region: int, pgnos: bytes, slots: bytes) -> None:
        self.region = region
        self.first = _first_frame(region)
        self.pgnos = memoryview(bytearray(pgnos)).cast("I")
        self.slots = memoryview(bytearray(slots)).cast("H")

    @classmethod
    def read(cls, fd: int, region: int) -> HashRegion:
        count = _region_frames(region)
        pgnos = os.pread(fd, 4 * count, _pgno_offset(region)).ljust(4 * count, b"\0")
        slots = os.pread(fd, 2 * SLOTS, region * REGION_SIZE + _SLOTS_OFFSET)
        return cls(region, pgnos, slots.ljust(2 * SLOTS, b"\0"))

    def write(self, fd: int) -> None:
        os.pwrite(fd, self.pgnos.tobytes(), _pgno_offset(self.region))
        os.pwrite(fd, self.slots.tobytes(), self.region * REGION_SIZE + _SLOTS_OFFSET)

    def truncate(self, max_frame: int) -> None:
        """Forget the frames after `max_frame`: a writer that failed left
        them, uncommitted. Readers ignore them, but a new frame must not
        collide with their slots."""
        keep = max(0, max_frame - self.first)
        pgnos = self.pgnos
        if keep >= len(pgnos) or not pgnos[keep]:
            return
        for i in range(keep, len(pgnos)):
            pgnos[i] = 0
        self.slots = memoryview(bytearray(2 * SLOTS)).cast("H")
        for i in range(keep):
            self._insert(pgnos[i], i + 1)

    def add(self, frame: int, pgno: int) -> None:
        position = frame - self.first
        if position == 1:
            self.pgnos = memoryview(bytearray(len(self.pgnos) * 4)).cast("I")
            self.slots = memoryview(bytearray(2 * SLOTS)).cast("H")
        self.pgnos[position - 1] = pgno
        self._insert(pgno, position)

    def _insert(self, pgno: int, position: int) -> None:
        slots = self.slots
        key = _slot(pgno)
        while slots[key]:
            key = (key + 1) & (SLOTS - 1)
        slots[key] = position


def add_frames(fd: int, first: int, pgnos: list[int], max_frame: int) -> None:
    """Enter frames `first`, `first + 1`, ... (holding `pgnos`) into the
    hash tables of the index `fd`, after the committed `max_frame`."""
    region: HashRegion | None = None
    for frame, pgno in enumerate(pgnos, start=first):
        number = region_of(frame)
        if region is None or region.region != number:
            if region is not None:
                region.write(fd)
            region = HashRegion.read(fd, number)
            region.truncate(max_frame)
        region.add(frame, pgno)
    if region is not None:
        region.write(fd)


def publish(fd: int, header: IndexHeader) -> None:
    """Write the header the way SQLite does: the second copy first, so a
    reader comparing the two never takes half of one for the whole."""
    data = header.encode()
    os.pwrite(fd, data, HEADER_SIZE)
    os.pwrite(fd, data, 0)


def next_change(header: IndexHeader, **changes: object) -> IndexHeader:
    return replace(header, change=(header.change + 1) & _MASK, **changes)  # type: ignore[arg-type]


def reset(old: bytes, page_count: int) -> bytes | None:
    """The index for a log emptied behind SQLite's back, with every field
    readers compare changed, so that each connection drops its page cache
    at its next read transaction and reads the database file alone. None
    when `old` holds no index readers trust (they rebuild it themselves)."""
    parsed = parse(old)
    if parsed is None:
        return None
    header = parsed[0]
    salt1 = (int.from_bytes(header.salt[:4], "big") + 1) & _MASK
    new = next_change(
        header, max_frame=0, page_count=page_count, salt=salt1.to_bytes(4, "big") + os.urandom(4)
    ).encode()
    locks = old[2 * HEADER_SIZE + 24 : 2 * HEADER_SIZE + 32]
    info = _INFO.pack(0, 0, *([READMARK_NOT_USED] * 4), locks, 0, 0)
    return new + new + info
