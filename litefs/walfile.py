"""SQLite's write-ahead log format: the file header, frames and their checksums.

Bytes in, facts out; nothing here knows about FUSE or LTX. A WAL file is a
32-byte header, then frames of a 24-byte header and one page. A frame counts
only if its salts equal the header's and its cumulative checksum is right,
exactly as SQLite's own recovery decides; a transaction is the run of frames
up to one whose "database size after commit" field is non-zero.

The checksum is SQLite's: two 32-bit sums run over the data in pairs of
words (`s1 += a + s2; s2 += b + s1`), in the byte order the header's magic
selects. That recurrence is linear, so one frame's contribution is a few
dot products with precomputed coefficients instead of a Python loop per
word: validating a page costs microseconds.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

HEADER_SIZE = 32
FRAME_HEADER_SIZE = 24
MAGIC_LITTLE = 0x377F0682
MAGIC_BIG = 0x377F0683
FORMAT_VERSION = 3007000

_HEADER = struct.Struct(">IIIIIIII")
_FRAME_HEADER = struct.Struct(">IIIIII")
_MASK = 0xFFFFFFFF


class WalFormatError(ValueError):
    """Bytes that are not a valid WAL header."""


@dataclass(frozen=True, slots=True)
class WalHeader:
    magic: int
    page_size: int
    checkpoint_seq: int
    salt1: int
    salt2: int
    checksum: tuple[int, int]

    @property
    def big_endian(self) -> bool:
        return self.magic == MAGIC_BIG

    @property
    def frame_size(self) -> int:
        return FRAME_HEADER_SIZE + self.page_size


@dataclass(frozen=True, slots=True)
class Frame:
    """A valid frame: where its page lies in the file, and what it says."""

    offset: int
    pgno: int
    commit: int
    """Database size in pages after this frame's transaction; 0 unless last."""

    checksum: tuple[int, int]

    @property
    def data_offset(self) -> int:
        return self.offset + FRAME_HEADER_SIZE


def parse_header(data: bytes) -> WalHeader:
    """The header, checked as SQLite checks it before trusting any frame."""
    if len(data) < HEADER_SIZE:
        raise WalFormatError(f"WAL header is {len(data)} bytes, expected {HEADER_SIZE}")
    magic, version, page_size, seq, salt1, salt2, c1, c2 = _HEADER.unpack_from(data)
    if magic not in (MAGIC_LITTLE, MAGIC_BIG):
        raise WalFormatError(f"bad WAL magic {magic:#x}")
    if version != FORMAT_VERSION:
        raise WalFormatError(f"unsupported WAL format version {version}")
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        raise WalFormatError(f"invalid WAL page size {page_size}")
    if checksum(magic == MAGIC_BIG, data[:24]) != (c1, c2):
        raise WalFormatError("WAL header checksum mismatch")
    return WalHeader(magic, page_size, seq, salt1, salt2, (c1, c2))


def is_commit_header(data: bytes | memoryview, offset: int = 0) -> bool:
    """Whether a frame header's "database size after commit" field is set."""
    return any(data[offset + 4 : offset + 8])


def frame_offset(index: int, page_size: int) -> int:
    """Byte offset of frame `index` (0-based)."""
    return HEADER_SIZE + index * (FRAME_HEADER_SIZE + page_size)


def checksum(
    big_endian: bool, data: bytes | memoryview, start: tuple[int, int] = (0, 0)
) -> tuple[int, int]:
    """SQLite's WAL checksum of `data` (a multiple of 8 bytes), continuing `start`."""
    s1, s2 = _contribution(big_endian, [data], len(data) // 8)[0]
    m = _power(len(data) // 8)
    a, b = start
    return ((m[0] * a + m[1] * b + s1) & _MASK, (m[1] * a + m[2] * b + s2) & _MASK)


def encode_header(page_size: int, checkpoint_seq: int, salt: bytes) -> WalHeader:
    """A new log generation's header, checksummed in this machine's byte
    order, as SQLite writes it."""
    magic = MAGIC_BIG if sys.byteorder == "big" else MAGIC_LITTLE
    body = struct.pack(">IIII", magic, FORMAT_VERSION, page_size, checkpoint_seq) + salt
    c1, c2 = checksum(magic == MAGIC_BIG, body)
    return parse_header(body + struct.pack(">II", c1, c2))


def header_bytes(header: WalHeader) -> bytes:
    return _HEADER.pack(
        header.magic,
        FORMAT_VERSION,
        header.page_size,
        header.checkpoint_seq,
        header.salt1,
        header.salt2,
        *header.checksum,
    )


def encode_frames(
    header: WalHeader, start: tuple[int, int], pages: list[tuple[int, bytes]], commit: int
) -> tuple[bytes, tuple[int, int]]:
    """Frames holding `pages` as one transaction after a frame whose
    cumulative checksum is `start`: the last frame carries `commit`, the
    database size after it. Returns the bytes and the final checksum."""
    heads = [
        _FRAME_HEADER.pack(
            pgno, commit if i == len(pages) - 1 else 0, header.salt1, header.salt2, 0, 0
        )
        for i, (pgno, _data) in enumerate(pages)
    ]
    pieces: list[bytes | memoryview] = []
    for head, (_pgno, data) in zip(heads, pages, strict=True):
        pieces.append(head[:8])
        pieces.append(data)
    words = (8 + header.page_size) // 8
    m = _power(words)
    a, b = start
    out = bytearray()
    for head, (_pgno, data), (p1, p2) in zip(
        heads, pages, _contribution(header.big_endian, pieces, words), strict=True
    ):
        a, b = (m[0] * a + m[1] * b + p1) & _MASK, (m[1] * a + m[2] * b + p2) & _MASK
        out += head[:16]
        out += struct.pack(">II", a, b)
        out += data
    return bytes(out), (a, b)


class FrameChain:
    """The checksum chain of one WAL generation, extended frame by frame."""

    def __init__(self, header: WalHeader) -> None:
        self.header = header
        self.checksum = header.checksum
        self.end = HEADER_SIZE

    def validate(self, data: bytes | memoryview) -> list[Frame]:
        """The frames of `data` (bytes of the file from `self.end`) that
        continue the chain, in order, without moving the chain forward."""
        header = self.header
        size = header.frame_size
        count = len(data) // size
        if count == 0:
            return []
        view = memoryview(data)
        valid: list[Frame] = []
        salts = (header.salt1, header.salt2)
        pieces: list[bytes | memoryview] = []
        frame_headers: list[tuple[int, int, int, int, int, int]] = []
        for index in range(count):
            start = index * size
            fields = _FRAME_HEADER.unpack_from(view, start)
            if (fields[2], fields[3]) != salts:
                break
            frame_headers.append(fields)
            pieces.append(view[start : start + 8])
            pieces.append(view[start + FRAME_HEADER_SIZE : start + size])
        if not frame_headers:
            return []
        words = (8 + header.page_size) // 8
        parts = _contribution(header.big_endian, pieces, words)
        m = _power(words)
        a, b = self.checksum
        offset = self.end
        for (pgno, commit, _s1, _s2, c1, c2), (p1, p2) in zip(frame_headers, parts, strict=True):
            a, b = (m[0] * a + m[1] * b + p1) & _MASK, (m[1] * a + m[2] * b + p2) & _MASK
            if (a, b) != (c1, c2) or pgno == 0:
                break
            valid.append(Frame(offset, pgno, commit, (a, b)))
            offset += size
        return valid

    def advance(self, frame: Frame) -> None:
        """Accept everything up to and including `frame`."""
        self.checksum = frame.checksum
        self.end = frame.offset + self.header.frame_size


def group(frames: list[Frame]) -> list[list[Frame]]:
    """Valid frames as transactions, each ending in its commit frame; frames
    after the last commit belong to none."""
    result: list[list[Frame]] = []
    current: list[Frame] = []
    for frame in frames:
        current.append(frame)
        if frame.commit:
            result.append(current)
            current = []
    return result


def transactions(chain: FrameChain, data: bytes | memoryview) -> list[list[Frame]]:
    """The committed transactions in `data` (from `chain.end`); the chain is
    advanced past the last commit frame."""
    found = group(chain.validate(data))
    if found:
        chain.advance(found[-1][-1])
    return found


@lru_cache(maxsize=32)
def _power(steps: int) -> tuple[int, int, int]:
    """M**steps for M = [[1, 1], [1, 2]] modulo 2**32, as (m00, m01, m11)."""
    a, b, d = 1, 0, 1  # identity
    for _ in range(steps):
        a, b, d = (a + b) & _MASK, (a + 2 * b) & _MASK, (b + 2 * d) & _MASK
    return a, b, d


@lru_cache(maxsize=32)
def _coefficients(steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries of M**(steps-1-i) for each step i, as uint64 arrays."""
    p = np.empty(steps, dtype=np.uint64)
    q = np.empty(steps, dtype=np.uint64)
    r = np.empty(steps, dtype=np.uint64)
    a, b, d = 1, 0, 1
    for i in range(steps - 1, -1, -1):
        p[i], q[i], r[i] = a, b, d
        a, b, d = (a + b) & _MASK, (a + 2 * b) & _MASK, (b + 2 * d) & _MASK
    return p, q, r


def _contribution(
    big_endian: bool, pieces: list[bytes | memoryview], steps: int
) -> list[tuple[int, int]]:
    """The checksum from (0, 0) of each unit of `steps` word pairs in the
    concatenated pieces (a frame's unit is its header's first 8 bytes, then
    its page)."""
    dtype = ">u4" if big_endian else "<u4"
    raw = b"".join(pieces)
    words = np.frombuffer(raw, dtype=dtype).astype(np.uint64).reshape(-1, steps, 2)
    first = words[:, :, 0]
    second = (words[:, :, 0] + words[:, :, 1]) & np.uint64(_MASK)
    p, q, r = _coefficients(steps)
    s1 = (first * p + second * q).sum(axis=1, dtype=np.uint64) & np.uint64(_MASK)
    s2 = (first * q + second * r).sum(axis=1, dtype=np.uint64) & np.uint64(_MASK)
    return list(zip(s1.tolist(), s2.tolist(), strict=True))
