"""Fuzz the running agent over TCP: random bytes, truncated frames, bad CRCs, unknown types,
absurd lengths, bad headers. It never dies and still answers PING and STATUS afterwards."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
import zlib

import pytest

from device_agents.protocol import MAGIC, Message, MsgType, encode
from device_agents.signing import generate_keypair
from tests.device_agents.test_agent import AgentProcess, status

pytestmark = pytest.mark.e2e
CASES = 3000


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


def test_fuzz_never_kills_the_agent(tmp_path):
    pytest.importorskip("sim")
    _, pub = generate_keypair(tmp_path / "keys")
    agent = AgentProcess(tmp_path / "state", pub)
    rng = random.Random(99)
    host, port = agent.url[len("tcp://") :].rsplit(":", 1)
    sent = 0
    try:
        for _burst in range(6):  # several connections, dropped abruptly
            sock = socket.create_connection((host, int(port)))
            stop = threading.Event()
            drain = threading.Thread(target=_drain, args=(sock, stop), daemon=True)
            drain.start()
            for _ in range(CASES // 6):
                sock.sendall(_frame_with(rng))
                sent += 1
            time.sleep(0.1)
            stop.set()
            sock.close()
            drain.join()
        assert agent.alive()
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
    print(f"fuzz cases sent: {sent}")
