"""Files written by the reference Go implementation: we read them, rebuild them, and agree.

Our LZ4 compressor (liblz4) and the reference's (a Go port) choose different
matches, so compressed sizes differ, and with them the frame size fields and
index offsets that the file checksum covers. The file checksum is therefore
compared in two ways: the stored one must verify, and our encoder, handed the
reference's compressed payloads, must write the reference file byte for byte.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from litefs import ltx
from litefs.cli.ltx import format_timestamp

GOLDEN = Path(__file__).resolve().parent / "data" / "ltx"
SETS = ("ps1024", "ps4096", "ps65536")
TXIDS = (1, 2, 3)
TIMESTAMPS = {1: 1_700_000_000_001, 2: 1_700_000_000_002, 3: 1_700_000_000_003}


def ltx_path(name: str, txid: int) -> Path:
    return GOLDEN / name / ltx.format_filename(txid, txid)


def db_path(name: str, n: int) -> Path:
    return GOLDEN / name / f"db-{n}.sqlite"


def read_tsv(name: str) -> list[dict[str, str]]:
    with open(GOLDEN / name, newline="") as f:
        lines = [line for line in f if not line.startswith("#")]
    return list(csv.DictReader(lines, delimiter="\t"))


@dataclass
class Decoded:
    header: ltx.Header
    trailer: ltx.Trailer
    frames: list[ltx.Frame]
    raw: bytes

    @property
    def pages(self) -> dict[int, bytes]:
        return {f.pgno: f.data for f in self.frames}

    def payloads(self) -> Iterator[bytes]:
        for f in self.frames:
            yield self.raw[f.offset + 10 : f.offset + f.size]


def decode(path: Path) -> Decoded:
    raw = path.read_bytes()
    dec = ltx.Decoder(io.BytesIO(raw))
    frames = list(dec.frames())
    assert dec.trailer is not None
    return Decoded(dec.header, dec.trailer, frames, raw)


def replay_encode(
    header: ltx.Header, pages: dict[int, bytes], post: int, payloads: Iterator[bytes]
) -> bytes:
    """Encode with the reference's compressed bytes in place of ours."""

    class Replay(ltx.Encoder):
        @staticmethod
        def compress_page(page: memoryview) -> bytes:
            return next(payloads)

    out = io.BytesIO()
    enc = Replay(out, header)
    for pgno in sorted(pages):
        enc.write_page(pgno, pages[pgno])
    enc.finish(post)
    return out.getvalue()


def db_pages(path: Path, page_size: int) -> dict[int, bytes]:
    data = path.read_bytes()
    lock = ltx.lock_page(page_size)
    return {
        i // page_size + 1: data[i : i + page_size]
        for i in range(0, len(data), page_size)
        if i // page_size + 1 != lock
    }


def test_golden_files_are_present() -> None:
    assert GOLDEN.is_dir(), (
        f"golden LTX files missing: {GOLDEN} (tests/data/ltx is part of the repository)"
    )
    for name in SETS:
        for n in TXIDS:
            assert ltx_path(name, n).is_file()
            assert db_path(name, n).is_file()


@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("txid", TXIDS)
def test_every_golden_file_verifies(name: str, txid: int) -> None:
    with open(ltx_path(name, txid), "rb") as f:
        header, trailer = ltx.verify(f)
    assert trailer.file_checksum & ltx.CHECKSUM_FLAG
    assert (header.min_txid, header.max_txid) == (txid, txid)
    assert header.timestamp == TIMESTAMPS[txid]
    assert header.is_snapshot == (txid == 1)


def test_manifest_matches_what_we_decode() -> None:
    rows = read_tsv("MANIFEST.tsv")
    assert {(r["set"], int(r["min_txid"], 16)) for r in rows} == {
        (name, n) for name in SETS for n in TXIDS
    }
    for row in rows:
        txid = int(row["min_txid"], 16)
        d = decode(ltx_path(row["set"], txid))
        h = d.header
        where = f"{row['set']} txid {txid}"
        assert row["min_txid"] == f"{h.min_txid:016x}", where
        assert row["max_txid"] == f"{h.max_txid:016x}", where
        assert int(row["commit"]) == h.commit, where
        assert int(row["pages"]) == len(d.frames), where
        assert row["preapply"] == f"{h.pre_apply_checksum:016x}", where
        assert row["postapply"] == f"{d.trailer.post_apply_checksum:016x}", where
        ours = format_timestamp(h.timestamp)
        assert row["timestamp"] == ours[:19] + "Z", where
        assert int(row["wal_offset"]) == h.wal_offset, where
        assert int(row["wal_size"]) == h.wal_size, where
        assert row["wal_salt"] == f"{h.wal_salt1:08x} {h.wal_salt2:08x}", where


def test_file_checksums_match_the_trailers() -> None:
    rows = read_tsv("FILE_CHECKSUMS.tsv")
    assert len(rows) == len(SETS) * len(TXIDS)
    for row in rows:
        d = decode(GOLDEN / row["set"] / row["file"])
        assert f"{d.trailer.file_checksum:016x}" == row["file_checksum"], row


@pytest.mark.parametrize("name", SETS)
def test_database_checksums_equal_post_apply_checksums(name: str) -> None:
    for n in TXIDS:
        assert (
            ltx.database_checksum(db_path(name, n))
            == decode(ltx_path(name, n)).trailer.post_apply_checksum
        )


def _apply_chain(name: str, upto: int, target: Path) -> None:
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for n in range(1, upto + 1):
            with open(ltx_path(name, n), "rb") as f:
                ltx.apply_file(f, fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("upto", TXIDS)
def test_applying_reproduces_the_database(name: str, upto: int, tmp_path: Path) -> None:
    target = tmp_path / "db"
    _apply_chain(name, upto, target)
    assert target.read_bytes() == db_path(name, upto).read_bytes()


@pytest.mark.parametrize("name", SETS)
def test_applying_out_of_order_is_refused(name: str, tmp_path: Path) -> None:
    target = tmp_path / "db"
    shutil.copyfile(db_path(name, 1), target)
    fd = os.open(target, os.O_RDWR)
    try:
        with open(ltx_path(name, 3), "rb") as f, pytest.raises(ltx.PreApplyChecksumMismatch):
            ltx.apply_file(f, fd)
    finally:
        os.close(fd)
    assert target.read_bytes() == db_path(name, 1).read_bytes()


@pytest.mark.parametrize("name", SETS)
def test_our_snapshot_matches_the_reference(name: str) -> None:
    ref = decode(ltx_path(name, 1))
    out = io.BytesIO()
    header, trailer = ltx.encode_snapshot(db_path(name, 1), out, timestamp=TIMESTAMPS[1])
    assert header == ref.header
    assert trailer.post_apply_checksum == ref.trailer.post_apply_checksum
    ours = decode_bytes(out.getvalue())
    assert ours.pages == ref.pages
    assert ltx.verify(io.BytesIO(out.getvalue())) == (header, trailer)

    rebuilt = replay_encode(header, ours.pages, trailer.post_apply_checksum, ref.payloads())
    assert rebuilt == ref.raw
    assert decode_bytes(rebuilt).trailer.file_checksum == ref.trailer.file_checksum


def decode_bytes(raw: bytes) -> Decoded:
    dec = ltx.Decoder(io.BytesIO(raw))
    frames = list(dec.frames())
    assert dec.trailer is not None
    return Decoded(dec.header, dec.trailer, frames, raw)


@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("txid", (2, 3))
def test_our_change_files_match_the_reference(name: str, txid: int) -> None:
    ref = decode(ltx_path(name, txid))
    page_size = ref.header.page_size
    before = db_pages(db_path(name, txid - 1), page_size)
    after = db_pages(db_path(name, txid), page_size)
    changed = {pgno: data for pgno, data in after.items() if before.get(pgno) != data}
    header = ltx.Header(
        flags=0,
        page_size=page_size,
        commit=db_path(name, txid).stat().st_size // page_size,
        min_txid=txid,
        max_txid=txid,
        timestamp=TIMESTAMPS[txid],
        pre_apply_checksum=ltx.database_checksum(db_path(name, txid - 1)),
    )
    post = ltx.database_checksum(db_path(name, txid))
    assert header == ref.header
    assert post == ref.trailer.post_apply_checksum
    assert changed == ref.pages

    out = io.BytesIO()
    enc = ltx.Encoder(out, header)
    for pgno in sorted(changed):
        enc.write_page(pgno, changed[pgno])
    trailer = enc.finish(post)
    ours = decode_bytes(out.getvalue())
    assert ours.header == ref.header
    assert ours.pages == ref.pages
    assert ours.trailer == trailer

    rebuilt = replay_encode(header, changed, post, ref.payloads())
    assert rebuilt == ref.raw
    assert decode_bytes(rebuilt).trailer.file_checksum == ref.trailer.file_checksum


@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("txid", TXIDS)
def test_random_access_reads_every_reference_page(name: str, txid: int) -> None:
    ref = decode(ltx_path(name, txid))
    with open(ltx_path(name, txid), "rb") as f:
        index = ltx.PageIndex.read(f)
        assert index.entries == {fr.pgno: (fr.offset, fr.size) for fr in ref.frames}
        for pgno, data in ref.pages.items():
            assert index.read_page(f, pgno) == data
