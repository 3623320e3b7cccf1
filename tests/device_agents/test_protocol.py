"""The frame codec: round trips, limits, and a seeded fuzz of the incremental decoder."""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from device_agents.errors import DeviceError
from device_agents.protocol import (
    MAGIC,
    MAX_FRAME,
    MAX_HEADER,
    MAX_PAYLOAD,
    PREFIX_SIZE,
    REQUIRED_FIELDS,
    VERSION,
    BadCRC,
    BadHeader,
    BadPrefixCRC,
    BadVersion,
    FrameReader,
    FrameTooLarge,
    LinkClosed,
    LinkTimeout,
    Message,
    MsgType,
    ProtocolError,
    UnknownMessageType,
    encode,
    iter_chunks,
    read_message,
    write_message,
)

SAMPLE_HEADERS = {
    MsgType.HELLO: {"role": "host", "protocol": 1, "agent": "pi-07"},
    MsgType.DEPLOY_BEGIN: {
        "manifest": {"sha256": "ab" * 32, "arch": {"widths": [64, 64]}},
        "signature": "c2ln",
        "size": 100_000,
        "sha256": "ab" * 32,
    },
    MsgType.DEPLOY_CHUNK: {"offset": 16384},
    MsgType.DEPLOY_END: {},
    MsgType.ACK: {"next_offset": 32768},
    MsgType.NACK: {"reason": "bad signature", "detail": "ünïcode ok"},
    MsgType.RUN: {"episodes": 3, "seed": 7, "thresholds": {"min_return": 100.5}},
    MsgType.BENCH: {"slot": "a", "runs": 200},
    MsgType.REPORT: {"p50_ms": 0.41, "returns": [1.0, -2.5]},
    MsgType.STATUS: {},
    MsgType.ROLLBACK: {},
    MsgType.PING: {"t": 1.5},
    MsgType.PONG: {"t": 1.5},
    MsgType.ERROR: {"reason": "internal", "detail": "boom"},
    MsgType.STOP: {"reason": "operator"},
    MsgType.AUTH: {"key_id": "0123456789abcdef", "signature": "c2ln"},
}


def _raw_frame(
    *,
    version=VERSION,
    mtype=int(MsgType.PING),
    flags=0,
    seq=0,
    head=b"{}",
    payload=b"",
    hlen=None,
    plen=None,
    body_crc=None,
) -> bytes:
    """A frame with any field forced, and a valid prefix CRC (so only the forced field is bad)."""
    hlen = len(head) if hlen is None else hlen
    plen = len(payload) if plen is None else plen
    body_crc = zlib.crc32(payload, zlib.crc32(head)) if body_crc is None else body_crc
    prefix = struct.pack(">2sBBHHHII", MAGIC, version, mtype, flags, seq, hlen, plen, body_crc)
    return prefix + struct.pack(">I", zlib.crc32(prefix)) + head + payload


def _drain(reader: FrameReader, data: bytes) -> tuple[list[Message], list[ProtocolError]]:
    """Feed `data` through the raising API, collecting messages and errors until quiet."""
    msgs: list[Message] = []
    errors: list[ProtocolError] = []
    chunk = data
    while True:
        try:
            got = reader.feed(chunk)
        except ProtocolError as e:
            errors.append(e)
            chunk = b""
            continue
        msgs += got
        chunk = b""
        if not reader.pending():
            return msgs, errors


class BytesStream:
    """pyserial-like stream over a fixed byte string, recording each read size."""

    def __init__(self, data: bytes):
        self.data = bytearray(data)
        self.timeout = 1.0
        self.reads: list[int] = []
        self.written = bytearray()

    def read(self, size: int = 1) -> bytes:
        self.reads.append(size)
        out = bytes(self.data[:size])
        del self.data[:size]
        return out

    def write(self, data: bytes) -> int:
        self.written += data
        return len(data)


@pytest.mark.parametrize("mtype", list(MsgType))
def test_every_type_round_trips(mtype):
    payload = bytes(range(256)) * 3 if mtype in (MsgType.DEPLOY_CHUNK, MsgType.BENCH) else b""
    frame = encode(mtype, SAMPLE_HEADERS[mtype], payload, seq=513, flags=2)
    [msg] = FrameReader().feed(frame)
    assert msg == Message(mtype, SAMPLE_HEADERS[mtype], payload, seq=513, flags=2)
    assert msg.require() == tuple(SAMPLE_HEADERS[mtype][k] for k in REQUIRED_FIELDS[mtype])
    assert Message(mtype, SAMPLE_HEADERS[mtype], payload, 513, 2).encode() == frame


def test_frame_layout_is_the_documented_one():
    frame = encode(MsgType.ACK, {"a": 1}, b"xyz", seq=9)
    assert PREFIX_SIZE == 22 and frame[:2] == b"RN" and frame[2] == VERSION
    assert frame[3] == MsgType.ACK and struct.unpack(">H", frame[6:8]) == (9,)
    hlen, plen = struct.unpack(">HI", frame[8:14])
    assert (hlen, plen) == (len(b'{"a":1}'), 3)
    assert struct.unpack(">I", frame[14:18])[0] == zlib.crc32(b'{"a":1}xyz')
    assert struct.unpack(">I", frame[18:22])[0] == zlib.crc32(frame[:18])
    assert frame[22:] == b'{"a":1}xyz'


def test_byte_by_byte_feed_and_many_frames_in_one_chunk():
    frames = [encode(t, SAMPLE_HEADERS[t], seq=i) for i, t in enumerate(MsgType)]
    reader = FrameReader()
    out = []
    for b in b"".join(frames):
        out += reader.feed(bytes([b]))
    assert [m.type for m in out] == list(MsgType)
    assert [m.type for m in FrameReader().feed(b"".join(frames))] == list(MsgType)


def test_require_names_missing_fields():
    with pytest.raises(BadHeader, match="offset"):
        Message(MsgType.DEPLOY_CHUNK, {"off": 1}).require()
    assert Message(MsgType.RUN, {"episodes": 2, "seed": 3}).require() == (2, 3)


def test_reply_keeps_seq():
    req = Message(MsgType.PING, {}, seq=77)
    assert req.reply(MsgType.PONG, {"x": 1}).seq == 77


def test_encode_refuses_bad_input():
    with pytest.raises(FrameTooLarge, match="MAX_PAYLOAD"):
        encode(MsgType.DEPLOY_CHUNK, {"offset": 0}, b"\0" * (MAX_PAYLOAD + 1))
    with pytest.raises(FrameTooLarge, match="MAX_HEADER"):
        encode(MsgType.REPORT, {"blob": "x" * MAX_HEADER})
    with pytest.raises(UnknownMessageType, match="PING=12"):
        encode(99, {})
    with pytest.raises(BadHeader):
        encode(MsgType.REPORT, {"x": float("nan")})
    with pytest.raises(BadHeader):
        encode(MsgType.REPORT, ["not", "a", "dict"])  # type: ignore[arg-type]
    assert issubclass(ProtocolError, DeviceError)


def test_garbage_before_and_between_frames_is_skipped():
    good = encode(MsgType.PING, {"n": 1})
    stream = b"\x00\xffRRNN garbage RN" + good + b"RNRN\x01" + good
    msgs, errors = _drain(FrameReader(), stream)
    assert [m.header for m in msgs] == [{"n": 1}, {"n": 1}]
    assert all(isinstance(e, ProtocolError) for e in errors)


@pytest.mark.parametrize(
    "bad, error",
    [
        (_raw_frame(version=VERSION + 1), BadVersion),
        (_raw_frame(mtype=200), UnknownMessageType),
        (_raw_frame(head=b"[1,2]"), BadHeader),
        (_raw_frame(head=b"{\xff}"), BadHeader),
        (_raw_frame(head=b'{"x": NaN}'), BadHeader),
        (_raw_frame(head=b"[" * 5000 + b"]" * 5000), BadHeader),
        (_raw_frame(body_crc=1), BadCRC),
        (_raw_frame(hlen=MAX_HEADER + 1), FrameTooLarge),
        (_raw_frame(plen=0xFFFFFFFF), FrameTooLarge),
    ],
)
def test_each_bad_frame_gives_its_error_then_the_next_frame_decodes(bad, error):
    good = encode(MsgType.PONG, {"ok": True})
    msgs, errors = _drain(FrameReader(), bad + good)
    assert [type(e) for e in errors][:1] == [error]
    assert [m.type for m in msgs] == [MsgType.PONG]


def test_a_bad_prefix_crc_is_its_own_kind_of_bad_crc():
    frame = bytearray(encode(MsgType.PING, {"n": 1}))
    frame[PREFIX_SIZE - 1] ^= 1  # the prefix CRC itself
    errors = FrameReader().events(bytes(frame))
    assert isinstance(errors[0], BadPrefixCRC) and errors[0].reason == BadCRC.reason
    body = _raw_frame(body_crc=1)  # a body CRC failure is a plain BadCRC
    assert [type(e) for e in FrameReader().events(body)][:1] == [BadCRC]


def test_a_stalled_frame_is_given_up_byte_by_byte():
    good = encode(MsgType.PING, {"n": 2, "pad": "x" * 100})
    reader = FrameReader()
    assert reader.events(good[:30]) == [] and reader.buffered == 30
    reader.skip_byte()  # the agent does this after stall_s of silence
    assert reader.events() == [] and reader.buffered < 30
    msgs = [e for e in reader.events(good) if isinstance(e, Message)]
    assert [m.header["n"] for m in msgs] == [2] and reader.buffered == 0


def test_absurd_length_is_refused_at_once_without_waiting_for_the_body():
    reader = FrameReader()
    with pytest.raises(FrameTooLarge):
        reader.feed(_raw_frame(plen=0xFFFFFFFF)[:PREFIX_SIZE])
    assert reader.needed() <= PREFIX_SIZE


def test_messages_before_an_error_are_returned_first():
    good = encode(MsgType.PING, {"i": 1})
    reader = FrameReader()
    first = reader.feed(good + _raw_frame(body_crc=5) + good)
    assert [m.header for m in first] == [{"i": 1}]
    with pytest.raises(BadCRC):
        reader.feed()
    assert [m.header for m in reader.feed()] == [{"i": 1}]


def test_fuzz_random_bytes_flipped_bits_truncations_only_protocol_errors():
    rng = random.Random(1234)
    frames = [
        encode(t, SAMPLE_HEADERS[t], rng.randbytes(rng.randrange(0, 300)), seq=i)
        for i, t in enumerate(MsgType)
    ]
    sentinel = encode(MsgType.PONG, {"sentinel": True}, b"end")
    for trial in range(3000):
        kind = trial % 4
        if kind == 0:  # random bytes, sometimes with magic sprinkled in
            junk = bytearray(rng.randbytes(rng.randrange(0, 400)))
            for _ in range(rng.randrange(0, 4)):
                pos = rng.randrange(0, len(junk) + 1)
                junk[pos:pos] = MAGIC
            data = bytes(junk)
        elif kind == 1:  # flipped bits in a real frame
            data = bytearray(rng.choice(frames))
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            data = bytes(data)
        elif kind == 2:  # truncated frame
            f = rng.choice(frames)
            data = f[: rng.randrange(0, len(f))]
        else:  # random fields with a valid prefix CRC, including absurd lengths and types
            data = _raw_frame(
                version=rng.choice([VERSION, rng.randrange(256)]),
                mtype=rng.choice([rng.choice(list(MsgType)), rng.randrange(256)]),
                flags=rng.randrange(65536),
                head=rng.choice([b"{}", b"{", b'{"a":[1,2]}', rng.randbytes(8)]),
                payload=rng.randbytes(rng.randrange(0, 50)),
                hlen=rng.choice([None, rng.randrange(65536)]),
                plen=rng.choice([None, rng.randrange(2**32), 2**32 - 1]),
            )[: rng.randrange(PREFIX_SIZE, PREFIX_SIZE + 80)]
        reader = FrameReader()
        # feed in random pieces, like a serial port does; then a good frame must come out
        pieces = []
        i = 0
        while i < len(data):
            n = rng.randrange(1, 64)
            pieces.append(data[i : i + n])
            i += n
        msgs: list[Message] = []
        for piece in pieces:
            try:
                msgs += reader.feed(piece)
            except ProtocolError:
                msgs += _drain(reader, b"")[0]
        assert reader.needed() <= MAX_FRAME
        # a truncated frame or a prefix with big-but-legal lengths swallows what follows until
        # its declared length is reached; after that (at most MAX_FRAME bytes) resync holds
        tail, _ = _drain(reader, sentinel + b"\0" * MAX_FRAME + sentinel)
        assert tail and tail[-1].header == {"sentinel": True}, f"trial {trial}: {data!r}"


def test_events_api_never_raises_and_keeps_order():
    good = encode(MsgType.PING, {})
    events = FrameReader().events(good + _raw_frame(mtype=250) + good)
    assert [type(e) for e in events] == [Message, UnknownMessageType, Message]


def test_read_message_never_reads_past_the_frame():
    one, two = encode(MsgType.PING, {"n": 1}, b"p" * 100), encode(MsgType.PING, {"n": 2})
    stream = BytesStream(b"junk" + one + two)
    assert read_message(stream, 1.0).header == {"n": 1}
    assert read_message(stream, 1.0).header == {"n": 2}
    assert max(stream.reads) <= len(one) and stream.timeout == 1.0  # timeout restored


def test_read_message_times_out_and_reports_closed_streams():
    with pytest.raises(LinkTimeout):
        read_message(BytesStream(encode(MsgType.PING, {})[:10]), timeout_s=0.05)
    with pytest.raises(LinkClosed):
        read_message(BytesStream(b""), timeout_s=None)


def test_write_message_writes_one_frame():
    stream = BytesStream(b"")
    write_message(stream, Message(MsgType.STATUS, {"q": 1}, seq=4))
    assert bytes(stream.written) == encode(MsgType.STATUS, {"q": 1}, seq=4)


def test_iter_chunks_covers_the_data_exactly():
    data = bytes(range(256)) * 200
    chunks = list(iter_chunks(data, 4096))
    assert [o for o, _ in chunks] == list(range(0, len(data), 4096))
    assert b"".join(c for _, c in chunks) == data
    with pytest.raises(ProtocolError, match="chunk_size"):
        list(iter_chunks(data, MAX_PAYLOAD + 1))
