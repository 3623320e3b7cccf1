"""Fuzz the decoder and the running agent over TCP: random bytes, truncated frames, bad CRCs,
unknown types, absurd lengths, bad headers, from several clients at once (some authenticated).
The agent never dies, answers STATUS throughout, and PING and STATUS afterwards."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
import zlib

import pytest

from device_agents.link import link_for_socket
from device_agents.protocol import MAGIC, MAX_FRAME, FrameReader, LinkClosed, Message, MsgType, encode
from device_agents.signing import generate_keypair
from tests.device_agents.test_agent import AgentProcess, authenticate, status

pytestmark = pytest.mark.e2e
CASES = 10_000


def _frame_with(rng: random.Random) -> bytes:
    """One malformed (or odd but valid) frame."""
    kind = rng.randrange(9)
    good = encode(
        rng.choice(list(MsgType)),
        {"k": rng.random()},
        rng.randbytes(rng.randrange(64)),
        seq=rng.randrange(65536),
    )
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if kind == 1:
        return good[: rng.randrange(1, len(good))]  # truncated
    if kind == 2:  # flipped bit in the body or prefix
        b = bytearray(good)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 3:  # unknown type with valid CRCs
        b = bytearray(good)
        b[3] = rng.choice([0, 15, 99, 255])
        prefix = bytes(b[:18])
        return prefix + struct.pack(">I", zlib.crc32(prefix)) + bytes(b[22:])
    if kind == 4:  # absurd lengths, prefix CRC made to match
        prefix = struct.pack(
            ">2sBBHHHII",
            MAGIC,
            1,
            12,
            0,
            1,
            rng.choice([65535, 16385]),
            rng.choice([2**32 - 1, 65537, 10**9]),
            0,
        )
        return prefix + struct.pack(">I", zlib.crc32(prefix))
    if kind == 5:  # valid CRCs, header not a JSON object / bad JSON
        head = rng.choice([b"[1,2]", b"{bad", b"\xff\xfe", b"NaN", b'"x"', b'{"a":' * 50])
        prefix = struct.pack(
            ">2sBBHHHII", MAGIC, 1, rng.choice([1, 2, 7, 10]), 0, 1, len(head), 0, zlib.crc32(head)
        )
        return prefix + struct.pack(">I", zlib.crc32(prefix)) + head
    if kind == 6:  # valid frames of requests with wrong field types
        header = rng.choice(
            [
                {"episodes": "x", "seed": 0},
                {"runs": -1},
                {"offset": None},
                {"manifest": 3, "signature": 1, "size": "big", "sha256": []},
                {"manifest": {}, "signature": None, "size": 10**12, "sha256": "0"},
                {"episodes": 10**9, "seed": 0, "slot": "zz"},
                {},
            ]
        )
        t = rng.choice(
            [
                MsgType.RUN,
                MsgType.BENCH,
                MsgType.DEPLOY_CHUNK,
                MsgType.DEPLOY_BEGIN,
                MsgType.DEPLOY_END,
                MsgType.ROLLBACK,
            ]
        )
        return encode(t, header, seq=rng.randrange(1, 65536))
    if kind == 7:  # bad version
        b = bytearray(good)
        b[2] = rng.choice([0, 2, 255])
        return bytes(b)
    return MAGIC * rng.randrange(1, 20)


def _drain(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            if not sock.recv(65536):
                return
        except TimeoutError:
            continue
        except OSError:
            return


def test_ten_thousand_malformed_frames_never_break_the_decoder():
    """The decoder alone: every malformed frame becomes an event or waits for more bytes; none
    raises, and a good frame sent after the garbage is still decoded."""
    rng = random.Random(7)
    reader = FrameReader()
    for _ in range(CASES):
        reader.events(_frame_with(rng))
    reader.events(b"\x00" * MAX_FRAME)  # flush a half frame that waits for bytes that never come
    good = encode(MsgType.PING, {"after": "fuzz"}, seq=3)
    assert [e for e in reader.events(good) if isinstance(e, Message)] == [
        Message(MsgType.PING, {"after": "fuzz"}, seq=3)
    ]


def _fuzz_client(url: str, cases: int, seed: int, authenticated: bool, sent: list[int]) -> None:
    """One fuzzing client: optionally authenticated (so malformed requests reach the handlers
    with an operator's roles), then `cases` malformed frames, the connection dropped abruptly
    every few hundred."""
    rng = random.Random(seed)
    done = 0
    while done < cases:
        host, port = url[len("tcp://") :].rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        link = link_for_socket(sock, timeout_s=10)
        if authenticated:
            try:
                assert authenticate(link).type == MsgType.ACK
            except LinkClosed:
                # refused at the door: the agent holds max_sessions sessions, and the ones this
                # client's dropped connections left may still be closing (slow on a loaded machine)
                link.close()
                time.sleep(0.2)
                continue
        stop = threading.Event()
        drain = threading.Thread(target=_drain, args=(sock, stop), daemon=True)
        drain.start()
        for _ in range(min(400, cases - done)):
            try:
                sock.sendall(_frame_with(rng))
            except OSError:
                break  # the agent closed a session that sent an absurd or stalled frame
            done += 1
        stop.set()
        drain.join()
        link.close()
    sent.append(done)


def test_fuzz_with_concurrent_clients_never_kills_the_agent(tmp_path):
    """CASES malformed frames from four clients at once (two authenticated as an operator with
    every role), while a fifth client checks that STATUS keeps being answered."""
    pytest.importorskip("sim")
    _, pub = generate_keypair(tmp_path / "keys")
    agent = AgentProcess(tmp_path / "state", pub)
    sent: list[int] = []
    try:
        clients = [
            threading.Thread(target=_fuzz_client, args=(agent.url, CASES // 4, 99 + i, i % 2 == 0, sent))
            for i in range(4)
        ]
        for c in clients:
            c.start()
        answered = 0
        with agent.link(timeout_s=10) as watcher:
            while any(c.is_alive() for c in clients):
                assert status(watcher)["agent"] == "test-agent"
                answered += 1
        for c in clients:
            c.join()
        assert sum(sent) == CASES and agent.alive()
        # a connection with a stalled truncated frame, then a good PING behind it
        with agent.link(timeout_s=10) as link:
            link.stream.write(encode(MsgType.PING, {"x": 1}, b"p" * 100, seq=9)[:40])
            pong = link.request(Message(MsgType.PING, {"after": "fuzz"}))
            assert pong.type == MsgType.PONG and pong.header == {"after": "fuzz"}
            st = status(link)
            assert st["active"] is None and st["agent"] == "test-agent"
        assert agent.alive()
    finally:
        agent.stop()
    print(
        f"fuzz frames sent: {sum(sent)} from 4 concurrent clients; STATUS answered {answered} times meanwhile"
    )
