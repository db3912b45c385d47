"""LTX files: the unit of replication, read and written byte for byte as the format specifies.

Everything here works on bytes, file objects and descriptors: no SQLite
library, no FUSE, no network. Readers stream, so a file of any size needs
memory in proportion to its page count (a few bytes per page), never to its
length. Every check a reader makes raises a subclass of `LTXError`, so a
caller can refuse a file with one `except` and show the operator one precise
line.
"""

from __future__ import annotations

import array
import os
import re
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import reduce
from operator import xor
from typing import BinaryIO, NamedTuple

import lz4.block
import lz4.frame
from fastcrc import crc64 as _fastcrc64

MAGIC = b"LTX1"
HEADER_SIZE = 100
TRAILER_SIZE = 16
FRAME_HEADER_SIZE = 6
HEADER_FLAG_NO_CHECKSUM = 0x2
HEADER_FLAG_MASK = HEADER_FLAG_NO_CHECKSUM
PAGE_FLAG_SIZE = 0x1
CHECKSUM_FLAG = 1 << 63
EMPTY_DATABASE_CHECKSUM = CHECKSUM_FLAG
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 65536
PENDING_BYTE = 0x40000000
SQLITE_MAGIC = b"SQLite format 3\x00"
DEFAULT_PAGE_SIZE = 4096

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
_HEADER = struct.Struct(">4sIIIQQQQQQIIQ20s")
_FRAME = struct.Struct(">IHI")
_FRAME_HEAD = struct.Struct(">IH")
_U32BE = struct.Struct(">I")
_U64BE = struct.Struct(">Q")
_PGNO = _U32BE.pack
_ZERO_RESERVED = bytes(20)
_TERMINATOR = bytes(FRAME_HEADER_SIZE)
_LZ4_FRAME_MAGIC = b"\x04\x22\x4d\x18"
_READ_CHUNK = 1 << 20
_WRITE_CHUNK = 1 << 20
_SCAN_CHUNK = 4 << 20
_FILENAME = re.compile(r"([0-9a-f]{16})-([0-9a-f]{16})\.ltx")

_go_iso = _fastcrc64.go_iso
_compress = lz4.block.compress
_decompress = lz4.block.decompress
_LZ4BlockError = lz4.block.LZ4BlockError

BytesLike = bytes | bytearray | memoryview


class LTXError(Exception):
    """Any reason to refuse an LTX file or an operation on one."""


class InvalidHeader(LTXError):
    """The 100-byte header is malformed or its fields contradict each other."""


class InvalidFrame(LTXError):
    """A page frame is out of order, the wrong size, the lock page, or does not decompress."""


class InvalidIndex(LTXError):
    """The page index does not describe the frames that precede it."""


class InvalidTrailer(LTXError):
    """The trailer's checksums are malformed, or bytes follow it."""


class InvalidDatabase(LTXError):
    """A file given as a SQLite database is not one, or its size is not whole pages."""


class InvalidFilename(LTXError):
    """A name is not `<min TXID>-<max TXID>.ltx` in 16 lower-case hex digits each."""


class PageNotFound(LTXError):
    """Random access asked for a page that the file does not contain."""


class EncoderFinished(LTXError):
    """An encoder was used after `finish`, which has already written the trailer."""


class TruncatedFile(LTXError):
    """The file ended before a structure it promised was complete."""

    def __init__(self, what: str, offset: int, wanted: int, got: int) -> None:
        super().__init__(
            f"unexpected end of file at offset {offset}: {what} needs {wanted} bytes, "
            f"only {got} remain"
        )
        self.what = what
        self.offset = offset
        self.wanted = wanted
        self.got = got


class _Mismatch(LTXError):
    label = "checksum"

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(self.describe(expected, actual))
        self.expected = expected
        self.actual = actual

    def describe(self, expected: int, actual: int) -> str:
        return f"{self.label} mismatch: expected {expected:016x}, got {actual:016x}"


class ChecksumMismatch(_Mismatch):
    """The file checksum in the trailer is not the checksum of the file's contents."""

    label = "file checksum"


class PreApplyChecksumMismatch(_Mismatch):
    """The database is not in the state the file was made against, so applying would corrupt it."""

    def describe(self, expected: int, actual: int) -> str:
        return (
            f"pre-apply checksum mismatch: file expects database checksum {expected:016x}, "
            f"database has {actual:016x}"
        )


class PostApplyChecksumMismatch(_Mismatch):
    """The pages of the file do not produce the database checksum its trailer promises."""

    def describe(self, expected: int, actual: int) -> str:
        return (
            f"post-apply checksum mismatch: trailer says {expected:016x}, pages give {actual:016x}"
        )


def crc64(data: BytesLike, crc: int = 0) -> int:
    """CRC-64/GO-ISO; pass a previous result as `crc` to continue it over more data."""
    return _go_iso(data, crc)


def page_checksum(pgno: int, data: BytesLike) -> int:
    """Checksum of one page as it enters the database checksum; never zero."""
    return _go_iso(data, _go_iso(_PGNO(pgno))) | CHECKSUM_FLAG


def lock_page(page_size: int) -> int:
    """The page holding SQLite's pending byte: never written, never checksummed."""
    return PENDING_BYTE // page_size + 1


def is_valid_page_size(page_size: int) -> bool:
    return MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE and page_size & (page_size - 1) == 0


def max_compressed_size(page_size: int) -> int:
    """LZ4's worst case for one page: a larger size field can only be corruption."""
    return page_size + page_size // 255 + 16


def sqlite_page_size(header: BytesLike) -> int:
    """Page size from a SQLite database header, refusing anything that is not SQLite."""
    if len(header) < 18 or bytes(header[:16]) != SQLITE_MAGIC:
        raise InvalidDatabase("not a SQLite database: header magic missing")
    raw = (header[16] << 8) | header[17]
    size = MAX_PAGE_SIZE if raw == 1 else raw
    if not is_valid_page_size(size):
        raise InvalidDatabase(f"SQLite header has an invalid page size field {raw}")
    return size


def _read_at(src: BinaryIO | int, buf: memoryview, offset: int) -> int:
    """Fill `buf` from `offset`, looping over short reads; returns how much was read."""
    got = 0
    want = len(buf)
    if isinstance(src, int):
        while got < want:
            n = os.preadv(src, [buf[got:]], offset + got)
            if n <= 0:
                break
            got += n
        return got
    src.seek(offset)
    while got < want:
        n = src.readinto(buf[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def page_checksums(f: BinaryIO | int, page_size: int, page_count: int) -> array.array[int]:
    """Checksum of every page of a database, so later changes can update the total by XOR."""
    if not is_valid_page_size(page_size):
        raise InvalidDatabase(f"invalid page size {page_size}")
    out = array.array("Q", bytes(8 * page_count))
    lock = lock_page(page_size)
    per = max(1, _SCAN_CHUNK // page_size)
    buf = bytearray(per * page_size)
    whole = memoryview(buf)
    go_iso = _go_iso
    pack = _PGNO
    flag = CHECKSUM_FLAG
    pgno = 1
    try:
        while pgno <= page_count:
            n = min(per, page_count - pgno + 1)
            want = n * page_size
            view = whole[:want]
            got = _read_at(f, view, (pgno - 1) * page_size)
            if got < want:
                raise InvalidDatabase(
                    f"database ends at byte {(pgno - 1) * page_size + got}, "
                    f"expected {page_count} pages of {page_size} bytes"
                )
            off = 0
            for p in range(pgno, pgno + n):
                if p != lock:
                    out[p - 1] = go_iso(view[off : off + page_size], go_iso(pack(p))) | flag
                off += page_size
            view.release()
            pgno += n
    finally:
        whole.release()
    return out


def checksum_of(checksums: array.array[int]) -> int:
    """Database checksum from per-page checksums (lock page entries hold 0)."""
    return reduce(xor, checksums, 0) | CHECKSUM_FLAG


def _database_geometry(f: BinaryIO | int) -> tuple[int, int]:
    """(page size, page count) of a SQLite file; (0, 0) for an empty one."""
    size = os.fstat(f).st_size if isinstance(f, int) else _stream_size(f)
    if size == 0:
        return 0, 0
    head = bytearray(100)
    with memoryview(head) as view:
        got = _read_at(f, view, 0)
    if got < 18:
        raise InvalidDatabase(f"not a SQLite database: only {size} bytes")
    page_size = sqlite_page_size(head)
    if size % page_size:
        raise InvalidDatabase(
            f"database size {size} is not a multiple of its page size {page_size}"
        )
    return page_size, size // page_size


def _stream_size(f: BinaryIO) -> int:
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        pos = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(pos)
        return end


def database_checksum(path: str | os.PathLike[str]) -> int:
    """Checksum of a whole SQLite file, comparable with an LTX post-apply checksum."""
    with open(path, "rb") as f:
        page_size, count = _database_geometry(f)
        if count == 0:
            return EMPTY_DATABASE_CHECKSUM
        return checksum_of(page_checksums(f, page_size, count))


def _check_uint(name: str, value: int, limit: int) -> None:
    if not isinstance(value, int) or value < 0 or value > limit:
        raise InvalidHeader(f"{name} {value!r} out of range 0..{limit}")


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed first 100 bytes: what the file changes and the state it applies to."""

    flags: int
    page_size: int
    commit: int
    min_txid: int
    max_txid: int
    timestamp: int
    pre_apply_checksum: int
    wal_offset: int = 0
    wal_size: int = 0
    wal_salt1: int = 0
    wal_salt2: int = 0
    node_id: int = 0

    @property
    def is_snapshot(self) -> bool:
        """A snapshot rebuilds the whole database, so it needs no prior state."""
        return self.min_txid == 1

    @property
    def has_checksums(self) -> bool:
        return not self.flags & HEADER_FLAG_NO_CHECKSUM

    def pack(self) -> bytes:
        self.validate()
        return _HEADER.pack(
            MAGIC,
            self.flags,
            self.page_size,
            self.commit,
            self.min_txid,
            self.max_txid,
            self.timestamp,
            self.pre_apply_checksum,
            self.wal_offset,
            self.wal_size,
            self.wal_salt1,
            self.wal_salt2,
            self.node_id,
            _ZERO_RESERVED,
        )

    @classmethod
    def unpack(cls, data: BytesLike) -> Header:
        """Parse without judging the fields; `validate` judges them."""
        if len(data) != HEADER_SIZE:
            raise InvalidHeader(f"header must be {HEADER_SIZE} bytes, got {len(data)}")
        magic, *fields, reserved = _HEADER.unpack(data)
        if magic != MAGIC:
            raise InvalidHeader(f"bad magic {magic!r}, expected {MAGIC!r}: not an LTX file")
        if reserved != _ZERO_RESERVED:
            raise InvalidHeader("reserved header bytes 80..99 are not zero")
        return cls(*fields)

    def validate(self) -> None:
        """Refuse any combination of fields the format does not allow."""
        _check_uint("flags", self.flags, _U32)
        if self.flags & ~HEADER_FLAG_MASK:
            raise InvalidHeader(
                f"unknown header flags 0x{self.flags & ~HEADER_FLAG_MASK:08x} "
                f"(only 0x{HEADER_FLAG_NO_CHECKSUM:08x} is defined)"
            )
        if not isinstance(self.page_size, int) or not is_valid_page_size(self.page_size):
            raise InvalidHeader(
                f"invalid page size {self.page_size!r}: must be a power of two "
                f"from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}"
            )
        _check_uint("commit", self.commit, _U32)
        _check_uint("min TXID", self.min_txid, _U64)
        _check_uint("max TXID", self.max_txid, _U64)
        _check_uint("timestamp", self.timestamp, _U64)
        _check_uint("pre-apply checksum", self.pre_apply_checksum, _U64)
        _check_uint("WAL offset", self.wal_offset, _U64)
        _check_uint("WAL size", self.wal_size, _U64)
        _check_uint("WAL salt 1", self.wal_salt1, _U32)
        _check_uint("WAL salt 2", self.wal_salt2, _U32)
        _check_uint("node ID", self.node_id, _U64)
        if self.min_txid == 0:
            raise InvalidHeader("min TXID is 0: transaction IDs start at 1")
        if self.max_txid < self.min_txid:
            raise InvalidHeader(f"max TXID {self.max_txid} is below min TXID {self.min_txid}")
        pre = self.pre_apply_checksum
        if self.is_snapshot:
            if pre != 0:
                raise InvalidHeader(f"snapshot has pre-apply checksum {pre:016x}, must be 0")
        elif not self.has_checksums:
            if pre != 0:
                raise InvalidHeader(
                    f"pre-apply checksum {pre:016x} set although the no-checksum flag is set"
                )
        elif pre == 0:
            raise InvalidHeader(
                f"pre-apply checksum missing on a non-snapshot file (min TXID {self.min_txid})"
            )
        elif not pre & CHECKSUM_FLAG:
            raise InvalidHeader(f"pre-apply checksum {pre:016x} lacks bit 63")
        if (self.wal_salt1 or self.wal_salt2) and not self.wal_offset:
            raise InvalidHeader("WAL salts set without a WAL offset")
        if self.wal_offset and not self.wal_size:
            raise InvalidHeader(f"WAL offset {self.wal_offset} set without a WAL size")
        if self.wal_size and not self.wal_offset:
            raise InvalidHeader(f"WAL size {self.wal_size} set without a WAL offset")


@dataclass(frozen=True, slots=True)
class Trailer:
    """The last 16 bytes: the database checksum after applying, and the file's own checksum."""

    post_apply_checksum: int
    file_checksum: int

    def validate(self, header: Header) -> None:
        post = self.post_apply_checksum
        if not header.has_checksums:
            if post != 0:
                raise InvalidTrailer(
                    f"post-apply checksum {post:016x} set although the no-checksum flag is set"
                )
        elif not post & CHECKSUM_FLAG:
            raise InvalidTrailer(f"post-apply checksum {post:016x} lacks bit 63")
        elif header.commit == 0 and post != EMPTY_DATABASE_CHECKSUM:
            raise InvalidTrailer(
                f"commit 0 (database deleted) needs post-apply checksum "
                f"{EMPTY_DATABASE_CHECKSUM:016x}, got {post:016x}"
            )


def _write_all(f: BinaryIO, data: BytesLike) -> None:
    n = f.write(data)
    if n is None or n >= len(data):
        return
    with memoryview(data) as view:
        while n < len(view):
            more = f.write(view[n:])
            if not more:
                raise OSError("short write")
            n += more


class Encoder:
    """Writes one LTX file to a stream, page by page, in bounded memory."""

    def __init__(self, f: BinaryIO, header: Header) -> None:
        raw = header.pack()
        self.header = header
        self._f = f
        self._page_size = header.page_size
        self._commit = header.commit
        self._snapshot = header.is_snapshot
        self._lock = lock_page(header.page_size)
        self._crc = _go_iso(raw)
        self._out = bytearray(raw)
        self._offset = HEADER_SIZE
        self._index = bytearray()
        self._prev = 0
        self._count = 0
        self._trailer: Trailer | None = None

    @property
    def page_count(self) -> int:
        return self._count

    @staticmethod
    def compress_page(page: memoryview) -> bytes:
        """Any LZ4 block compressor makes a valid file: a subclass may substitute its own."""
        return _compress(page, store_size=False)

    def _next_snapshot_page(self) -> int:
        nxt = self._prev + 1
        return nxt + 1 if nxt == self._lock else nxt

    def write_page(self, pgno: int, data: BytesLike) -> None:
        """Add one page; pages must come in ascending order, and complete for a snapshot."""
        if self._trailer is not None:
            raise EncoderFinished("encoder already finished")
        if len(data) != self._page_size:
            raise InvalidFrame(f"page {pgno} is {len(data)} bytes, page size is {self._page_size}")
        if pgno <= self._prev:
            raise InvalidFrame(f"page {pgno} written after page {self._prev}: pages must ascend")
        if pgno > self._commit:
            raise InvalidFrame(f"page {pgno} is beyond commit {self._commit}")
        if pgno == self._lock:
            raise InvalidFrame(f"page {pgno} is the lock page and is never written")
        if self._snapshot and pgno != self._next_snapshot_page():
            raise InvalidFrame(
                f"snapshot skips from page {self._prev} to {pgno}: it must hold every page"
            )
        self._write_run(pgno, pgno, memoryview(data), False)

    def _write_run(
        self,
        first: int,
        last: int,
        pages: memoryview,
        sums: bool,
        checksums: array.array[int] | None = None,
    ) -> int:
        """Frames for pages first..last held back to back in `pages`, skipping the lock page.

        Callers have validated order and bounds; this is the per-page hot loop.
        Returns the XOR of the page checksums when `sums` is set, and keeps
        each page's in `checksums` (indexed by page number less one) if given.
        """
        ps = self._page_size
        lock = self._lock
        out = self._out
        index = self._index
        compress = self.compress_page
        go_iso = _go_iso
        pack_frame = _FRAME.pack
        pack_pgno = _PGNO
        crc = self._crc
        offset = self._offset
        total = 0
        pos = 0
        count = 0
        for pgno in range(first, last + 1):
            page = pages[pos : pos + ps]
            pos += ps
            if pgno == lock:
                continue
            comp = compress(page)
            size = len(comp)
            head = pack_frame(pgno, PAGE_FLAG_SIZE, size)
            crc = go_iso(page, go_iso(head, crc))
            if sums:
                page_sum = go_iso(page, go_iso(pack_pgno(pgno)))
                total ^= page_sum
                if checksums is not None:
                    checksums[pgno - 1] = page_sum | CHECKSUM_FLAG
            out += head
            out += comp
            size += 10
            v = pgno
            while v >= 0x80:
                index.append((v & 0x7F) | 0x80)
                v >>= 7
            index.append(v)
            v = offset
            while v >= 0x80:
                index.append((v & 0x7F) | 0x80)
                v >>= 7
            index.append(v)
            v = size
            while v >= 0x80:
                index.append((v & 0x7F) | 0x80)
                v >>= 7
            index.append(v)
            offset += size
            count += 1
            if len(out) >= _WRITE_CHUNK:
                _write_all(self._f, out)
                out.clear()
        self._crc = crc
        self._offset = offset
        self._count += count
        if count:
            self._prev = last if last != lock else last - 1
        return total

    def finish(self, post_apply_checksum: int) -> Trailer:
        """Write terminator, index and trailer; the file is complete after this."""
        if self._trailer is not None:
            raise EncoderFinished("encoder already finished")
        header = self.header
        if self._snapshot:
            expected_last = self._commit - 1 if self._commit == self._lock else self._commit
            if self._prev != expected_last:
                raise InvalidFrame(
                    f"snapshot ends at page {self._prev}, needs every page through {expected_last}"
                )
        _check_trailer_uint(post_apply_checksum)
        Trailer(post_apply_checksum, CHECKSUM_FLAG).validate(header)
        out = self._out
        index = self._index
        index.append(0)
        tail = b"".join(
            (_TERMINATOR, index, _U64BE.pack(len(index)), _U64BE.pack(post_apply_checksum))
        )
        crc = _go_iso(tail, self._crc) | CHECKSUM_FLAG
        out += tail
        out += _U64BE.pack(crc)
        _write_all(self._f, out)
        out.clear()
        flush = getattr(self._f, "flush", None)
        if flush is not None:
            flush()
        self._trailer = Trailer(post_apply_checksum, crc)
        return self._trailer


def _check_trailer_uint(value: int) -> None:
    if not isinstance(value, int) or value < 0 or value > _U64:
        raise InvalidTrailer(f"post-apply checksum {value!r} out of range")


class _Reader:
    """Exact-length reads over any binary stream, tracking the absolute offset.

    Returned views stay valid after later reads: the buffer is replaced, never mutated.
    """

    __slots__ = ("_base", "_buf", "_crc", "_crc_from", "_f", "_len", "_pos", "_view")

    def __init__(self, f: BinaryIO, offset: int = 0) -> None:
        self._f = f
        self._buf = b""
        self._view = memoryview(self._buf)
        self._pos = 0
        self._len = 0
        self._base = offset
        self._crc: int | None = None
        self._crc_from = 0

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def read(self, n: int, what: str) -> memoryview:
        pos = self._pos
        end = pos + n
        if end <= self._len:
            self._pos = end
            return self._view[pos:end]
        self._fill(n)
        if self._len < n:
            raise TruncatedFile(what, self.offset, n, self._len)
        self._pos = n
        return self._view[:n]

    def peek(self, n: int) -> memoryview:
        """Up to n bytes without consuming them; fewer only at end of file."""
        if self._pos + n > self._len:
            self._fill(n)
        return self._view[self._pos : self._pos + n]

    def _fill(self, n: int) -> None:
        pos = self._pos
        if self._crc is not None:
            self._crc = _go_iso(self._view[self._crc_from : pos], self._crc)
            self._crc_from = 0
        parts: list[BytesLike] = [self._view[pos:]]
        have = self._len - pos
        while have < n:
            chunk = self._f.read(max(_READ_CHUNK, n - have))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        self._base += pos
        self._buf = b"".join(parts)
        self._view = memoryview(self._buf)
        self._pos = 0
        self._len = have

    def start_crc(self, crc: int) -> None:
        """Checksum everything consumed from here on, whatever the read sizes."""
        self._crc = crc
        self._crc_from = self._pos

    def stop_crc(self) -> int:
        assert self._crc is not None
        crc = _go_iso(self._view[self._crc_from : self._pos], self._crc)
        self._crc = None
        return crc

    def uvarint(self, what: str) -> int:
        buf = self._buf
        pos = self._pos
        if pos + 10 > self._len:
            self._fill(10)
            buf = self._buf
            pos = 0
        end = min(self._len, pos + 10)
        value = 0
        shift = 0
        while pos < end:
            b = buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                if value > _U64:
                    break
                self._pos = pos
                return value
            shift += 7
        if pos - self._pos >= 10 or value > _U64:
            raise InvalidIndex(f"{what}: varint at offset {self.offset} overflows 64 bits")
        raise TruncatedFile(what, self.offset, pos - self._pos + 1, pos - self._pos)


class Frame(NamedTuple):
    """One decoded page and where its frame sits in the file."""

    pgno: int
    offset: int
    size: int
    data: bytes


def _legacy_frame(r: _Reader, page_size: int, pgno: int) -> tuple[list[memoryview], bytes]:
    """Read an LZ4 frame whose length is known only by walking its blocks."""
    start = r.offset
    head = r.read(7, f"page {pgno} LZ4 frame header")
    if bytes(head[:4]) != _LZ4_FRAME_MAGIC:
        raise InvalidFrame(f"page {pgno} at offset {start}: legacy frame lacks the LZ4 frame magic")
    flg = head[4]
    bd = head[5]
    if flg >> 6 != 1 or flg & 0x02 or bd & 0x8F:
        raise InvalidFrame(f"page {pgno} at offset {start}: unsupported LZ4 frame descriptor")
    parts = [head]
    extra = (8 if flg & 0x08 else 0) + (4 if flg & 0x01 else 0)
    if extra:
        parts.append(r.read(extra, f"page {pgno} LZ4 frame header"))
    block_check = 4 if flg & 0x10 else 0
    limit = max_compressed_size(page_size)
    total = 0
    while True:
        raw = r.read(4, f"page {pgno} LZ4 block size")
        parts.append(raw)
        size = int.from_bytes(raw, "little")
        if size == 0:
            break
        total += size & 0x7FFFFFFF
        if total > limit:
            raise InvalidFrame(
                f"page {pgno} at offset {start}: LZ4 frame blocks exceed {limit} bytes"
            )
        parts.append(r.read((size & 0x7FFFFFFF) + block_check, f"page {pgno} LZ4 block"))
    if flg & 0x04:
        parts.append(r.read(4, f"page {pgno} LZ4 content checksum"))
    try:
        data = lz4.frame.decompress(b"".join(parts))
    except (RuntimeError, ValueError, _LZ4BlockError) as exc:
        raise InvalidFrame(f"page {pgno} at offset {start}: LZ4 frame does not decompress") from exc
    return parts, data


class Decoder:
    """Streams an LTX file, checking everything; the verdict is final once `pages()` ends.

    Pages are yielded before the file checksum at the end can be checked, so a
    caller that must not act on a bad file runs `verify` first.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._r = _Reader(f)
        raw = self._r.read(HEADER_SIZE, "header")
        self.header = Header.unpack(raw)
        self.header.validate()
        self._crc = _go_iso(raw)
        self.trailer: Trailer | None = None
        self._pgnos = array.array("I")
        self._sizes = array.array("I")
        self._sums = array.array("Q")
        self._started = False

    @property
    def page_count(self) -> int:
        return len(self._pgnos)

    def page_checksums(self) -> Iterator[tuple[int, int]]:
        """(page number, page checksum) of every page decoded so far."""
        return zip(self._pgnos, self._sums, strict=True)

    def pages(self) -> Iterator[tuple[int, bytes]]:
        for frame in self.frames():
            yield frame.pgno, frame.data

    def frames(self) -> Iterator[Frame]:
        if self._started:
            raise LTXError("a decoder reads its file once")
        self._started = True
        header = self.header
        ps = header.page_size
        commit = header.commit
        snapshot = header.is_snapshot
        lock = lock_page(ps)
        limit = max_compressed_size(ps)
        r = self._r
        read = r.read
        unpack_head = _FRAME_HEAD.unpack_from
        unpack_u32 = _U32BE.unpack_from
        decompress = _decompress
        go_iso = _go_iso
        pack_pgno = _PGNO
        pgnos = self._pgnos
        sizes = self._sizes
        sums = self._sums
        crc = self._crc
        prev = 0
        while True:
            offset = r.offset
            head = read(6, "frame header")
            pgno, flags = unpack_head(head)
            if pgno == 0:
                if flags:
                    raise InvalidFrame(
                        f"terminator at offset {offset} has flags 0x{flags:04x}, must be zero"
                    )
                crc = go_iso(head, crc)
                break
            if flags & ~PAGE_FLAG_SIZE:
                raise InvalidFrame(
                    f"page {pgno} at offset {offset} has unknown flags 0x{flags:04x}"
                )
            if pgno <= prev:
                raise InvalidFrame(
                    f"page {pgno} at offset {offset} follows page {prev}: pages must ascend"
                )
            if pgno > commit:
                raise InvalidFrame(f"page {pgno} at offset {offset} is beyond commit {commit}")
            if pgno == lock:
                raise InvalidFrame(f"page {pgno} at offset {offset} is the lock page")
            if snapshot and pgno != (prev + 2 if prev + 1 == lock else prev + 1):
                raise InvalidFrame(f"snapshot skips from page {prev} to {pgno} at offset {offset}")
            if flags:
                raw_size = read(4, f"page {pgno} size")
                (size,) = unpack_u32(raw_size)
                if size > limit:
                    raise InvalidFrame(
                        f"page {pgno} at offset {offset}: compressed size {size} exceeds "
                        f"the LZ4 bound {limit}"
                    )
                payload = read(size, f"page {pgno} data")
                try:
                    data = decompress(payload, uncompressed_size=ps)
                except _LZ4BlockError:
                    raise InvalidFrame(
                        f"page {pgno} at offset {offset}: LZ4 block does not decompress "
                        f"to {ps} bytes"
                    ) from None
                crc = go_iso(raw_size, go_iso(head, crc))
                length = size + 10
            else:
                parts, data = _legacy_frame(r, ps, pgno)
                crc = go_iso(head, crc)
                length = 6 + sum(len(p) for p in parts)
            if len(data) != ps:
                raise InvalidFrame(
                    f"page {pgno} at offset {offset} decompresses to {len(data)} bytes, "
                    f"page size is {ps}"
                )
            crc = go_iso(data, crc)
            pgnos.append(pgno)
            sizes.append(length)
            sums.append(go_iso(data, go_iso(pack_pgno(pgno))) | CHECKSUM_FLAG)
            prev = pgno
            yield Frame(pgno, offset, length, data)
        if snapshot:
            expected_last = commit - 1 if commit == lock else commit
            if prev != expected_last:
                raise InvalidFrame(
                    f"snapshot ends at page {prev}, needs every page through {expected_last}"
                )
        self._crc = crc
        self._finish()

    def _finish(self) -> None:
        r = self._r
        r.start_crc(self._crc)
        start = r.offset
        offset = HEADER_SIZE
        for i, (pgno, size) in enumerate(zip(self._pgnos, self._sizes, strict=True)):
            at = r.offset
            got = (r.uvarint("page index"), r.uvarint("page index"), r.uvarint("page index"))
            if got != (pgno, offset, size):
                raise InvalidIndex(
                    f"index entry {i} at offset {at} is (page {got[0]}, offset {got[1]}, "
                    f"size {got[2]}), the frame is (page {pgno}, offset {offset}, size {size})"
                )
            offset += size
        at = r.offset
        end = r.uvarint("page index")
        if end != 0:
            raise InvalidIndex(
                f"index has more entries than the {self.page_count} frames (offset {at})"
            )
        length = r.offset - start
        at = r.offset
        (stored,) = _U64BE.unpack(r.read(8, "page index length"))
        if stored != length:
            raise InvalidIndex(
                f"index length field at offset {at} says {stored}, index is {length}"
            )
        at = r.offset
        (post,) = _U64BE.unpack(r.read(8, "trailer"))
        crc = r.stop_crc() | CHECKSUM_FLAG
        (file_sum,) = _U64BE.unpack(r.read(8, "trailer"))
        trailer = Trailer(post, file_sum)
        trailer.validate(self.header)
        if file_sum != crc:
            raise ChecksumMismatch(file_sum, crc)
        extra = len(r.peek(1))
        if extra:
            raise InvalidTrailer(f"unexpected data after the trailer at offset {r.offset}")
        if self.header.is_snapshot and self.header.has_checksums:
            actual = reduce(xor, self._sums, 0) | CHECKSUM_FLAG
            if actual != post:
                raise PostApplyChecksumMismatch(post, actual)
        self.trailer = trailer


def verify(f: BinaryIO) -> tuple[Header, Trailer]:
    """Check a whole file; run this before any of its pages may reach a database."""
    dec = Decoder(f)
    for _ in dec.frames():
        pass
    assert dec.trailer is not None
    return dec.header, dec.trailer


def _decode_frame(raw: bytes, page_size: int, pgno: int, offset: int) -> bytes:
    if len(raw) < FRAME_HEADER_SIZE:
        raise InvalidIndex(f"index gives page {pgno} a frame of only {len(raw)} bytes")
    got, flags = _FRAME_HEAD.unpack_from(raw)
    if got != pgno:
        raise InvalidIndex(f"index points page {pgno} at offset {offset}, which holds page {got}")
    if flags == PAGE_FLAG_SIZE:
        if len(raw) < 10:
            raise InvalidIndex(f"index gives page {pgno} a frame of only {len(raw)} bytes")
        (size,) = _U32BE.unpack_from(raw, 6)
        if size != len(raw) - 10:
            raise InvalidIndex(
                f"page {pgno} frame holds {size} compressed bytes, index says {len(raw) - 10}"
            )
        try:
            data = _decompress(memoryview(raw)[10:], uncompressed_size=page_size)
        except _LZ4BlockError:
            raise InvalidFrame(
                f"page {pgno} at offset {offset}: LZ4 block does not decompress"
            ) from None
    elif flags == 0:
        try:
            data = lz4.frame.decompress(raw[6:])
        except (RuntimeError, ValueError, _LZ4BlockError):
            raise InvalidFrame(
                f"page {pgno} at offset {offset}: LZ4 frame does not decompress"
            ) from None
    else:
        raise InvalidFrame(f"page {pgno} at offset {offset} has unknown flags 0x{flags:04x}")
    if len(data) != page_size:
        raise InvalidFrame(
            f"page {pgno} at offset {offset} decompresses to {len(data)} bytes, "
            f"page size is {page_size}"
        )
    return data


class PageIndex:
    """The index at a file's end, for fetching single pages without decoding the rest.

    Random access checks the frame it reads but not the file checksum: run
    `verify` once when the whole file must be trusted.
    """

    def __init__(self, header: Header, entries: dict[int, tuple[int, int]]) -> None:
        self.header = header
        self.entries = entries

    @classmethod
    def read(cls, f: BinaryIO) -> PageIndex:
        f.seek(0)
        raw = f.read(HEADER_SIZE)
        if len(raw) < HEADER_SIZE:
            raise TruncatedFile("header", len(raw), HEADER_SIZE, len(raw))
        header = Header.unpack(raw)
        header.validate()
        size = f.seek(0, os.SEEK_END)
        tail = TRAILER_SIZE + 8
        if size < HEADER_SIZE + FRAME_HEADER_SIZE + 1 + tail:
            raise TruncatedFile("index and trailer", HEADER_SIZE, tail + 7, size - HEADER_SIZE)
        f.seek(size - tail)
        (length,) = _U64BE.unpack(f.read(8))
        end = size - tail
        start = end - length
        if length < 1 or start < HEADER_SIZE + FRAME_HEADER_SIZE:
            raise InvalidIndex(f"index length {length} does not fit a file of {size} bytes")
        f.seek(start)
        raw_index = f.read(length)
        entries: dict[int, tuple[int, int]] = {}
        pos = 0
        prev_pgno = 0
        next_offset = HEADER_SIZE
        frames_end = start - FRAME_HEADER_SIZE

        def varint() -> int:
            nonlocal pos
            value = 0
            shift = 0
            while pos < length and shift < 70:
                b = raw_index[pos]
                pos += 1
                value |= (b & 0x7F) << shift
                if b < 0x80:
                    return value
                shift += 7
            raise InvalidIndex(f"index ends inside a varint at offset {start + pos}")

        while True:
            pgno = varint()
            if pgno == 0:
                break
            offset = varint()
            frame_size = varint()
            if pgno <= prev_pgno:
                raise InvalidIndex(f"index lists page {pgno} after page {prev_pgno}")
            if pgno > header.commit:
                raise InvalidIndex(f"index lists page {pgno} beyond commit {header.commit}")
            if offset != next_offset or frame_size < 11 or offset + frame_size > frames_end:
                raise InvalidIndex(
                    f"index places page {pgno} at offset {offset} size {frame_size}, "
                    f"outside the page block {HEADER_SIZE}..{frames_end}"
                )
            entries[pgno] = (offset, frame_size)
            prev_pgno = pgno
            next_offset = offset + frame_size
        if pos != length:
            raise InvalidIndex(f"index has {length - pos} bytes after its terminator")
        if next_offset != frames_end:
            raise InvalidIndex(
                f"index frames end at offset {next_offset}, terminator is at {frames_end}"
            )
        f.seek(frames_end)
        if f.read(FRAME_HEADER_SIZE) != _TERMINATOR:
            raise InvalidIndex(f"no page block terminator at offset {frames_end}")
        return cls(header, entries)

    def read_page(self, f: BinaryIO, pgno: int) -> bytes:
        try:
            offset, size = self.entries[pgno]
        except KeyError:
            raise PageNotFound(f"page {pgno} is not in this file") from None
        f.seek(offset)
        raw = f.read(size)
        if len(raw) < size:
            raise TruncatedFile(f"page {pgno} frame", offset + len(raw), size, len(raw))
        return _decode_frame(raw, self.header.page_size, pgno, offset)


def read_page_index(f: BinaryIO) -> dict[int, tuple[int, int]]:
    """Page number -> (frame offset, frame length), from the index at the file's end."""
    return PageIndex.read(f).entries


def read_page(f: BinaryIO, pgno: int) -> bytes:
    """One page's contents, read through the index without decoding other pages."""
    return PageIndex.read(f).read_page(f, pgno)


def _require_growth_pages(pgnos: array.array[int], old: int, commit: int, page_size: int) -> None:
    """A file that grows the database must carry every new page: holes would be guesses."""
    if commit <= old:
        return
    lock = lock_page(page_size)
    expected = old + 1
    for pgno in pgnos:
        if pgno <= old:
            continue
        if expected == lock:
            expected += 1
        if pgno != expected:
            break
        expected += 1
    if expected == lock:
        expected += 1
    if expected <= commit:
        raise InvalidFrame(
            f"file grows the database from {old} to {commit} pages but lacks page {expected}"
        )


@dataclass(frozen=True, slots=True)
class CheckedApply:
    """A file that `check_apply` found fit to apply, and the page-checksum
    array the database will have once it is written."""

    header: Header
    trailer: Trailer
    checksums: array.array[int] | None


def check_apply(
    ltx: BinaryIO, db_fd: int, *, checksums: array.array[int] | None = None
) -> CheckedApply:
    """Make every check `apply_file` makes, in one pass, and write nothing.

    The file is verified in full, the database's checksum is compared with the
    file's pre-apply checksum, and the resulting checksum is predicted and
    compared with the trailer. `checksums`, when given, is the database's
    current page-checksum array, trusted instead of reading the database.
    """
    dec = Decoder(ltx)
    for _ in dec.frames():
        pass
    header = dec.header
    trailer = dec.trailer
    assert trailer is not None
    ps = header.page_size
    commit = header.commit
    current = checksums
    state: array.array[int] | None
    if header.is_snapshot:
        state = array.array("Q", bytes(8 * commit))
    else:
        if current is None:
            size = os.fstat(db_fd).st_size
            if size % ps:
                raise InvalidDatabase(
                    f"database size {size} is not a multiple of the file's page size {ps}"
                )
            count = size // ps
            if header.has_checksums:
                current = page_checksums(db_fd, ps, count)
        else:
            count = len(current)
        if header.has_checksums:
            assert current is not None
            actual = checksum_of(current)
            if actual != header.pre_apply_checksum:
                raise PreApplyChecksumMismatch(header.pre_apply_checksum, actual)
        _require_growth_pages(dec._pgnos, count, commit, ps)
        if current is None:
            state = None
        else:
            state = array.array("Q", current[:commit])
            state.extend(array.array("Q", bytes(8 * (commit - len(state)))))
    if state is not None:
        for pgno, value in dec.page_checksums():
            state[pgno - 1] = value
        if header.has_checksums:
            predicted = checksum_of(state)
            if predicted != trailer.post_apply_checksum:
                raise PostApplyChecksumMismatch(trailer.post_apply_checksum, predicted)
    return CheckedApply(header, trailer, state)


def write_pages(ltx: BinaryIO, db_fd: int, checked: CheckedApply, *, sync: bool = True) -> None:
    """Write a checked file's pages and size into the database.

    The file must be the one `check_apply` read, unchanged (LTX files are
    written once and never modified).
    """
    ltx.seek(0)
    store_pages(Decoder(ltx).pages(), db_fd, checked.header, sync=sync)


def store_pages(
    pages: Iterable[tuple[int, bytes]], db_fd: int, header: Header, *, sync: bool = True
) -> None:
    """Write a file's pages, in runs of neighbours, and cut the database to
    the file's commit size."""
    ps = header.page_size
    run = bytearray()
    run_start = 0
    for pgno, data in pages:
        if run and (pgno - 1) * ps != run_start + len(run):
            _pwrite_all(db_fd, run, run_start)
            run.clear()
        if not run:
            run_start = (pgno - 1) * ps
        run += data
        if len(run) >= _WRITE_CHUNK:
            _pwrite_all(db_fd, run, run_start)
            run_start += len(run)
            run.clear()
    if run:
        _pwrite_all(db_fd, run, run_start)
    os.ftruncate(db_fd, header.commit * ps)
    if sync:
        os.fsync(db_fd)


def apply_file(
    ltx: BinaryIO,
    db_fd: int,
    *,
    checksums: array.array[int] | None = None,
    sync: bool = True,
) -> tuple[Header, Trailer]:
    """Bring a database forward by one file, or refuse and leave it untouched.

    All of `check_apply`'s checks come before the first write. `checksums`,
    when given, is updated in place. `sync=False` leaves the database
    unsynced, for a replica that can always fetch the file again.
    """
    checked = check_apply(ltx, db_fd, checksums=checksums)
    write_pages(ltx, db_fd, checked, sync=sync)
    if checksums is not None and checked.checksums is not None:
        checksums[:] = checked.checksums
    return checked.header, checked.trailer


def _pwrite_all(fd: int, data: bytearray, offset: int) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)


def encode_snapshot(
    db: BinaryIO | str | os.PathLike[str],
    out: BinaryIO,
    *,
    txid: int = 1,
    timestamp: int | None = None,
    node_id: int = 0,
    checksums: array.array[int] | None = None,
) -> tuple[Header, Trailer]:
    """Write a snapshot of a whole SQLite file: a replica can start from it
    alone. `checksums`, if given, is filled with every page's checksum, as
    `page_checksums` would read them."""
    if isinstance(db, (str, os.PathLike)):
        with open(db, "rb") as f:
            return encode_snapshot(
                f, out, txid=txid, timestamp=timestamp, node_id=node_id, checksums=checksums
            )
    page_size, count = _database_geometry(db)
    if checksums is not None:
        checksums[:] = array.array("Q", bytes(8 * count))
    header = Header(
        flags=0,
        page_size=page_size or DEFAULT_PAGE_SIZE,
        commit=count,
        min_txid=1,
        max_txid=txid,
        timestamp=int(time.time() * 1000) if timestamp is None else timestamp,
        pre_apply_checksum=0,
        node_id=node_id,
    )
    enc = Encoder(out, header)
    total = 0
    if count:
        per = max(1, _SCAN_CHUNK // page_size)
        buf = bytearray(per * page_size)
        whole = memoryview(buf)
        try:
            pgno = 1
            while pgno <= count:
                n = min(per, count - pgno + 1)
                view = whole[: n * page_size]
                got = _read_at(db, view, (pgno - 1) * page_size)
                if got < len(view):
                    raise InvalidDatabase(
                        f"database shrank while being read: ends at byte "
                        f"{(pgno - 1) * page_size + got}"
                    )
                total ^= enc._write_run(pgno, pgno + n - 1, view, True, checksums)
                view.release()
                pgno += n
        finally:
            whole.release()
    trailer = enc.finish(total | CHECKSUM_FLAG)
    return header, trailer


def format_filename(min_txid: int, max_txid: int) -> str:
    return f"{min_txid:016x}-{max_txid:016x}.ltx"


def parse_filename(name: str) -> tuple[int, int]:
    """(min TXID, max TXID) from a file name, refusing anything not written by `format_filename`."""
    m = _FILENAME.fullmatch(name)
    if m is None:
        raise InvalidFilename(f"{name!r} is not an LTX file name (<16 hex>-<16 hex>.ltx)")
    lo, hi = int(m.group(1), 16), int(m.group(2), 16)
    if lo == 0 or hi < lo:
        raise InvalidFilename(f"{name!r} names an impossible TXID range {lo}..{hi}")
    return lo, hi
