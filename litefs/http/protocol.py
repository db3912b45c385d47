"""The replication stream's wire format (docs/protocol.md is the specification).

A replica POSTs its positions as JSON; the primary answers with a stream of
frames. A frame is a one-byte type and a four-byte big-endian payload length,
then the payload. An LTX frame's payload is the database name, and the file
follows as chunks, each a four-byte length and that many bytes, ended by a
zero-length chunk. Nothing here does I/O beyond reading from a reader it is
given, so both sides share one definition.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple, Protocol

from litefs.names import InvalidName, check_name
from litefs.position import Position

CONTENT_TYPE = "application/x-litefs-stream"
STREAM_PATH = "/stream"
PROTOCOL_VERSION = 1

HEARTBEAT_INTERVAL = 1.0
"""Seconds of silence after which the primary sends a heartbeat."""

READ_TIMEOUT = 5.0
"""Seconds without any frame after which a replica gives the stream up."""

MAX_PAYLOAD = 4096
MAX_NODE_NAME = 255
"""Characters in a node's name (the request's `node`, handoff's `to`)."""
MAX_CHUNK = 1 << 20
MAX_REQUEST = 1 << 20

_FRAME_HEADER = struct.Struct(">cI")
_CHUNK_HEADER = struct.Struct(">I")
_CLOCK = struct.Struct(">Q")


class FrameType(Enum):
    LTX = b"L"
    READY = b"R"
    HEARTBEAT = b"H"
    DROP = b"D"
    END = b"E"
    HANDOFF = b"O"


class ProtocolError(Exception):
    """The peer sent something the protocol does not allow."""


class BadRequest(ValueError):
    """A replica's request that the primary answers with 400."""


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    payload: bytes

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", "replace")


def frame(kind: FrameType, payload: bytes = b"") -> bytes:
    return _FRAME_HEADER.pack(kind.value, len(payload)) + payload


def clock_frame(kind: FrameType, now: float) -> bytes:
    """A READY or HEARTBEAT frame carrying the primary's wall clock, in
    milliseconds since the epoch: what a replica measures its lag against."""
    return frame(kind, _CLOCK.pack(int(now * 1000)))


def frame_clock(frame: Frame) -> float | None:
    """The primary's wall clock a READY or HEARTBEAT frame carries, in
    seconds; None when it carries none."""
    if len(frame.payload) != _CLOCK.size:
        return None
    (millis,) = _CLOCK.unpack(frame.payload)
    return millis / 1000


def chunk(data: bytes | memoryview) -> bytes:
    return _CHUNK_HEADER.pack(len(data)) + bytes(data)


def chunk_header(length: int) -> bytes:
    """The length prefix of a chunk whose bytes are written separately."""
    return _CHUNK_HEADER.pack(length)


END_OF_FILE = _CHUNK_HEADER.pack(0)


class Reader(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


async def read_frame(reader: Reader) -> Frame:
    header = await reader.readexactly(_FRAME_HEADER.size)
    code, length = _FRAME_HEADER.unpack(header)
    try:
        kind = FrameType(code)
    except ValueError:
        raise ProtocolError(f"unknown frame type {code!r}") from None
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"{kind.name} frame payload of {length} bytes exceeds {MAX_PAYLOAD}")
    payload = await reader.readexactly(length) if length else b""
    return Frame(kind, payload)


async def read_chunk(reader: Reader) -> bytes:
    """One chunk of an LTX file; b"" marks the end of the file."""
    (length,) = _CHUNK_HEADER.unpack(await reader.readexactly(_CHUNK_HEADER.size))
    if length > MAX_CHUNK:
        raise ProtocolError(f"LTX chunk of {length} bytes exceeds {MAX_CHUNK}")
    return await reader.readexactly(length) if length else b""


def handoff_frame(target: str, lease: str | None) -> bytes:
    """HANDOFF names the node taking over; the frame to that node alone
    also carries the lease to take over, on a line of its own (a node's
    name holds no control character)."""
    payload = target if lease is None else f"{target}\n{lease}"
    return frame(FrameType.HANDOFF, payload.encode())


def handoff_target(frame: Frame) -> tuple[str, str | None]:
    """The node a HANDOFF frame names, and the lease it hands over, if any."""
    target, newline, lease = frame.text.partition("\n")
    return target, (lease if newline else None)


def database_name(frame: Frame) -> str:
    try:
        return check_name(frame.payload.decode("utf-8"))
    except (UnicodeDecodeError, InvalidName) as exc:
        raise ProtocolError(f"{frame.type.name} frame names no valid database: {exc}") from None


class StreamRequest(NamedTuple):
    """What a replica says when it asks for the stream."""

    node: str
    positions: dict[str, Position]
    candidate: bool = True
    """Whether it may become primary: a handoff may only name one that may."""


def encode_request(node: str, positions: dict[str, Position], candidate: bool = True) -> bytes:
    return json.dumps(
        {
            "version": PROTOCOL_VERSION,
            "node": node,
            "candidate": candidate,
            "positions": {
                name: {"txid": f"{p.txid:016x}", "checksum": f"{p.checksum:016x}"}
                for name, p in positions.items()
            },
        }
    ).encode()


def decode_request(body: bytes) -> StreamRequest:
    """Parse a replica's request; raises `BadRequest` with what is wrong."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("request body must be a JSON object")
    version = value.get("version", PROTOCOL_VERSION)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise BadRequest(f"unsupported protocol version {value.get('version')!r}")
    node = value.get("node", "")
    if not isinstance(node, str):
        raise BadRequest("node must be a string")
    if node:
        check_node_name(node, "node")
    candidate = value.get("candidate", True)
    if not isinstance(candidate, bool):
        raise BadRequest("candidate must be true or false")
    raw = value.get("positions", {})
    if not isinstance(raw, dict):
        raise BadRequest("positions must be an object")
    positions = {}
    for name, position in raw.items():
        _check_text(name, "database name")
        try:
            check_name(name)
        except InvalidName as exc:
            raise BadRequest(str(exc)) from None
        positions[name] = _position(name, position)
    return StreamRequest(node, positions, candidate)


def check_node_name(name: str, field: str) -> str:
    """A node's name goes into logs and /info: printable, one line, short."""
    _check_text(name, field)
    if len(name) > MAX_NODE_NAME:
        raise BadRequest(f"{field} must be at most {MAX_NODE_NAME} characters, got {len(name)}")
    if not name.isprintable():
        raise BadRequest(f"{field} must not contain control characters: {name!r}")
    return name


def _check_text(text: str, field: str) -> None:
    """JSON can carry lone surrogates (`"\\ud800"`), which are no UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{field} is not valid Unicode text: {text[:100]!r}") from None


def _position(name: str, value: object) -> Position:
    if not isinstance(value, dict):
        raise BadRequest(f"position of {name!r} must be an object")
    try:
        txid = _hex64(value["txid"])
        checksum = _hex64(value["checksum"])
    except (KeyError, TypeError, ValueError):
        raise BadRequest(f"position of {name!r} needs txid and checksum as 16 hex digits") from None
    return Position(txid, checksum)


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _hex64(text: object) -> int:
    """Exactly 16 hex digits: int() alone would also take signs, 0x and underscores."""
    if not isinstance(text, str) or len(text) != 16 or not _HEX_DIGITS.issuperset(text):
        raise ValueError(text)
    return int(text, 16)
