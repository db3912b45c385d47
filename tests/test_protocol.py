"""The replication stream's wire format, as docs/protocol.md specifies it.

Frames and chunks are read back from a real `asyncio.StreamReader` fed with
bytes, so truncation behaves as it does on a socket. Requests are checked in
both directions, and every malformed request must be refused with a message
that tells the replica's operator what is wrong.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from litefs.http import protocol
from litefs.http.protocol import (
    END_OF_FILE,
    MAX_CHUNK,
    MAX_PAYLOAD,
    BadRequest,
    Frame,
    FrameType,
    ProtocolError,
)
from litefs.position import Position

T = TypeVar("T")


def read_from(data: bytes, read: Callable[[asyncio.StreamReader], Awaitable[T]]) -> T:
    """Run `read` on a stream that holds exactly `data` and then ends."""

    async def run() -> T:
        reader = asyncio.StreamReader(limit=4 * MAX_CHUNK)
        reader.feed_data(data)
        reader.feed_eof()
        return await read(reader)

    return asyncio.run(run())


def read_frames_and_rest(data: bytes, frames: int) -> tuple[list[Frame], bytes]:
    async def read(reader: asyncio.StreamReader) -> tuple[list[Frame], bytes]:
        got = [await protocol.read_frame(reader) for _ in range(frames)]
        return got, await reader.read()

    return read_from(data, read)


def read_file(data: bytes) -> tuple[bytes, bytes]:
    """The file carried by chunks at the start of `data`, and what follows it."""

    async def read(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        parts = []
        while part := await protocol.read_chunk(reader):
            parts.append(part)
        return b"".join(parts), await reader.read()

    return read_from(data, read)


# -- frames -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        (FrameType.LTX, b"L"),
        (FrameType.READY, b"R"),
        (FrameType.HEARTBEAT, b"H"),
        (FrameType.DROP, b"D"),
        (FrameType.END, b"E"),
    ],
)
def test_frame_types_are_the_documented_ascii_letters(kind: FrameType, code: bytes) -> None:
    assert kind.value == code
    assert protocol.frame(kind) == code + b"\x00\x00\x00\x00"


def test_frame_header_is_type_then_big_endian_payload_length() -> None:
    assert protocol.frame(FrameType.LTX, b"a.db") == b"L\x00\x00\x00\x04a.db"
    assert protocol.frame(FrameType.END, b"x" * 0x0102) == b"E\x00\x00\x01\x02" + b"x" * 0x0102


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (FrameType.LTX, b"my.db"),
        (FrameType.READY, b""),
        (FrameType.HEARTBEAT, b""),
        (FrameType.DROP, b"dir/sub.db"),
        (FrameType.END, "this node is no longer the primary \N{SNOWMAN}".encode()),
    ],
)
def test_every_frame_type_reads_back_as_written(kind: FrameType, payload: bytes) -> None:
    frames, rest = read_frames_and_rest(protocol.frame(kind, payload) + b"next", 1)
    assert frames == [Frame(kind, payload)]
    assert rest == b"next", "a frame must consume exactly its own bytes"


def test_consecutive_frames_read_back_in_order() -> None:
    sent = [
        Frame(FrameType.DROP, b"old.db"),
        Frame(FrameType.READY, b""),
        Frame(FrameType.HEARTBEAT, b""),
        Frame(FrameType.END, b"bye"),
    ]
    data = b"".join(protocol.frame(f.type, f.payload) for f in sent)
    assert read_frames_and_rest(data, len(sent)) == (sent, b"")


def test_end_frame_text_is_its_payload_decoded() -> None:
    assert Frame(FrameType.END, "gone \N{SNOWMAN}".encode()).text == "gone \N{SNOWMAN}"
    assert Frame(FrameType.END, b"\xffok").text == "\N{REPLACEMENT CHARACTER}ok"


def test_payload_of_exactly_the_limit_is_accepted() -> None:
    payload = b"x" * MAX_PAYLOAD
    frames, _ = read_frames_and_rest(protocol.frame(FrameType.END, payload), 1)
    assert frames[0].payload == payload


def test_payload_over_the_limit_is_a_protocol_error_before_it_is_read() -> None:
    header = b"E" + (MAX_PAYLOAD + 1).to_bytes(4, "big")
    with pytest.raises(ProtocolError, match=rf"END frame payload of {MAX_PAYLOAD + 1} bytes"):
        read_from(header, protocol.read_frame)


def test_huge_declared_payload_is_refused_without_waiting_for_it() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        read_from(b"L\xff\xff\xff\xff", protocol.read_frame)


@pytest.mark.parametrize("code", [b"X", b"l", b"\x00", b"\xff"])
def test_unknown_frame_type_is_a_protocol_error(code: bytes) -> None:
    with pytest.raises(ProtocolError, match="unknown frame type"):
        read_from(code + b"\x00\x00\x00\x00", protocol.read_frame)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"R\x00\x00", id="half-a-header"),
        pytest.param(b"L\x00\x00\x00\x05a.d", id="short-payload"),
    ],
)
def test_stream_ending_inside_a_frame_raises_incomplete_read(data: bytes) -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        read_from(data, protocol.read_frame)


@pytest.mark.parametrize(
    ("payload", "name"),
    [(b"my.db", "my.db"), (b"dir/sub.db", "dir/sub.db"), ("caf\u00e9.db".encode(), "caf\u00e9.db")],
)
def test_ltx_and_drop_frames_name_their_database(payload: bytes, name: str) -> None:
    assert protocol.database_name(Frame(FrameType.LTX, payload)) == name
    assert protocol.database_name(Frame(FrameType.DROP, payload)) == name


@pytest.mark.parametrize(
    "payload",
    [b"", b"../x", b"/abs", b"a//b", b"a/", b"./a", b"a\x00b", b"\xff.db", b"x" * 1025],
)
def test_frame_naming_an_invalid_database_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="DROP frame names no valid database"):
        protocol.database_name(Frame(FrameType.DROP, payload))


# -- chunks -------------------------------------------------------------------


def test_chunk_is_big_endian_length_then_bytes_and_zero_length_ends_the_file() -> None:
    assert protocol.chunk(b"xyz") == b"\x00\x00\x00\x03xyz"
    assert END_OF_FILE == b"\x00\x00\x00\x00"


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param([], id="empty-file"),
        pytest.param([b"one chunk"], id="one-chunk"),
        pytest.param([b"a", b"bc", bytes(range(256)) * 3], id="several-chunks"),
        pytest.param([b"\x00" * MAX_CHUNK, b"tail"], id="chunk-at-the-limit"),
    ],
)
def test_file_reads_back_from_any_split_into_chunks(parts: list[bytes]) -> None:
    wire = b"".join(protocol.chunk(p) for p in parts) + END_OF_FILE
    data = protocol.frame(FrameType.LTX, b"my.db") + wire + protocol.frame(FrameType.READY)

    async def read(reader: asyncio.StreamReader) -> tuple[Frame, bytes, Frame]:
        head = await protocol.read_frame(reader)
        body = []
        while part := await protocol.read_chunk(reader):
            body.append(part)
        return head, b"".join(body), await protocol.read_frame(reader)

    head, body, after = read_from(data, read)
    assert head == Frame(FrameType.LTX, b"my.db")
    assert body == b"".join(parts)
    assert after == Frame(FrameType.READY, b"")


def test_chunk_accepts_a_memoryview() -> None:
    assert protocol.chunk(memoryview(b"abcdef")[2:4]) == b"\x00\x00\x00\x02cd"


def test_chunk_over_the_limit_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match=rf"LTX chunk of {MAX_CHUNK + 1} bytes exceeds"):
        read_file((MAX_CHUNK + 1).to_bytes(4, "big"))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x00\x00", id="half-a-length"),
        pytest.param(b"\x00\x00\x00\x10short", id="short-chunk"),
        pytest.param(protocol.chunk(b"whole chunk"), id="no-end-of-file"),
    ],
)
def test_stream_ending_inside_a_file_raises_incomplete_read(data: bytes) -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        read_file(data)


# -- requests -----------------------------------------------------------------


def test_request_round_trips() -> None:
    positions = {
        "my.db": Position(7, 0xE04FC44716E5272F),
        "dir/sub.db": Position(1, 0x8000000000000000),
        "max.db": Position(2**64 - 1, 2**64 - 1),
    }
    assert protocol.decode_request(protocol.encode_request("replica-1", positions)) == (
        "replica-1",
        positions,
        True,
    )
    assert not protocol.decode_request(protocol.encode_request("r", {}, candidate=False)).candidate


def test_request_carries_version_node_and_positions_as_16_lower_case_hex_digits() -> None:
    body = json.loads(protocol.encode_request("r1", {"a.db": Position(0xAB, 0x80000000000000CD)}))
    assert body == {
        "version": 1,
        "node": "r1",
        "candidate": True,
        "positions": {"a.db": {"txid": "00000000000000ab", "checksum": "80000000000000cd"}},
    }


def test_request_fields_are_optional_and_unknown_fields_are_ignored() -> None:
    assert protocol.decode_request(b"{}") == ("", {}, True)
    body = {
        "future": True,
        "positions": {"a.db": {"txid": "0000000000000001", "checksum": "ABCDEF0123456789", "x": 0}},
    }
    assert protocol.decode_request(json.dumps(body).encode()) == (
        "",
        {"a.db": Position(1, 0xABCDEF0123456789)},
        True,
    )


GOOD = {"txid": "0000000000000001", "checksum": "8000000000000000"}


def request(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


MALFORMED = [
    pytest.param(b"", "request body is not JSON", id="empty-body"),
    pytest.param(b"{", "request body is not JSON", id="not-json"),
    pytest.param(b"\xff\xfe\x00", "request body is not JSON", id="not-text"),
    pytest.param(b"[]", "must be a JSON object", id="array"),
    pytest.param(b'"positions"', "must be a JSON object", id="string"),
    pytest.param(b"null", "must be a JSON object", id="null"),
    pytest.param(request(version=2), "unsupported protocol version 2", id="version-2"),
    pytest.param(request(version=0), "unsupported protocol version 0", id="version-0"),
    pytest.param(request(version="1"), "unsupported protocol version '1'", id="version-text"),
    pytest.param(request(version=None), "unsupported protocol version None", id="version-null"),
    pytest.param(request(node=5), "node must be a string", id="node-number"),
    pytest.param(request(positions=[]), "positions must be an object", id="positions-list"),
    pytest.param(request(positions={"../x": GOOD}), "'../x'", id="name-escapes-up"),
    pytest.param(request(positions={"/abs": GOOD}), "'/abs'", id="name-absolute"),
    pytest.param(request(positions={"a//b": GOOD}), "'a//b'", id="name-empty-part"),
    pytest.param(request(positions={"": GOOD}), "invalid database name: ''", id="name-empty"),
    pytest.param(request(positions={"a/./b": GOOD}), "'a/./b'", id="name-dot-part"),
    pytest.param(request(positions={"a\x00b": GOOD}), "invalid database name", id="name-nul"),
    pytest.param(request(positions={"x" * 1025: GOOD}), "invalid database name", id="name-long"),
    pytest.param(
        request(positions={"a.db": "0000000000000001"}), "must be an object", id="pos-str"
    ),
    pytest.param(
        request(positions={"a.db": {"txid": "000000000000000g", "checksum": GOOD["checksum"]}}),
        "position of 'a.db' needs txid and checksum as 16 hex digits",
        id="txid-not-hex",
    ),
    pytest.param(
        request(positions={"a.db": {"txid": "1", "checksum": GOOD["checksum"]}}),
        "16 hex digits",
        id="txid-too-short",
    ),
    pytest.param(
        request(positions={"a.db": {"txid": "00000000000000001", "checksum": GOOD["checksum"]}}),
        "16 hex digits",
        id="txid-too-long",
    ),
    pytest.param(
        request(positions={"a.db": {"txid": 1, "checksum": GOOD["checksum"]}}),
        "16 hex digits",
        id="txid-number",
    ),
    pytest.param(
        request(positions={"a.db": {"txid": GOOD["txid"], "checksum": "80000000000000"}}),
        "16 hex digits",
        id="checksum-too-short",
    ),
    pytest.param(
        request(positions={"a.db": {"txid": GOOD["txid"], "checksum": "checksum-checksu"}}),
        "16 hex digits",
        id="checksum-not-hex",
    ),
    pytest.param(
        request(positions={"a.db": {"checksum": GOOD["checksum"]}}),
        "needs txid and checksum",
        id="txid-missing",
    ),
    pytest.param(
        request(positions={"a.db": {"txid": GOOD["txid"]}}),
        "needs txid and checksum",
        id="checksum-missing",
    ),
    pytest.param(request(positions={"a.db": {}}), "needs txid and checksum", id="position-empty"),
    pytest.param(request(candidate="yes"), "candidate must be true or false", id="candidate-text"),
]


@pytest.mark.parametrize(("body", "message"), MALFORMED)
def test_malformed_request_is_refused_saying_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as refused:
        protocol.decode_request(body)
    assert message in str(refused.value)


@pytest.mark.parametrize(
    "txid",
    [
        pytest.param("-000000000000001", id="minus-sign"),
        pytest.param("+000000000000001", id="plus-sign"),
        pytest.param("0x00000000000001", id="0x-prefix"),
        pytest.param("0000_0000_0000_1", id="underscores"),
        pytest.param(" 000000000000001", id="leading-space"),
    ],
)
def test_position_must_be_exactly_16_hex_digits(txid: str) -> None:
    body = request(positions={"a.db": {"txid": txid, "checksum": GOOD["checksum"]}})
    with pytest.raises(BadRequest, match="16 hex digits"):
        protocol.decode_request(body)


def test_boolean_version_is_not_version_1() -> None:
    with pytest.raises(BadRequest, match="unsupported protocol version"):
        protocol.decode_request(request(version=True))


def test_ready_and_heartbeat_carry_the_primarys_clock_in_milliseconds() -> None:
    data = protocol.clock_frame(FrameType.HEARTBEAT, 1_700_000_000.25)
    assert data == b"H\x00\x00\x00\x08" + (1_700_000_000_250).to_bytes(8, "big")
    frame = read_from(data, protocol.read_frame)
    assert frame.type is FrameType.HEARTBEAT
    assert protocol.frame_clock(frame) == 1_700_000_000.25


def test_a_ready_frame_without_a_clock_is_still_ready() -> None:
    frame = read_from(protocol.frame(FrameType.READY), protocol.read_frame)
    assert frame.type is FrameType.READY
    assert protocol.frame_clock(frame) is None


def test_a_handoff_frame_names_the_target_and_carries_the_lease_to_it_alone() -> None:
    wire = protocol.handoff_frame("b", "7587") + protocol.handoff_frame("b", None)
    (to_target, to_others), _ = read_frames_and_rest(wire, 2)
    assert to_target.type is FrameType.HANDOFF
    assert protocol.handoff_target(to_target) == ("b", "7587")
    assert protocol.handoff_target(to_others) == ("b", None)
