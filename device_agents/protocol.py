"""The robonas wire protocol: one frame codec that the host and the robot agent both import.

A frame is a fixed 22-byte big-endian prefix (packed with `struct`), a UTF-8 JSON header and an
optional binary payload; PROTOCOL.md documents it byte by byte. Checksums are `zlib.crc32`. The
prefix carries its own CRC so that a corrupted length field is refused at once instead of making
the reader wait for bytes that will never come; the body CRC covers the JSON header and payload.

Framing is done by hand because no well-kept, dependency-free library fits a robot: it is a few
`struct` calls, and this way the limits are checked before a single byte is allocated for a
frame. Works on Python 3.9+ with only the standard library (the robot's interpreter).
"""

from __future__ import annotations

import enum
import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

from device_agents.errors import DeviceError

MAGIC = b"RN"
VERSION = 1

# magic, version, type, flags, seq, header_len, payload_len, body_crc | prefix_crc
_PREFIX = struct.Struct(">2sBBHHHII")
_PREFIX_CRC = struct.Struct(">I")
PREFIX_SIZE = _PREFIX.size + _PREFIX_CRC.size  # 22 bytes

MAX_HEADER = 16 * 1024  # JSON header bytes: a manifest is a few KiB
MAX_PAYLOAD = 64 * 1024  # binary payload bytes per frame
MAX_FRAME = PREFIX_SIZE + MAX_HEADER + MAX_PAYLOAD
# Deploy chunks are smaller than MAX_PAYLOAD so one chunk crosses a 115200-baud link in ~1.4 s.
DEFAULT_CHUNK = 16 * 1024


class MsgType(enum.IntEnum):
    """Message types; the numbers are on the wire and never reused."""

    HELLO = 1
    DEPLOY_BEGIN = 2
    DEPLOY_CHUNK = 3
    DEPLOY_END = 4
    ACK = 5
    NACK = 6
    RUN = 7
    BENCH = 8
    REPORT = 9
    STATUS = 10
    ROLLBACK = 11
    PING = 12
    PONG = 13
    ERROR = 14
    STOP = 15
    AUTH = 16


# Header fields each type must carry (documented in PROTOCOL.md; checked with Message.require).
REQUIRED_FIELDS = {
    MsgType.HELLO: ("role", "protocol"),
    MsgType.DEPLOY_BEGIN: ("manifest", "signature", "size", "sha256"),
    MsgType.DEPLOY_CHUNK: ("offset",),
    MsgType.DEPLOY_END: (),
    MsgType.ACK: (),
    MsgType.NACK: ("reason",),
    MsgType.RUN: ("episodes", "seed"),
    MsgType.BENCH: ("runs",),
    MsgType.REPORT: (),
    MsgType.STATUS: (),
    MsgType.ROLLBACK: (),
    MsgType.PING: (),
    MsgType.PONG: (),
    MsgType.ERROR: ("reason",),
    MsgType.STOP: (),
    MsgType.AUTH: ("key_id", "signature"),
}


class ProtocolError(DeviceError):
    """A frame could not be decoded or encoded. `reason` is a short code fit for a NACK."""

    reason = "protocol"


class BadCRC(ProtocolError):
    reason = "bad crc"


class BadPrefixCRC(BadCRC):
    """The 22-byte prefix fails its own CRC: most often a chance MAGIC in line noise or in the
    middle of a frame being resynchronised, not a frame the other end sent. The agent drops these
    without a reply (PROTOCOL.md, Faults)."""


class BadVersion(ProtocolError):
    reason = "bad version"


class FrameTooLarge(ProtocolError):
    reason = "frame too large"


class BadHeader(ProtocolError):
    reason = "bad header"


class UnknownMessageType(ProtocolError):
    reason = "unknown type"


class LinkError(DeviceError):
    """The byte stream under the protocol failed (port gone, socket closed, bad URL)."""


class LinkTimeout(LinkError):
    """No complete frame arrived before the deadline."""


class LinkClosed(LinkError):
    """The other end closed the connection."""


@dataclass(frozen=True)
class Message:
    """One decoded frame. `seq` pairs a reply with its request (0: unsolicited)."""

    type: MsgType
    header: dict = field(default_factory=dict)
    payload: bytes = b""
    seq: int = 0
    flags: int = 0

    def encode(self) -> bytes:
        return encode(self.type, self.header, self.payload, seq=self.seq, flags=self.flags)

    def require(self, *names: str) -> tuple[Any, ...]:
        """The header values named (default: REQUIRED_FIELDS for this type), or BadHeader."""
        names = names or REQUIRED_FIELDS.get(self.type, ())
        missing = [n for n in names if n not in self.header]
        if missing:
            raise BadHeader(f"{self.type.name} header lacks {missing}; it has {sorted(self.header)}")
        return tuple(self.header[n] for n in names)

    def reply(self, msg_type: MsgType, header: dict | None = None, payload: bytes = b"") -> Message:
        """A message answering this one (same seq)."""
        return Message(MsgType(msg_type), dict(header or {}), bytes(payload), seq=self.seq)


def _json_bytes(header: dict) -> bytes:
    try:
        return json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise BadHeader(f"header is not JSON-serialisable: {e}") from e


def encode(
    msg_type: MsgType | int,
    header: dict | None = None,
    payload: bytes = b"",
    *,
    seq: int = 0,
    flags: int = 0,
) -> bytes:
    """One frame as bytes. Raises ProtocolError for an unknown type or a frame over the limits."""
    try:
        msg_type = MsgType(msg_type)
    except ValueError as e:
        valid = ", ".join(f"{t.name}={t.value}" for t in MsgType)
        raise UnknownMessageType(f"message type {msg_type!r} is not one of {valid}") from e
    header = {} if header is None else header
    if not isinstance(header, dict):
        raise BadHeader(f"header must be a dict, got {type(header).__name__}")
    if not 0 <= seq <= 0xFFFF or not 0 <= flags <= 0xFFFF:
        raise ProtocolError(f"seq {seq} and flags {flags} must each lie in 0..65535")
    head = _json_bytes(header)
    payload = bytes(payload)
    if len(head) > MAX_HEADER:
        raise FrameTooLarge(f"JSON header of {len(head)} bytes exceeds MAX_HEADER={MAX_HEADER}")
    if len(payload) > MAX_PAYLOAD:
        raise FrameTooLarge(
            f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD={MAX_PAYLOAD}; send it in chunks"
        )
    body_crc = zlib.crc32(payload, zlib.crc32(head))
    prefix = _PREFIX.pack(MAGIC, VERSION, msg_type, flags, seq, len(head), len(payload), body_crc)
    return prefix + _PREFIX_CRC.pack(zlib.crc32(prefix)) + head + payload


def _decode_header(raw: bytes) -> dict:
    def _no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadHeader(f"JSON header does not decode: {str(e)[:120]}") from e
    if not isinstance(value, dict):
        raise BadHeader(f"JSON header must be an object, got {type(value).__name__}")
    return value


Event = Union[Message, ProtocolError]


class FrameReader:
    """Incremental decoder: bytes in, messages (and protocol errors) out, in stream order.

    Garbage is skipped by scanning for the next MAGIC. A frame with a bad prefix (CRC, version,
    lengths over the limits) or a bad body CRC is dropped by skipping just its first byte, so a
    good frame hidden behind it is still found; a frame whose CRCs hold but whose type or JSON is
    bad is skipped whole. Lengths are checked before waiting for (or allocating) a body.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._events: list[Event] = []

    def needed(self) -> int:
        """How many more bytes can be read without reading past the end of the next frame."""
        start = self._buf.find(MAGIC)
        if start < 0:
            # keep scanning: a frame may start at the last byte we hold
            return PREFIX_SIZE - (1 if self._buf[-1:] == MAGIC[:1] else 0)
        have = len(self._buf) - start
        if have < PREFIX_SIZE:
            return PREFIX_SIZE - have
        *_, hlen, plen, _crc = _PREFIX.unpack_from(self._buf, start)
        # the prefix was vetted by _decode (limits included); min() is a second line of defence
        return max(1, min(MAX_FRAME, PREFIX_SIZE + hlen + plen) - have)

    def events(self, data: bytes = b"") -> list[Event]:
        """Feed bytes; return every message and error decoded so far, never raising."""
        self._buf += data
        self._decode()
        out, self._events = self._events, []
        return out

    def feed(self, data: bytes = b"") -> list[Message]:
        """Feed bytes; return the messages decoded, in order, up to the first bad frame.

        A bad frame raises its ProtocolError once the messages before it have been returned;
        the reader has already skipped it, so call `feed(b"")` to carry on after it.
        """
        self._buf += data
        self._decode()
        msgs: list[Message] = []
        while self._events:
            ev = self._events[0]
            if isinstance(ev, ProtocolError) and msgs:
                break
            self._events.pop(0)
            if isinstance(ev, ProtocolError):
                raise ev
            msgs.append(ev)
        return msgs

    def pending(self) -> bool:
        """True if decoded messages or errors wait to be collected."""
        return bool(self._events)

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet a whole frame (the start of one, or a lone first byte
        of MAGIC)."""
        return len(self._buf)

    def skip_byte(self) -> None:
        """Give up the frame in progress by its first byte (a frame that stalled half-way); the
        next `events()` or `feed()` rescans what is held from there."""
        del self._buf[:1]

    def _decode(self) -> None:
        buf = self._buf
        while True:
            start = buf.find(MAGIC)
            if start < 0:
                # no frame start: keep only a byte that may be the first half of MAGIC
                del buf[: max(0, len(buf) - (len(MAGIC) - 1))]
                return
            if start:
                del buf[:start]
            if len(buf) < PREFIX_SIZE:
                return
            event, consumed = self._try_frame(buf)
            if event is None:
                return  # body not complete yet
            del buf[:consumed]
            self._events.append(event)

    @staticmethod
    def _try_frame(buf: bytearray) -> tuple[Event | None, int]:
        """(event, bytes to drop) for the frame at buf[0], or (None, 0) to wait for more."""
        _magic, version, mtype, flags, seq, hlen, plen, body_crc = _PREFIX.unpack_from(buf, 0)
        (prefix_crc,) = _PREFIX_CRC.unpack_from(buf, _PREFIX.size)
        if zlib.crc32(bytes(buf[: _PREFIX.size])) != prefix_crc:
            return BadPrefixCRC("frame prefix CRC mismatch; resynchronising"), 1
        if version != VERSION:
            return BadVersion(f"protocol version {version}, this end speaks {VERSION}"), 1
        if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
            return FrameTooLarge(
                f"frame declares header {hlen} B / payload {plen} B; limits are "
                f"MAX_HEADER={MAX_HEADER}, MAX_PAYLOAD={MAX_PAYLOAD}"
            ), 1
        total = PREFIX_SIZE + hlen + plen
        if len(buf) < total:
            return None, 0
        head = bytes(buf[PREFIX_SIZE : PREFIX_SIZE + hlen])
        payload = bytes(buf[PREFIX_SIZE + hlen : total])
        if zlib.crc32(payload, zlib.crc32(head)) != body_crc:
            return BadCRC(f"frame body CRC mismatch (seq {seq}); resynchronising"), 1
        try:
            mtype = MsgType(mtype)
        except ValueError:
            known = ", ".join(f"{t.name}={t.value}" for t in MsgType)
            return UnknownMessageType(f"message type {mtype} is not one of {known}"), total
        try:
            header = _decode_header(head)
        except BadHeader as e:
            return e, total
        return Message(mtype, header, payload, seq=seq, flags=flags), total


class Stream(Protocol):
    """What read_message/write_message need: pyserial's `read`, `write` and `timeout`."""

    timeout: float | None

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes) -> int | None: ...


def read_message(stream: Stream, timeout_s: float | None = None) -> Message:
    """Read one frame from a pyserial-like stream; garbage before it is skipped.

    Reads only as many bytes as the frame in progress needs, so nothing past it is consumed and
    the next call starts cleanly. `timeout_s=None` waits forever. Raises LinkTimeout when no
    whole frame arrives in time (bytes of a partial frame are then lost), ProtocolError for a
    bad frame (already skipped: call again to read on).
    """
    reader = FrameReader()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    saved = stream.timeout
    try:
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LinkTimeout(f"no complete frame within {timeout_s:.3g} s")
                stream.timeout = left
            elif stream.timeout is not None:
                stream.timeout = None
            data = stream.read(reader.needed())
            if not data and deadline is None:
                # a blocking read that returns nothing means the other end is gone
                raise LinkClosed("stream returned no data on a blocking read (closed?)")
            msgs = reader.feed(data)  # raises ProtocolError for a bad frame
            if msgs:
                return msgs[0]  # needed() never over-reads, so there is at most one
    finally:
        if stream.timeout != saved:
            stream.timeout = saved


def write_message(stream: Stream, msg: Message) -> None:
    """Encode `msg` and write it in one call (one frame never interleaves with another)."""
    stream.write(msg.encode())
    flush = getattr(stream, "flush", None)
    if flush is not None:
        flush()


def iter_chunks(data: bytes, chunk_size: int = DEFAULT_CHUNK) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) pieces of `data` for DEPLOY_CHUNK / BENCH frames."""
    if not 0 < chunk_size <= MAX_PAYLOAD:
        raise ProtocolError(f"chunk_size {chunk_size} must lie in 1..{MAX_PAYLOAD}")
    view = memoryview(data)
    for offset in range(0, len(data), chunk_size):
        yield offset, bytes(view[offset : offset + chunk_size])


def wire_time_s(nbytes: int, baudrate: int | None) -> float:
    """Seconds `nbytes` take on a serial line (8N1: 10 bits a byte); 0 for a socket (None)."""
    return 0.0 if not baudrate else nbytes * 10.0 / baudrate
