"""The LTX library: checksums, header rules, encoder and decoder checks, random access, apply."""

from __future__ import annotations

import array
import dataclasses
import io
import os
import sqlite3
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lz4.block
import lz4.frame
import pytest

from litefs import ltx
from litefs.ltx import CHECKSUM_FLAG, Header

PS = 512


def page(pgno: int, fill: int = 0, size: int = PS) -> bytes:
    """A recognisable page: its number, a fill byte, then zeros (compressible like SQLite's)."""
    body = struct.pack(">I", pgno) + bytes([fill]) * 40
    return body + bytes(size - len(body))


def db_checksum(pages: dict[int, bytes]) -> int:
    total = 0
    for pgno, data in pages.items():
        total ^= ltx.page_checksum(pgno, data)
    return total | CHECKSUM_FLAG


def snapshot_header(commit: int, page_size: int = PS, **changes: int) -> Header:
    fields = dict(
        flags=0,
        page_size=page_size,
        commit=commit,
        min_txid=1,
        max_txid=1,
        timestamp=1_700_000_000_000,
        pre_apply_checksum=0,
    )
    fields.update(changes)
    return Header(**fields)


def delta_header(commit: int, pre: int, txid: int = 2, **changes: int) -> Header:
    return dataclasses.replace(
        snapshot_header(commit, **changes), min_txid=txid, max_txid=txid, pre_apply_checksum=pre
    )


def encode(header: Header, pages: dict[int, bytes], post: int | None = None) -> bytes:
    out = io.BytesIO()
    enc = ltx.Encoder(out, header)
    for pgno in sorted(pages):
        enc.write_page(pgno, pages[pgno])
    if post is None:
        post = db_checksum(pages) if header.is_snapshot else CHECKSUM_FLAG | 0x1234
    enc.finish(post)
    return out.getvalue()


def uvarint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


@dataclass
class RawFrame:
    """A frame as it will sit in the file; `data` is what its checksum covers."""

    pgno: int
    data: bytes
    flags: int = ltx.PAGE_FLAG_SIZE
    payload: bytes | None = None
    size: int | None = None

    def encoded(self) -> tuple[bytes, bytes]:
        """(bytes in the file, bytes the file checksum covers)."""
        head = struct.pack(">IH", self.pgno, self.flags)
        if self.flags & ltx.PAGE_FLAG_SIZE:
            payload = (
                lz4.block.compress(self.data, store_size=False)
                if self.payload is None
                else self.payload
            )
            size = struct.pack(">I", len(payload) if self.size is None else self.size)
            return head + size + payload, head + size + self.data
        payload = lz4.frame.compress(self.data) if self.payload is None else self.payload
        return head + payload, head + self.data


@dataclass
class RawFile:
    """Assembles any file, valid or not, with a correct file checksum unless told otherwise."""

    header: bytes
    frames: list[RawFrame]
    post: int
    index: bytes | None = None
    index_length: int | None = None
    terminator: bytes = bytes(6)
    file_checksum: int | None = None
    after: bytes = b""
    offsets: list[int] = field(default_factory=list)

    def build(self) -> bytes:
        body = bytearray(self.header)
        covered = bytearray(self.header)
        entries = bytearray()
        for frame in self.frames:
            raw, crc_part = frame.encoded()
            entries += uvarint(frame.pgno) + uvarint(len(body)) + uvarint(len(raw))
            body += raw
            covered += crc_part
        body += self.terminator
        covered += self.terminator
        index = bytes(entries) + b"\x00" if self.index is None else self.index
        length = len(index) if self.index_length is None else self.index_length
        tail = index + struct.pack(">QQ", length, self.post)
        body += tail
        covered += tail
        checksum = ltx.crc64(bytes(covered)) | CHECKSUM_FLAG
        if self.file_checksum is not None:
            checksum = self.file_checksum
        return bytes(body) + struct.pack(">Q", checksum) + self.after


def raw_header(header: Header, **overrides: object) -> bytes:
    """Pack a header without validating it, so invalid ones can be written."""
    values = dataclasses.asdict(header)
    magic = overrides.pop("magic", ltx.MAGIC)
    reserved = overrides.pop("reserved", bytes(20))
    values.update(overrides)
    return struct.pack(
        ">4sIIIQQQQQQIIQ20s",
        magic,
        *(values[f.name] for f in dataclasses.fields(Header)),
        reserved,
    )


def snapshot_raw(commit: int = 3, **changes: object) -> RawFile:
    pages = {n: page(n) for n in range(1, commit + 1)}
    raw = RawFile(
        header=raw_header(snapshot_header(commit)),
        frames=[RawFrame(n, d) for n, d in pages.items()],
        post=db_checksum(pages),
    )
    return dataclasses.replace(raw, **changes)  # type: ignore[arg-type]


def delta_raw(pgnos: list[int], commit: int = 5, **changes: object) -> RawFile:
    raw = RawFile(
        header=raw_header(delta_header(commit, CHECKSUM_FLAG | 1)),
        frames=[RawFrame(n, page(n)) for n in pgnos],
        post=CHECKSUM_FLAG | 2,
    )
    return dataclasses.replace(raw, **changes)  # type: ignore[arg-type]


# --- checksums ---------------------------------------------------------------


def test_crc64_check_value() -> None:
    assert ltx.crc64(b"123456789") == 0xB90956C775A41001


@pytest.mark.parametrize("cut", [0, 1, 4, 9])
def test_crc64_chains_like_one_pass(cut: int) -> None:
    data = b"123456789"
    assert ltx.crc64(data[cut:], ltx.crc64(data[:cut])) == ltx.crc64(data)
    chained = 0
    for i in range(len(data)):
        chained = ltx.crc64(data[i : i + 1], chained)
    assert chained == ltx.crc64(data)


def test_page_checksum_covers_page_number_then_data() -> None:
    data = page(7, 3)
    expected = ltx.crc64(struct.pack(">I", 7) + data) | CHECKSUM_FLAG
    assert ltx.page_checksum(7, data) == expected
    assert ltx.page_checksum(7, memoryview(data)) == expected
    assert ltx.page_checksum(8, data) != expected
    assert ltx.page_checksum(1, bytes(PS)) & CHECKSUM_FLAG


@pytest.mark.parametrize(
    ("page_size", "lock"), [(512, 2097153), (1024, 1048577), (4096, 262145), (65536, 16385)]
)
def test_lock_page_holds_the_pending_byte(page_size: int, lock: int) -> None:
    assert ltx.lock_page(page_size) == lock
    assert (lock - 1) * page_size <= 0x40000000 < lock * page_size


@pytest.mark.parametrize(("raw", "size"), [(512, 512), (4096, 4096), (32768, 32768), (1, 65536)])
def test_sqlite_page_size(raw: int, size: int) -> None:
    header = ltx.SQLITE_MAGIC + struct.pack(">H", raw) + bytes(82)
    assert ltx.sqlite_page_size(header) == size


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"SQLite format 3",
        b"Not SQLite at all\x00\x10\x00",
        ltx.SQLITE_MAGIC + struct.pack(">H", 1000),
        ltx.SQLITE_MAGIC + struct.pack(">H", 256),
        ltx.SQLITE_MAGIC + struct.pack(">H", 0),
    ],
)
def test_sqlite_page_size_rejects_non_sqlite(header: bytes) -> None:
    with pytest.raises(ltx.InvalidDatabase):
        ltx.sqlite_page_size(header)


def make_sqlite(path: Path, rows: int = 50, page_size: int = 1024) -> Path:
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA page_size={page_size}")
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    con.executemany("INSERT INTO t(v) VALUES (?)", [(f"value {i} " * 20,) for i in range(rows)])
    con.commit()
    con.close()
    return path


def test_page_checksums_and_database_checksum(tmp_path: Path) -> None:
    db = make_sqlite(tmp_path / "a.db")
    data = db.read_bytes()
    count = len(data) // 1024
    pages = {n: data[(n - 1) * 1024 : n * 1024] for n in range(1, count + 1)}
    expected = array.array("Q", [ltx.page_checksum(n, d) for n, d in pages.items()])
    with open(db, "rb") as f:
        assert ltx.page_checksums(f, 1024, count) == expected
    fd = os.open(db, os.O_RDONLY)
    try:
        assert ltx.page_checksums(fd, 1024, count) == expected
    finally:
        os.close(fd)
    assert ltx.checksum_of(expected) == db_checksum(pages)
    assert ltx.database_checksum(db) == db_checksum(pages)


def test_page_checksums_refuse_a_short_file(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(bytes(1000))
    with open(path, "rb") as f, pytest.raises(ltx.InvalidDatabase, match="ends at byte 1000"):
        ltx.page_checksums(f, 512, 3)


def test_database_checksum_of_empty_and_invalid_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert ltx.database_checksum(empty) == ltx.EMPTY_DATABASE_CHECKSUM
    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(ltx.InvalidDatabase):
        ltx.database_checksum(garbage)
    ragged = tmp_path / "ragged"
    ragged.write_bytes(make_sqlite(tmp_path / "r.db").read_bytes() + b"x")
    with pytest.raises(ltx.InvalidDatabase, match="not a multiple"):
        ltx.database_checksum(ragged)


def test_lock_page_is_skipped_by_checksums_and_snapshots(tmp_path: Path) -> None:
    page_size = 65536
    lock = ltx.lock_page(page_size)
    count = lock + 1
    db = tmp_path / "big.db"
    with open(db, "wb") as f:
        f.write(ltx.SQLITE_MAGIC + struct.pack(">H", 1) + bytes(82))
        f.truncate(count * page_size)
        f.seek((count - 1) * page_size)
        f.write(b"last page")
    with open(db, "rb") as f:
        sums = ltx.page_checksums(f, page_size, count)
    assert sums[lock - 1] == 0
    assert all(sums[i] for i in range(count) if i != lock - 1)
    out = io.BytesIO()
    header, trailer = ltx.encode_snapshot(db, out, timestamp=1)
    assert header.commit == count
    assert trailer.post_apply_checksum == ltx.checksum_of(sums) == ltx.database_checksum(db)
    out.seek(0)
    dec = ltx.Decoder(out)
    pgnos = [pgno for pgno, _ in dec.pages()]
    assert lock not in pgnos
    assert len(pgnos) == count - 1
    assert pgnos[-1] == count


# --- header ------------------------------------------------------------------


def test_header_round_trips() -> None:
    header = Header(
        flags=0,
        page_size=4096,
        commit=9,
        min_txid=5,
        max_txid=8,
        timestamp=1_700_000_000_123,
        pre_apply_checksum=CHECKSUM_FLAG | 99,
        wal_offset=32,
        wal_size=4128,
        wal_salt1=0xDEADBEEF,
        wal_salt2=7,
        node_id=0xABCDEF,
    )
    raw = header.pack()
    assert len(raw) == ltx.HEADER_SIZE
    assert raw[:4] == ltx.MAGIC
    assert Header.unpack(raw) == header
    assert not header.is_snapshot
    assert snapshot_header(1).is_snapshot


BASE = delta_header(10, CHECKSUM_FLAG | 1)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"flags": 1}, "unknown header flags 0x00000001"),
        ({"flags": 0x100}, "unknown header flags"),
        ({"page_size": 1000}, "invalid page size 1000"),
        ({"page_size": 256}, "invalid page size 256"),
        ({"page_size": 131072}, "invalid page size 131072"),
        ({"min_txid": 0, "max_txid": 0}, "min TXID is 0"),
        ({"min_txid": 5, "max_txid": 4}, "max TXID 4 is below min TXID 5"),
        ({"pre_apply_checksum": 0}, "pre-apply checksum missing"),
        ({"pre_apply_checksum": 5}, "lacks bit 63"),
        ({"min_txid": 1, "pre_apply_checksum": CHECKSUM_FLAG}, "snapshot has pre-apply"),
        ({"flags": 2}, "no-checksum flag"),
        ({"wal_offset": 32}, "WAL offset 32 set without a WAL size"),
        ({"wal_size": 32}, "WAL size 32 set without a WAL offset"),
        ({"wal_salt1": 3}, "WAL salts set without a WAL offset"),
        ({"commit": 1 << 32}, "commit"),
        ({"timestamp": -1}, "timestamp -1 out of range"),
        ({"node_id": 1 << 64}, "node ID"),
    ],
)
def test_header_validate_names_the_field(changes: dict[str, int], message: str) -> None:
    header = dataclasses.replace(BASE, **changes)
    with pytest.raises(ltx.InvalidHeader, match=message):
        header.validate()
    with pytest.raises(ltx.InvalidHeader):
        header.pack()


def test_no_checksum_flag_allows_zero_checksums() -> None:
    header = dataclasses.replace(BASE, flags=ltx.HEADER_FLAG_NO_CHECKSUM, pre_apply_checksum=0)
    header.validate()
    raw = encode(header, {3: page(3)}, post=0)
    h, t = ltx.verify(io.BytesIO(raw))
    assert h == header
    assert t.post_apply_checksum == 0


def test_header_unpack_rejects_wrong_length_magic_and_reserved() -> None:
    good = BASE.pack()
    with pytest.raises(ltx.InvalidHeader, match="100 bytes"):
        Header.unpack(good[:99])
    with pytest.raises(ltx.InvalidHeader, match="bad magic"):
        Header.unpack(b"LTX2" + good[4:])
    with pytest.raises(ltx.InvalidHeader, match="reserved"):
        Header.unpack(good[:99] + b"\x01")


# --- encoder -----------------------------------------------------------------


def test_encoder_output_decodes_back() -> None:
    pages = {2: page(2, 1), 5: page(5, 2), 9: page(9, 3)}
    header = delta_header(10, CHECKSUM_FLAG | 77)
    raw = encode(header, pages, post=CHECKSUM_FLAG | 78)
    dec = ltx.Decoder(io.BytesIO(raw))
    assert dec.header == header
    assert dict(dec.pages()) == pages
    assert dec.trailer is not None
    assert dec.trailer.post_apply_checksum == CHECKSUM_FLAG | 78
    assert dec.page_count == 3


def _encoder(header: Header | None = None) -> ltx.Encoder:
    return ltx.Encoder(io.BytesIO(), header or delta_header(10, CHECKSUM_FLAG | 1))


EncoderStep = Callable[[ltx.Encoder], object]


def _pair(e: ltx.Encoder, first: tuple[int, bytes], second: tuple[int, bytes]) -> None:
    e.write_page(*first)
    e.write_page(*second)


ENCODER_MISUSE: list[tuple[str, EncoderStep, type[ltx.LTXError], str]] = [
    ("short page", lambda e: e.write_page(1, bytes(100)), ltx.InvalidFrame, "100 bytes"),
    ("long page", lambda e: e.write_page(1, bytes(PS + 1)), ltx.InvalidFrame, "513 bytes"),
    ("page zero", lambda e: e.write_page(0, page(0)), ltx.InvalidFrame, "ascend"),
    (
        "descending",
        lambda e: _pair(e, (3, page(3)), (2, page(2))),
        ltx.InvalidFrame,
        "page 2 written after page 3",
    ),
    (
        "duplicate",
        lambda e: _pair(e, (3, page(3)), (3, page(3))),
        ltx.InvalidFrame,
        "ascend",
    ),
    ("beyond commit", lambda e: e.write_page(11, page(11)), ltx.InvalidFrame, "beyond commit"),
    (
        "post-apply without flag",
        lambda e: e.finish(5),
        ltx.InvalidTrailer,
        "lacks bit 63",
    ),
    (
        "write after finish",
        lambda e: (e.finish(CHECKSUM_FLAG), e.write_page(1, page(1))),  # type: ignore[func-returns-value]
        ltx.EncoderFinished,
        "finished",
    ),
    (
        "finish twice",
        lambda e: (e.finish(CHECKSUM_FLAG), e.finish(CHECKSUM_FLAG)),
        ltx.EncoderFinished,
        "finished",
    ),
]


@pytest.mark.parametrize(
    ("step", "error", "message"),
    [case[1:] for case in ENCODER_MISUSE],
    ids=[case[0] for case in ENCODER_MISUSE],
)
def test_encoder_refuses(step: EncoderStep, error: type[ltx.LTXError], message: str) -> None:
    with pytest.raises(error, match=message):
        step(_encoder())


def test_encoder_refuses_the_lock_page() -> None:
    lock = ltx.lock_page(65536)
    enc = _encoder(delta_header(lock + 5, CHECKSUM_FLAG | 1, page_size=65536))
    with pytest.raises(ltx.InvalidFrame, match="lock page"):
        enc.write_page(lock, bytes(65536))


def test_encoder_snapshot_must_be_complete() -> None:
    enc = _encoder(snapshot_header(3))
    enc.write_page(1, page(1))
    with pytest.raises(ltx.InvalidFrame, match="snapshot skips from page 1 to 3"):
        enc.write_page(3, page(3))
    enc.write_page(2, page(2))
    with pytest.raises(ltx.InvalidFrame, match="needs every page through 3"):
        enc.finish(CHECKSUM_FLAG)


def test_encoder_deletion_needs_the_empty_checksum() -> None:
    with pytest.raises(ltx.InvalidTrailer, match="commit 0"):
        _encoder(delta_header(0, CHECKSUM_FLAG | 1)).finish(CHECKSUM_FLAG | 1)
    raw = io.BytesIO()
    ltx.Encoder(raw, delta_header(0, CHECKSUM_FLAG | 1)).finish(ltx.EMPTY_DATABASE_CHECKSUM)
    raw.seek(0)
    header, trailer = ltx.verify(raw)
    assert header.commit == 0
    assert trailer.post_apply_checksum == ltx.EMPTY_DATABASE_CHECKSUM


def test_encoder_refuses_an_invalid_header() -> None:
    with pytest.raises(ltx.InvalidHeader):
        ltx.Encoder(io.BytesIO(), dataclasses.replace(BASE, page_size=100))


class RecordingWriter(io.RawIOBase):
    """A sink that remembers how much had been written at each point."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.total = 0

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        n = len(memoryview(data))  # type: ignore[arg-type]
        half = max(1, n // 2)
        self.total += half
        self.sizes.append(half)
        return half


def test_encoder_streams_and_survives_short_writes() -> None:
    sink = RecordingWriter()
    count = 700
    enc = ltx.Encoder(sink, snapshot_header(count, page_size=4096))  # type: ignore[arg-type]
    rnd = os.urandom(4096 * count)
    for n in range(1, count + 1):
        enc.write_page(n, rnd[(n - 1) * 4096 : n * 4096])
        if n == count // 2:
            written_halfway = sink.total
    enc.finish(CHECKSUM_FLAG)
    assert written_halfway > 0
    assert max(sink.sizes) < 2 << 20
    assert sink.total > 4096 * count


# --- decoder: each malformation has its own exception ---------------------------


def _mutate(raw: RawFile, fn: Callable[[RawFile], object]) -> RawFile:
    fn(raw)
    return raw


def _frame_size_bound() -> int:
    return ltx.max_compressed_size(PS) + 1


MALFORMED: list[tuple[str, Callable[[], bytes], type[ltx.LTXError], str]] = [
    ("empty file", lambda: b"", ltx.TruncatedFile, "offset 0: header needs 100 bytes"),
    ("short header", lambda: snapshot_raw().build()[:60], ltx.TruncatedFile, "header"),
    (
        "bad magic",
        lambda: snapshot_raw(header=raw_header(snapshot_header(3), magic=b"LTX0")).build(),
        ltx.InvalidHeader,
        "bad magic",
    ),
    (
        "sqlite file",
        lambda: ltx.SQLITE_MAGIC + bytes(4080),
        ltx.InvalidHeader,
        "not an LTX file",
    ),
    (
        "unknown flag",
        lambda: snapshot_raw(header=raw_header(snapshot_header(3), flags=1)).build(),
        ltx.InvalidHeader,
        "unknown header flags",
    ),
    (
        "page size",
        lambda: snapshot_raw(header=raw_header(snapshot_header(3), page_size=768)).build(),
        ltx.InvalidHeader,
        "invalid page size 768",
    ),
    (
        "txid order",
        lambda: delta_raw([2], header=raw_header(BASE, min_txid=9, max_txid=8)).build(),
        ltx.InvalidHeader,
        "max TXID 8 is below min TXID 9",
    ),
    (
        "zero min txid",
        lambda: delta_raw([2], header=raw_header(BASE, min_txid=0)).build(),
        ltx.InvalidHeader,
        "min TXID is 0",
    ),
    (
        "delta without pre-apply",
        lambda: delta_raw([2], header=raw_header(BASE, pre_apply_checksum=0)).build(),
        ltx.InvalidHeader,
        "pre-apply checksum missing",
    ),
    (
        "pre-apply without flag bit",
        lambda: delta_raw([2], header=raw_header(BASE, pre_apply_checksum=12)).build(),
        ltx.InvalidHeader,
        "lacks bit 63",
    ),
    (
        "snapshot with pre-apply",
        lambda: snapshot_raw(
            header=raw_header(snapshot_header(3), pre_apply_checksum=CHECKSUM_FLAG | 1)
        ).build(),
        ltx.InvalidHeader,
        "snapshot has pre-apply",
    ),
    (
        "reserved bytes",
        lambda: snapshot_raw(header=raw_header(snapshot_header(3), reserved=b"x" * 20)).build(),
        ltx.InvalidHeader,
        "reserved",
    ),
    (
        "descending pages",
        lambda: delta_raw([3, 2]).build(),
        ltx.InvalidFrame,
        "page 2 at offset .* follows page 3",
    ),
    ("duplicate page", lambda: delta_raw([3, 3]).build(), ltx.InvalidFrame, "follows page 3"),
    ("page beyond commit", lambda: delta_raw([2, 6]).build(), ltx.InvalidFrame, "beyond commit 5"),
    (
        "snapshot gap",
        lambda: _mutate(snapshot_raw(), lambda r: r.frames.pop(1)).build(),
        ltx.InvalidFrame,
        "snapshot skips from page 1 to 3",
    ),
    (
        "snapshot short",
        lambda: _mutate(snapshot_raw(), lambda r: r.frames.pop()).build(),
        ltx.InvalidFrame,
        "snapshot ends at page 2, needs every page through 3",
    ),
    (
        "unknown page flag",
        lambda: delta_raw([2], frames=[RawFrame(2, page(2), flags=0x3)]).build(),
        ltx.InvalidFrame,
        "unknown flags 0x0003",
    ),
    (
        "wrong decompressed size",
        lambda: delta_raw([2], frames=[RawFrame(2, page(2, size=256))]).build(),
        ltx.InvalidFrame,
        "decompresses to 256 bytes, page size is 512",
    ),
    (
        "garbage payload",
        lambda: delta_raw([2], frames=[RawFrame(2, page(2), payload=b"\xff" * 40)]).build(),
        ltx.InvalidFrame,
        "does not decompress",
    ),
    (
        "size over the lz4 bound",
        lambda: delta_raw(
            [2], frames=[RawFrame(2, page(2), payload=bytes(_frame_size_bound()))]
        ).build(),
        ltx.InvalidFrame,
        "exceeds the LZ4 bound",
    ),
    (
        "terminator with flags",
        lambda: delta_raw([2], terminator=b"\x00\x00\x00\x00\x00\x01").build(),
        ltx.InvalidFrame,
        "terminator",
    ),
    (
        "legacy frame garbage",
        lambda: delta_raw([2], frames=[RawFrame(2, page(2), flags=0, payload=b"junk" * 4)]).build(),
        ltx.InvalidFrame,
        "LZ4 frame magic",
    ),
    (
        "legacy frame corrupt",
        lambda: delta_raw(
            [2],
            frames=[
                RawFrame(
                    2,
                    page(2),
                    flags=0,
                    payload=lz4.frame.compress(page(2), content_checksum=True)[:-4]
                    + b"\x00\x00\x00\x00",
                )
            ],
        ).build(),
        ltx.InvalidFrame,
        "does not decompress",
    ),
    (
        "index wrong offset",
        lambda: delta_raw([2], index=uvarint(2) + uvarint(101) + uvarint(40) + b"\x00").build(),
        ltx.InvalidIndex,
        "index entry 0",
    ),
    (
        "index missing entry",
        lambda: delta_raw([2], index=b"\x00").build(),
        ltx.InvalidIndex,
        "index entry 0",
    ),
    (
        "index extra entry",
        lambda: delta_raw([], index=uvarint(2) + uvarint(100) + uvarint(40) + b"\x00").build(),
        ltx.InvalidIndex,
        "more entries",
    ),
    (
        "index length",
        lambda: delta_raw([2], index_length=3).build(),
        ltx.InvalidIndex,
        "index length field",
    ),
    (
        "overlong varint",
        lambda: delta_raw([], index=b"\xff" * 10 + b"\x01" + b"\x00").build(),
        ltx.InvalidIndex,
        "overflows 64 bits",
    ),
    (
        "file checksum",
        lambda: delta_raw([2], file_checksum=CHECKSUM_FLAG | 1).build(),
        ltx.ChecksumMismatch,
        "file checksum mismatch: expected 8000000000000001, got [0-9a-f]{16}$",
    ),
    (
        "post-apply without flag bit",
        lambda: delta_raw([2], post=7).build(),
        ltx.InvalidTrailer,
        "post-apply checksum 0000000000000007 lacks bit 63",
    ),
    (
        "deletion with a checksum",
        lambda: RawFile(
            raw_header(delta_header(0, CHECKSUM_FLAG | 1)), [], CHECKSUM_FLAG | 3
        ).build(),
        ltx.InvalidTrailer,
        "commit 0",
    ),
    (
        "data after the trailer",
        lambda: delta_raw([2], after=b"\x00").build(),
        ltx.InvalidTrailer,
        "after the trailer",
    ),
    (
        "snapshot post-apply wrong",
        lambda: snapshot_raw(post=CHECKSUM_FLAG | 5).build(),
        ltx.PostApplyChecksumMismatch,
        "trailer says 8000000000000005",
    ),
    (
        "cut in a page",
        lambda: delta_raw([2]).build()[:120],
        ltx.TruncatedFile,
        "offset 110: page 2 data",
    ),
    (
        "cut before the trailer",
        lambda: delta_raw([2]).build()[:-9],
        ltx.TruncatedFile,
        "trailer",
    ),
]


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_decoder_rejects(
    make: Callable[[], bytes], error: type[ltx.LTXError], message: str
) -> None:
    data = make()
    with pytest.raises(error, match=message) as caught:
        ltx.verify(io.BytesIO(data))
    assert "\n" not in str(caught.value)


def test_builder_makes_valid_files_by_default() -> None:
    for raw in (snapshot_raw(), delta_raw([2, 4]), delta_raw([])):
        ltx.verify(io.BytesIO(raw.build()))


def test_legacy_frames_are_accepted() -> None:
    pages = {2: page(2, 9), 4: page(4, 8)}
    for options in ({}, {"content_checksum": True, "block_checksum": True, "store_size": False}):
        frames = [
            RawFrame(n, d, flags=0, payload=lz4.frame.compress(d, **options))
            for n, d in pages.items()
        ]
        data = delta_raw([], frames=frames).build()
        dec = ltx.Decoder(io.BytesIO(data))
        assert dict(dec.pages()) == pages
        assert ltx.read_page(io.BytesIO(data), 4) == pages[4]


def test_decoder_reads_once_and_reports_trailer() -> None:
    data = delta_raw([2]).build()
    dec = ltx.Decoder(io.BytesIO(data))
    assert dec.trailer is None
    list(dec.pages())
    assert dec.trailer is not None
    with pytest.raises(ltx.LTXError, match="once"):
        list(dec.pages())


class CountingReader(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: object) -> int:
        view = memoryview(buf)  # type: ignore[arg-type]
        n = self._data.readinto(view[: min(len(view), 65536)])
        self.consumed += n
        return n


def test_decoder_streams() -> None:
    count = 2000
    rnd = os.urandom(4096 * count)
    pages = {n: rnd[(n - 1) * 4096 : n * 4096] for n in range(1, count + 1)}
    data = encode(snapshot_header(count, page_size=4096), pages)
    source = CountingReader(data)
    dec = ltx.Decoder(source)  # type: ignore[arg-type]
    it = dec.pages()
    assert next(it) == (1, pages[1])
    assert source.consumed < 3 << 20 < len(data)
    assert sum(1 for _ in it) == count - 1


# --- random access -----------------------------------------------------------


def test_read_page_index_and_read_page() -> None:
    pages = {2: page(2, 1), 5: page(5, 2), 9: page(9, 3)}
    data = encode(delta_header(10, CHECKSUM_FLAG | 1), pages)
    index = ltx.read_page_index(io.BytesIO(data))
    assert sorted(index) == [2, 5, 9]
    assert index[2][0] == ltx.HEADER_SIZE
    for pgno, content in pages.items():
        assert ltx.read_page(io.BytesIO(data), pgno) == content
    with pytest.raises(ltx.PageNotFound, match="page 3"):
        ltx.read_page(io.BytesIO(data), 3)


@pytest.mark.parametrize(
    "raw",
    [
        delta_raw([2, 3], index=uvarint(3) + uvarint(100) + uvarint(40) + b"\x00"),
        delta_raw([2], index_length=1 << 40),
        delta_raw([2], index=uvarint(2) + uvarint(100) + b"\x00"),
        delta_raw([2], index=uvarint(2) + uvarint(100) + uvarint(1000) + b"\x00"),
    ],
)
def test_read_page_index_rejects_bad_indexes(raw: RawFile) -> None:
    with pytest.raises(ltx.LTXError):
        ltx.read_page_index(io.BytesIO(raw.build()))


def test_read_page_rejects_a_frame_for_another_page() -> None:
    data = bytearray(delta_raw([2, 3]).build())
    data[100:104] = struct.pack(">I", 4)
    with pytest.raises(ltx.InvalidIndex, match="holds page 4"):
        ltx.read_page(io.BytesIO(bytes(data)), 2)


# --- apply -------------------------------------------------------------------


def write_db(path: Path, pages: dict[int, bytes], page_size: int = PS) -> None:
    count = max(pages, default=0)
    with open(path, "wb") as f:
        for n in range(1, count + 1):
            f.write(pages.get(n, bytes(page_size)))


def apply(path: Path, data: bytes, **kwargs: object) -> tuple[Header, ltx.Trailer]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        return ltx.apply_file(io.BytesIO(data), fd, **kwargs)  # type: ignore[arg-type]
    finally:
        os.close(fd)


def test_apply_snapshot_then_delta(tmp_path: Path) -> None:
    db = tmp_path / "db"
    v1 = {n: page(n, 1) for n in range(1, 6)}
    apply(db, encode(snapshot_header(5), v1))
    assert db.read_bytes() == b"".join(v1[n] for n in range(1, 6))

    v2 = {**v1, 2: page(2, 2), 7: page(7, 2), 6: page(6, 2)}
    delta = encode(
        delta_header(7, db_checksum(v1)), {n: v2[n] for n in (2, 6, 7)}, post=db_checksum(v2)
    )
    _, trailer = apply(db, delta)
    assert db.read_bytes() == b"".join(v2[n] for n in range(1, 8))
    with open(db, "rb") as f:
        assert trailer.post_apply_checksum == ltx.checksum_of(ltx.page_checksums(f, PS, 7))

    v3 = {n: v2[n] for n in range(1, 4)} | {3: page(3, 3)}
    shrink = encode(delta_header(3, db_checksum(v2), txid=3), {3: v3[3]}, post=db_checksum(v3))
    apply(db, shrink)
    assert db.read_bytes() == b"".join(v3[n] for n in range(1, 4))


def test_apply_refuses_pre_apply_mismatch_leaving_db_untouched(tmp_path: Path) -> None:
    db = tmp_path / "db"
    v1 = {n: page(n, 1) for n in range(1, 4)}
    write_db(db, v1)
    before = db.read_bytes()
    stale = encode(delta_header(4, CHECKSUM_FLAG | 999), {4: page(4)})
    with pytest.raises(ltx.PreApplyChecksumMismatch, match="database has") as caught:
        apply(db, stale)
    assert caught.value.expected == CHECKSUM_FLAG | 999
    assert caught.value.actual == db_checksum(v1)
    assert db.read_bytes() == before


def test_apply_refuses_a_file_whose_result_would_not_match(tmp_path: Path) -> None:
    db = tmp_path / "db"
    v1 = {n: page(n, 1) for n in range(1, 4)}
    write_db(db, v1)
    before = db.read_bytes()
    wrong = encode(delta_header(3, db_checksum(v1)), {2: page(2, 5)}, post=CHECKSUM_FLAG | 4)
    with pytest.raises(ltx.PostApplyChecksumMismatch):
        apply(db, wrong)
    assert db.read_bytes() == before


def test_apply_refuses_a_bad_file_before_writing(tmp_path: Path) -> None:
    db = tmp_path / "db"
    write_db(db, {1: page(1)})
    before = db.read_bytes()
    data = bytearray(encode(snapshot_header(2), {1: page(1, 7), 2: page(2, 7)}))
    data[-1] ^= 1
    with pytest.raises(ltx.ChecksumMismatch):
        apply(db, bytes(data))
    assert db.read_bytes() == before


def test_apply_snapshot_ignores_current_contents(tmp_path: Path) -> None:
    db = tmp_path / "db"
    db.write_bytes(os.urandom(5000))
    pages = {1: page(1, 4), 2: page(2, 4)}
    apply(db, encode(snapshot_header(2), pages))
    assert db.read_bytes() == pages[1] + pages[2]


def test_apply_updates_a_given_checksum_array(tmp_path: Path) -> None:
    db = tmp_path / "db"
    v1 = {n: page(n, 1) for n in range(1, 4)}
    write_db(db, v1)
    sums = array.array("Q", [ltx.page_checksum(n, v1[n]) for n in range(1, 4)])
    v2 = {1: v1[1], 2: page(2, 9)}
    apply(
        db,
        encode(delta_header(2, db_checksum(v1)), {2: v2[2]}, post=db_checksum(v2)),
        checksums=sums,
    )
    assert list(sums) == [ltx.page_checksum(1, v2[1]), ltx.page_checksum(2, v2[2])]


def test_apply_rejects_a_ragged_database(tmp_path: Path) -> None:
    db = tmp_path / "db"
    db.write_bytes(bytes(PS + 3))
    with pytest.raises(ltx.InvalidDatabase, match="not a multiple"):
        apply(db, encode(delta_header(2, CHECKSUM_FLAG | 1), {2: page(2)}))


# --- snapshots of SQLite files -------------------------------------------------


def test_encode_snapshot_of_a_sqlite_file(tmp_path: Path) -> None:
    db = make_sqlite(tmp_path / "a.db", rows=200)
    out = io.BytesIO()
    header, trailer = ltx.encode_snapshot(db, out, txid=7, timestamp=42, node_id=3)
    assert (header.min_txid, header.max_txid, header.timestamp, header.node_id) == (1, 7, 42, 3)
    assert header.page_size == 1024
    assert header.commit == db.stat().st_size // 1024
    assert trailer.post_apply_checksum == ltx.database_checksum(db)
    out.seek(0)
    assert ltx.verify(out) == (header, trailer)
    restored = tmp_path / "restored.db"
    apply(restored, out.getvalue())
    assert restored.read_bytes() == db.read_bytes()
    with open(db, "rb") as f:
        again = io.BytesIO()
        assert ltx.encode_snapshot(f, again, txid=7, timestamp=42, node_id=3) == (header, trailer)


def test_encode_snapshot_of_an_empty_file(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    db.write_bytes(b"")
    out = io.BytesIO()
    header, trailer = ltx.encode_snapshot(db, out, timestamp=1)
    assert header.commit == 0
    assert trailer.post_apply_checksum == ltx.EMPTY_DATABASE_CHECKSUM
    out.seek(0)
    ltx.verify(out)


def test_encode_snapshot_refuses_non_sqlite(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"hello world" * 100)
    with pytest.raises(ltx.InvalidDatabase):
        ltx.encode_snapshot(bad, io.BytesIO())


# --- names and errors -----------------------------------------------------------


def test_filenames_round_trip() -> None:
    name = ltx.format_filename(1, 0xABC)
    assert name == "0000000000000001-0000000000000abc.ltx"
    assert ltx.parse_filename(name) == (1, 0xABC)
    assert ltx.parse_filename(ltx.format_filename(2**64 - 1, 2**64 - 1)) == (2**64 - 1,) * 2


@pytest.mark.parametrize(
    "name",
    [
        "",
        "1-2.ltx",
        "0000000000000001-0000000000000002",
        "0000000000000001-0000000000000002.ltx.tmp",
        "0000000000000001-000000000000000A.ltx",
        "0000000000000001_0000000000000002.ltx",
        "dir/0000000000000001-0000000000000002.ltx",
        "0000000000000000-0000000000000002.ltx",
        "0000000000000003-0000000000000002.ltx",
    ],
)
def test_parse_filename_rejects(name: str) -> None:
    with pytest.raises(ltx.InvalidFilename):
        ltx.parse_filename(name)


def test_every_error_is_an_ltx_error() -> None:
    for error in (
        ltx.InvalidHeader,
        ltx.InvalidFrame,
        ltx.InvalidIndex,
        ltx.InvalidTrailer,
        ltx.TruncatedFile,
        ltx.ChecksumMismatch,
        ltx.PreApplyChecksumMismatch,
        ltx.PostApplyChecksumMismatch,
        ltx.InvalidDatabase,
        ltx.InvalidFilename,
        ltx.PageNotFound,
        ltx.EncoderFinished,
    ):
        assert issubclass(error, ltx.LTXError)


def test_apply_refuses_growth_without_the_new_pages(tmp_path: Path) -> None:
    db = tmp_path / "db"
    v1 = {n: page(n, 1) for n in range(1, 3)}
    write_db(db, v1)
    before = db.read_bytes()
    for commit, pages in ((6, {3: page(3), 4: page(4), 6: page(6)}), (2**32 - 1, {2: page(2)})):
        hole = encode(delta_header(commit, db_checksum(v1)), pages)
        with pytest.raises(ltx.InvalidFrame, match="lacks page"):
            apply(db, hole)
        assert db.read_bytes() == before


def test_apply_without_checksums_still_checks_growth(tmp_path: Path) -> None:
    db = tmp_path / "db"
    write_db(db, {1: page(1), 2: page(2)})
    no_sums = dataclasses.replace(
        delta_header(3, 0), flags=ltx.HEADER_FLAG_NO_CHECKSUM, pre_apply_checksum=0
    )
    apply(db, encode(no_sums, {2: page(2, 5), 3: page(3, 5)}, post=0))
    assert db.read_bytes() == page(1) + page(2, 5) + page(3, 5)
    with pytest.raises(ltx.InvalidFrame, match="lacks page 4"):
        apply(db, encode(dataclasses.replace(no_sums, commit=5), {5: page(5)}, post=0))
