"""Properties of the LTX codec over generated files: round trips, and no damage slips through.

The file checksum covers every byte of a file except the compressed page
payloads, which it covers through their decompressed contents. A change to a
payload that still decompresses to the same page (an LZ4 back-reference moved
within a run of equal bytes, or the unused match-length bits of the last
token) is therefore invisible, and harmless: the file still means exactly the
same pages. The damage properties below accept a flipped byte only in that
case, and only inside a payload.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from litefs import ltx
from litefs.ltx import CHECKSUM_FLAG, Header

ALL_PAGE_SIZES = [512 << i for i in range(8)]
SMALL_PAGE_SIZES = [512, 1024, 2048, 4096]
U64 = 2**64 - 1


@dataclass
class Sample:
    header: Header
    pages: dict[int, bytes]
    post: int

    def encode(self) -> tuple[bytes, ltx.Trailer]:
        out = io.BytesIO()
        enc = ltx.Encoder(out, self.header)
        for pgno in sorted(self.pages):
            enc.write_page(pgno, self.pages[pgno])
        trailer = enc.finish(self.post)
        return out.getvalue(), trailer


@st.composite
def page_contents(draw: st.DrawFn, size: int) -> bytes:
    kind = draw(st.sampled_from(["zeros", "random", "pattern", "sqlite-like"]))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    if kind == "zeros":
        return bytes(size)
    if kind == "random":
        return rnd.randbytes(size)
    if kind == "pattern":
        unit = draw(st.binary(min_size=1, max_size=24))
        return (unit * (size // len(unit) + 1))[:size]
    head = rnd.randbytes(rnd.randrange(8, 120))
    tail = rnd.randbytes(rnd.randrange(0, size // 2))
    return head + bytes(size - len(head) - len(tail)) + tail


def page_checksum_total(pages: dict[int, bytes]) -> int:
    total = 0
    for pgno, data in pages.items():
        total ^= ltx.page_checksum(pgno, data)
    return total | CHECKSUM_FLAG


@st.composite
def samples(draw: st.DrawFn, page_sizes: list[int] = ALL_PAGE_SIZES, max_pages: int = 6) -> Sample:
    page_size = draw(st.sampled_from(page_sizes))
    snapshot = draw(st.booleans())
    checksums = draw(st.booleans()) if not snapshot else draw(st.sampled_from([True, True, False]))
    if snapshot:
        commit = draw(st.integers(0, max_pages))
        pgnos = list(range(1, commit + 1))
        min_txid = 1
    else:
        commit = draw(st.integers(0, 3 * max_pages))
        pgnos = sorted(draw(st.sets(st.integers(1, commit), max_size=max_pages))) if commit else []
        min_txid = draw(st.integers(2, U64))
    max_txid = draw(st.integers(min_txid, U64))
    pages = {pgno: draw(page_contents(page_size)) for pgno in pgnos}
    wal = draw(st.booleans())
    header = Header(
        flags=0 if checksums else ltx.HEADER_FLAG_NO_CHECKSUM,
        page_size=page_size,
        commit=commit,
        min_txid=min_txid,
        max_txid=max_txid,
        timestamp=draw(st.integers(0, U64)),
        pre_apply_checksum=(
            0 if snapshot or not checksums else CHECKSUM_FLAG | draw(st.integers(1, 2**63 - 1))
        ),
        wal_offset=draw(st.integers(32, U64)) if wal else 0,
        wal_size=draw(st.integers(1, U64)) if wal else 0,
        wal_salt1=draw(st.integers(0, 2**32 - 1)) if wal else 0,
        wal_salt2=draw(st.integers(0, 2**32 - 1)) if wal else 0,
        node_id=draw(st.integers(0, U64)),
    )
    if not checksums:
        post = 0
    elif snapshot:
        post = page_checksum_total(pages)
    elif commit == 0:
        post = ltx.EMPTY_DATABASE_CHECKSUM
    else:
        post = CHECKSUM_FLAG | draw(st.integers(0, 2**63 - 1))
    return Sample(header, pages, post)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(samples())
def test_encode_then_decode_is_the_identity(sample: Sample) -> None:
    data, trailer = sample.encode()
    dec = ltx.Decoder(io.BytesIO(data))
    assert dec.header == sample.header
    assert dict(dec.pages()) == sample.pages
    assert dec.trailer == trailer
    assert trailer.post_apply_checksum == sample.post
    assert ltx.verify(io.BytesIO(data)) == (sample.header, trailer)
    index = ltx.PageIndex.read(io.BytesIO(data))
    assert sorted(index.entries) == sorted(sample.pages)
    for pgno, content in sample.pages.items():
        assert index.read_page(io.BytesIO(data), pgno) == content


def payload_ranges(data: bytes) -> list[range]:
    return [
        range(frame.offset + 10, frame.offset + frame.size)
        for frame in ltx.Decoder(io.BytesIO(data)).frames()
    ]


def assert_rejected_or_meaningless(original: bytes, damaged: bytes, position: int) -> None:
    """A damaged file is refused, unless the damage left every page exactly as it was."""
    try:
        ltx.verify(io.BytesIO(damaged))
    except ltx.LTXError:
        return
    assert any(position in r for r in payload_ranges(original)), f"byte {position} accepted"
    before = ltx.Decoder(io.BytesIO(original))
    after = ltx.Decoder(io.BytesIO(damaged))
    assert list(after.pages()) == list(before.pages())
    assert (after.header, after.trailer) == (before.header, before.trailer)


small = samples(page_sizes=SMALL_PAGE_SIZES, max_pages=4)


@pytest.mark.timeout(240)
@settings(max_examples=300, deadline=None)
@given(small, st.data())
def test_any_flipped_byte_is_rejected(sample: Sample, data: st.DataObject) -> None:
    original, _ = sample.encode()
    position = data.draw(st.integers(0, len(original) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="mask")
    damaged = bytearray(original)
    damaged[position] ^= mask
    assert_rejected_or_meaningless(original, bytes(damaged), position)


@pytest.mark.timeout(240)
@settings(max_examples=200, deadline=None)
@given(small, st.data())
def test_any_truncation_is_rejected(sample: Sample, data: st.DataObject) -> None:
    original, _ = sample.encode()
    length = data.draw(st.integers(0, len(original) - 1), label="length")
    with pytest.raises(ltx.LTXError):
        ltx.verify(io.BytesIO(original[:length]))


@settings(max_examples=200, deadline=None)
@given(small, st.binary(min_size=1, max_size=200))
def test_garbage_after_the_header_is_rejected(sample: Sample, tail: bytes) -> None:
    original, _ = sample.encode()
    with pytest.raises(ltx.LTXError):
        ltx.verify(io.BytesIO(original[: ltx.HEADER_SIZE] + tail))
    with pytest.raises(ltx.LTXError):
        ltx.verify(io.BytesIO(original + tail))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash(blob: bytes) -> None:
    for candidate in (blob, ltx.MAGIC + blob):
        with pytest.raises(ltx.LTXError):
            ltx.verify(io.BytesIO(candidate))
        with contextlib.suppress(ltx.LTXError):
            ltx.read_page_index(io.BytesIO(candidate))


def fixed_samples() -> list[Sample]:
    rnd = random.Random(1234)
    pages = {
        1: rnd.randbytes(100) + bytes(412),
        2: bytes(512),
        3: (b"abc" * 200)[:512],
        4: rnd.randbytes(512),
    }
    snapshot = Header(0, 512, 4, 1, 1, 1_700_000_000_000, 0, node_id=7)
    delta = Header(0, 512, 9, 5, 6, 1_700_000_000_000, CHECKSUM_FLAG | 99, 32, 4096, 1, 2)
    return [
        Sample(snapshot, pages, page_checksum_total(pages)),
        Sample(delta, {2: pages[1], 7: pages[3], 9: pages[4]}, CHECKSUM_FLAG | 5),
    ]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sample", fixed_samples(), ids=["snapshot", "delta"])
def test_every_position_and_every_length_is_checked(sample: Sample) -> None:
    original, _ = sample.encode()
    for position in range(len(original)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(original)
            damaged[position] ^= mask
            assert_rejected_or_meaningless(original, bytes(damaged), position)
    for length in range(len(original)):
        with pytest.raises(ltx.LTXError):
            ltx.verify(io.BytesIO(original[:length]))


@st.composite
def histories(draw: st.DrawFn) -> list[dict[int, bytes]]:
    """Successive versions of a small database: pages change, appear and disappear."""
    size = 512
    versions = []
    count = draw(st.integers(1, 8))
    current = {n: draw(page_contents(size)) for n in range(1, count + 1)}
    versions.append(dict(current))
    for _ in range(draw(st.integers(1, 4))):
        count = draw(st.integers(1, 10))
        current = {n: current.get(n, bytes(size)) for n in range(1, count + 1)}
        for pgno in draw(st.sets(st.integers(1, count), max_size=count)):
            current[pgno] = draw(page_contents(size))
        versions.append(dict(current))
    return versions


@pytest.mark.timeout(240)
@settings(max_examples=60, deadline=None)
@given(histories())
def test_applying_encoded_changes_replays_the_history(
    tmp_path_factory: pytest.TempPathFactory, versions: list[dict[int, bytes]]
) -> None:
    target = tmp_path_factory.mktemp("replay") / "db"
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        previous: dict[int, bytes] = {}
        for txid, version in enumerate(versions, start=1):
            snapshot = txid == 1
            changed = {n: d for n, d in version.items() if snapshot or previous.get(n) != d}
            header = Header(
                flags=0,
                page_size=512,
                commit=len(version),
                min_txid=txid,
                max_txid=txid,
                timestamp=txid,
                pre_apply_checksum=0 if snapshot else page_checksum_total(previous),
            )
            data, trailer = Sample(header, changed, page_checksum_total(version)).encode()
            ltx.apply_file(io.BytesIO(data), fd)
            assert target.read_bytes() == b"".join(version[n] for n in sorted(version))
            assert trailer.post_apply_checksum == page_checksum_total(version)
            previous = version
    finally:
        os.close(fd)
