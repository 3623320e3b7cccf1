"""Links over loop://, TCP on loopback and a pty pair: round trips, chunked deploy, timeouts."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from device_agents.link import Link, LinkError, listen, open_link
from device_agents.protocol import (
    DEFAULT_CHUNK,
    LinkClosed,
    LinkTimeout,
    Message,
    MsgType,
    iter_chunks,
    wire_time_s,
)
from tests.device_agents.pty_stream import FdStream


def serve(link: Link, stop_after: int | None = None) -> dict:
    """A toy agent: PONG to PING, ACK deploy frames, assemble the model; until the link closes."""
    state: dict = {"model": bytearray(), "served": 0}
    try:
        while stop_after is None or state["served"] < stop_after:
            try:
                msg = link.receive(timeout_s=10.0)
            except LinkTimeout:
                break
            state["served"] += 1
            if msg.type == MsgType.PING:
                link.send(msg.reply(MsgType.PONG, msg.header))
            elif msg.type == MsgType.DEPLOY_BEGIN:
                state["begin"] = msg.header
                link.send(msg.reply(MsgType.ACK, {"next_offset": 0}))
            elif msg.type == MsgType.DEPLOY_CHUNK:
                (offset,) = msg.require()
                if offset != len(state["model"]):
                    link.send(
                        msg.reply(MsgType.NACK, {"reason": "offset", "next_offset": len(state["model"])})
                    )
                    continue
                state["model"] += msg.payload
                link.send(msg.reply(MsgType.ACK, {"next_offset": len(state["model"])}))
            elif msg.type == MsgType.DEPLOY_END:
                ok = hashlib.sha256(state["model"]).hexdigest() == state["begin"]["sha256"]
                link.send(msg.reply(MsgType.ACK if ok else MsgType.NACK, {"reason": "sha256"}))
    except LinkClosed:
        pass
    return state


def deploy(link: Link, model: bytes, chunk_size: int = DEFAULT_CHUNK) -> None:
    digest = hashlib.sha256(model).hexdigest()
    begin = {"manifest": {"sha256": digest}, "signature": None, "size": len(model), "sha256": digest}
    assert link.request(Message(MsgType.DEPLOY_BEGIN, begin)).type == MsgType.ACK
    for offset, chunk in iter_chunks(model, chunk_size):
        reply = link.request(
            Message(MsgType.DEPLOY_CHUNK, {"offset": offset}, chunk),
            timeout_s=link.frame_timeout_s(len(chunk)),
        )
        assert reply.type == MsgType.ACK and reply.header["next_offset"] == offset + len(chunk)
    assert link.request(Message(MsgType.DEPLOY_END, {})).type == MsgType.ACK


def test_loop_url_round_trip_and_request_seq():
    with open_link("loop://", timeout_s=1.0) as link:
        msg = Message(MsgType.STATUS, {"slot": "b"}, b"\x00\x01")
        link.send(msg)
        assert link.receive() == msg
        echoed = link.request(Message(MsgType.PING, {"k": 1}))  # loop:// echoes the request
        assert echoed.seq == 1 and echoed.header == {"k": 1}
        assert link.request(Message(MsgType.PING, {})).seq == 2


def test_read_timeout_raises_link_timeout():
    with open_link("loop://", timeout_s=0.05) as link:
        t0 = time.monotonic()
        with pytest.raises(LinkTimeout):
            link.receive()
        assert 0.04 <= time.monotonic() - t0 < 1.0
        with pytest.raises(LinkTimeout, match="PING"):
            link.request(Message(MsgType.PING, {}), timeout_s=0.0)


def test_request_skips_stale_replies_and_holds_unsolicited_ones():
    with open_link("loop://", timeout_s=1.0) as link:
        link.send(Message(MsgType.PONG, {"late": True}, seq=999))  # a reply nobody waits for
        link.send(Message(MsgType.REPORT, {"p50_ms": 1.0}))  # unsolicited (seq 0)
        reply = link.request(Message(MsgType.PING, {"now": True}))
        assert reply.header == {"now": True}
        assert link.receive().type == MsgType.REPORT


@pytest.mark.parametrize("url", ["ftp://x", "", "/dev/ttyUSB0?parity=Q", "/dev/ttyUSB0?baudrate=fast"])
def test_bad_urls_name_the_problem(url):
    with pytest.raises(LinkError):
        open_link(url)


def test_open_missing_serial_device_is_a_link_error():
    with pytest.raises(LinkError, match="cannot open"):
        open_link("/dev/robonas-no-such-tty?baudrate=9600")


def test_listen_rejects_non_tcp_urls():
    with pytest.raises(LinkError, match="tcp://"):
        listen("loop://")


@pytest.mark.parametrize("scheme", ["socket", "tcp"])
def test_tcp_listener_and_socket_client(scheme):
    with listen("tcp://127.0.0.1:0", timeout_s=5.0) as listener:
        host, port = listener.address
        result: dict = {}

        def agent():
            with listener.accept(timeout_s=5.0) as conn:
                result.update(serve(conn))

        thread = threading.Thread(target=agent, daemon=True)
        thread.start()
        model = os.urandom(40_000)
        with open_link(f"{scheme}://{host}:{port}", timeout_s=5.0) as link:
            pong = link.request(Message(MsgType.PING, {"t": 1}))
            assert pong.type == MsgType.PONG and pong.header == {"t": 1}
            deploy(link, model, chunk_size=8192)
        thread.join(timeout=10)
        assert not thread.is_alive() and bytes(result["model"]) == model


def test_listener_accept_times_out():
    with listen("tcp://127.0.0.1:0") as listener, pytest.raises(LinkTimeout):
        listener.accept(timeout_s=0.05)


def test_pty_pair_chunked_transfer_of_100_kB():
    master, slave = os.openpty()
    try:
        link = open_link(f"{os.ttyname(slave)}?baudrate=115200", timeout_s=5.0)
    finally:
        os.close(slave)  # pyserial holds its own descriptor on the slave now
    agent_link = Link(FdStream(master), timeout_s=5.0)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(serve(agent_link)), daemon=True)
    thread.start()
    model = os.urandom(100_000)
    try:
        t0 = time.monotonic()
        deploy(link, model)
        elapsed = time.monotonic() - t0
    finally:
        link.close()  # the master then reads EIO or times out: the toy agent stops
    thread.join(timeout=15)
    agent_link.close()
    assert bytes(result["model"]) == model
    # a pty does not pace bytes at the baud rate, so this measures the stack, not the wire
    print(
        f"pty: 100 kB in {elapsed * 1000:.0f} ms ({len(model) / elapsed / 1e3:.0f} kB/s); "
        f"a real 115200-baud line needs {wire_time_s(len(model), 115200):.1f} s"
    )
    assert elapsed < 10.0
