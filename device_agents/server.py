"""Serving the agent: TLS/TCP sessions side by side, a serial link, timeouts and bounds.

Written by hand on the standard library (`socket`, `ssl`, `threading`) because the agent must
run on a robot's Python 3.9 with nothing else, and because what it needs is small and specific:

- **One thread per session, one owner per socket.** Each accepted connection gets a thread that
  does the TLS handshake (so a slow handshake never holds up `accept`), then reads frames. Long
  requests (a run, a canary, a bench; `agent.LONG_REQUESTS`) run in the session's worker thread
  and hand their replies back through `outbox`; only the reader thread touches the socket,
  because an `ssl.SSLSocket` must not be read and written from two threads at once. While a
  worker runs, the reader keeps answering STATUS, PING and STOP.
- **Bounded.** At most `max_sessions` sessions; the next connection is closed at once. A frame
  must arrive whole within `frame_s` of its first byte (a sender trickling one byte a second is
  cut off on TCP; on a serial line the half frame is given up and rescanned); a TCP session that
  sends no frame for `idle_s` while nothing runs for it is closed; on a serial line the operator's
  authentication expires instead (anyone may be at the other end of the cable by then).
- **Link loss stops the robot.** A session that ends while its run is in progress stops that run
  (the control loop halts the robot within one control period).
- Plain `tcp://` is accepted on loopback only (operators then authenticate with AUTH, as on a
  serial line); any other address needs `tls://` and client certificates.
"""

from __future__ import annotations

import contextlib
import functools
import io
import ipaddress
import logging
import os
import queue
import select
import threading
import time
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlsplit

from device_agents.errors import DeviceError
from device_agents.link import Link, LinkError, link_for_socket, listen, open_link
from device_agents.protocol import BadPrefixCRC, FrameReader, Message, MsgType, ProtocolError
from device_agents.sessions import Session

if TYPE_CHECKING:
    import ssl

    from device_agents.agent import Agent

log = logging.getLogger(__name__)

POLL_S = 0.25  # read timeout of a session's loop (how often it looks at the stop flag)
BUSY_POLL_S = 0.02  # the same while a worker runs, so its reply leaves soon after it is ready
DEFAULT_IDLE_S = 120.0  # a TCP session with no frame for this long (and nothing running) is closed
DEFAULT_FRAME_S = 10.0  # a frame must arrive whole within this long of its first byte (TCP)
HANDSHAKE_S = 5.0
_NACK_BUDGET = 50  # protocol-error NACKs per second at most (garbage must not flood the link)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Inbox:
    """Wait for the link's next bytes or for a worker's reply, whichever comes first: `select`
    on the stream's descriptor and on a wake-up pipe the worker writes to, so a reply leaves as
    soon as it is ready without the reader spinning. Streams without a descriptor (`loop://`)
    are polled every BUSY_POLL_S instead."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.fd: int | None
        try:
            self.fd = int(stream.fileno())
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            self.fd = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # a full pipe is already awake
            os.write(self._wake_w, b"\0")

    def read(self, n: int, timeout_s: float, busy: bool) -> bytes:
        if self.fd is None:
            self.stream.timeout = BUSY_POLL_S if busy else timeout_s
            return bytes(self.stream.read(n))
        pending = getattr(self.stream, "pending", None)
        if not (pending is not None and pending() > 0):  # TLS may hold decrypted bytes already
            ready, _, _ = select.select([self.fd, self._wake_r], [], [], timeout_s)
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            if self.fd not in ready:
                return b""
        self.stream.timeout = 0  # bytes are there: take what has arrived, do not wait for n
        return bytes(self.stream.read(n))

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def serve_session(
    agent: Agent,
    link: Link,
    session: Session,
    idle_s: float | None = DEFAULT_IDLE_S,
    frame_s: float | None = None,
) -> None:
    """Answer requests on one link until it closes, idles out or the agent stops."""
    reader = FrameReader()
    stream = link.stream
    outbox: queue.Queue[list[Message]] = queue.Queue()
    plain_tcp = session.transport in ("tls", "tcp")
    frame_limit = frame_s if frame_s is not None else (DEFAULT_FRAME_S if plain_tcp else None)
    now = time.monotonic()
    last_rx = last_frame = now
    frame_started: float | None = None
    budget, budget_t = _NACK_BUDGET, now
    inbox = _Inbox(stream)

    def run_in_worker(msg: Message) -> None:
        frames: list[Message] = []
        try:
            frames = agent.replies(msg, session)
        except BaseException:  # replies() never raises for bad input; this is a last resort
            log.exception("worker for %s failed", msg.type.name)
        finally:
            session.work_done()  # before the reply leaves: the host's next request may follow it
            if frames:
                outbox.put(frames)
            inbox.wake()

    def flush() -> None:
        while True:
            try:
                frames = outbox.get_nowait()
            except queue.Empty:
                return
            try:
                session.send(frames)
            except ProtocolError as e:  # a reply that cannot be framed (too large): say so
                log.error("cannot frame the reply to seq %s: %s", frames[0].seq, e)
                session.send([frames[0].reply(MsgType.ERROR, {"reason": "internal", "detail": str(e)[:300]})])

    try:
        while not agent.stop_event.is_set():
            flush()
            try:
                data = inbox.read(reader.needed(), POLL_S, session.busy())
            except (LinkError, OSError) as e:
                log.info("session %s (%s) closed: %s", session.id, session.who, e)
                return
            now = time.monotonic()
            if data:
                if frame_started is None:
                    frame_started = now
                last_rx = now
                events = reader.events(data)
            elif (
                reader.buffered
                and frame_started is not None
                and (
                    now - last_rx > agent.stall_s
                    or (frame_limit is not None and now - frame_started > frame_limit)
                )
            ):
                if plain_tcp and frame_limit is not None and now - frame_started > frame_limit:
                    log.warning(
                        "session %s (%s): no whole frame within %.0f s; closing",
                        session.id,
                        session.who,
                        frame_limit,
                    )
                    return
                # a frame stalled half-way on a serial line: give it up by one byte, rescan
                reader.skip_byte()
                last_rx = now
                events = reader.events()
            else:
                if idle_s is not None and not session.busy() and now - last_frame > idle_s:
                    if plain_tcp:
                        log.info("session %s (%s) idle for %.0f s; closing", session.id, session.who, idle_s)
                        return
                    if session.operator is not None:
                        log.info(
                            "operator %s idle for %.0f s on %s; authentication expired",
                            session.who,
                            idle_s,
                            session.peer,
                        )
                        session.operator = None
                        session.challenge = None
                    last_frame = now
                continue
            if not reader.buffered:
                frame_started = None
            for ev in events:
                if isinstance(ev, Message):
                    last_frame = now
                    if ev.type in _long_requests():
                        if session.busy():
                            outbox.put(
                                [
                                    ev.reply(
                                        MsgType.NACK,
                                        {"reason": "busy", "detail": "this session already runs a request"},
                                    )
                                ]
                            )
                        else:
                            session.start_worker(functools.partial(run_in_worker, ev))
                        continue
                    outbox.put(agent.replies(ev, session))
                    continue
                if now - budget_t >= 1.0:
                    budget, budget_t = _NACK_BUDGET, now
                if budget <= 0 or isinstance(ev, BadPrefixCRC):
                    continue  # resync noise, or a flood: drop without a reply
                budget -= 1
                outbox.put([Message(MsgType.NACK, {"reason": ev.reason, "detail": str(ev)[:200]})])
            try:
                flush()
            except (LinkError, OSError) as e:
                log.info("cannot reply (%s); dropping session %s", e, session.id)
                return
    finally:
        inbox.close()
        session.closed.set()
        if session.busy() and agent.lease.holds(session):
            agent.stop_run(f"link to {session.who} lost")  # the robot is halted by the control loop
        t = agent._transfer
        if t is not None and t.session is session:
            agent._transfer = None  # a deploy cut off with its link is abandoned
            agent.lease.release(session)
        if session.worker is not None:
            session.worker.join(timeout=5.0)


def _long_requests() -> frozenset[MsgType]:
    from device_agents.agent import LONG_REQUESTS

    return LONG_REQUESTS


def _operator_for(agent: Agent, sock: Any) -> Any:
    from device_agents.tls import peer_public_key

    if agent.operators is None:
        return None
    return agent.operators.lookup(peer_public_key(sock))


def serve_listener(
    agent: Agent,
    listen_url: str,
    ready: Callable[[str], None] | None,
    tls: ssl.SSLContext | None = None,
    max_sessions: int = 8,
    idle_s: float | None = DEFAULT_IDLE_S,
) -> None:
    """Accept sessions on `tls://HOST:PORT` (client certificates) or `tcp://LOOPBACK:PORT`."""
    parts = urlsplit(listen_url)
    host = parts.hostname or ""
    if parts.scheme == "tls":
        if tls is None:
            raise DeviceError(
                "tls:// needs the agent's certificate, key and the fleet CA (--tls-cert, --tls-key, --tls-ca)"
            )
    elif parts.scheme in ("tcp", "socket"):
        if not _is_loopback(host):
            raise DeviceError(
                f"plain {listen_url} would let anyone on the network reach the robot unencrypted; "
                "listen on tls://HOST:PORT with client certificates, or on tcp://127.0.0.1:PORT"
            )
        tls = None
    else:
        raise DeviceError(f"listen URL {listen_url!r} must be tls://HOST:PORT or tcp://127.0.0.1:PORT")
    sessions: list[threading.Thread] = []

    def run(sock: Any, peer: str) -> None:
        from device_agents.tls import wrap_server

        transport = "tcp"
        if tls is not None:
            try:
                sock = wrap_server(tls, sock, timeout=HANDSHAKE_S)
            except OSError as e:  # ssl.SSLError is an OSError: no certificate, wrong CA, garbage
                log.warning("TLS handshake with %s refused: %s", peer, e)
                return
            transport = "tls"
        link = link_for_socket(sock)
        session = Session(transport, peer, link)
        if tls is not None:
            session.operator = _operator_for(agent, sock)
            if session.operator is None:
                log.warning("certificate of %s names no trusted operator: status only", peer)
        with link:
            serve_session(agent, link, session, idle_s=idle_s)

    with listen(listen_url.replace("tls://", "tcp://", 1), backlog=max(16, 2 * max_sessions)) as listener:
        if ready:
            ready(f"listening on {parts.scheme}://{listener.address[0]}:{listener.address[1]}")
        while not agent.stop_event.is_set():
            try:
                sock, peer = listener.accept_socket(timeout_s=POLL_S)
            except LinkError:
                continue
            sessions = [t for t in sessions if t.is_alive()]
            if len(sessions) >= max_sessions:
                log.warning("refusing %s: %d sessions already open", peer, len(sessions))
                sock.close()
                continue
            t = threading.Thread(target=run, args=(sock, peer), name=f"session-{peer}", daemon=True)
            t.start()
            sessions.append(t)
    for t in sessions:
        t.join(timeout=5.0)  # workers halt the robot before the process goes


def serve_link_url(agent: Agent, link_url: str, ready: Callable[[str], None] | None) -> None:
    """Serve a serial device or pyserial URL, reopening it when it drops."""
    announced = False
    while not agent.stop_event.is_set():
        try:
            link = open_link(link_url)
        except LinkError as e:
            log.warning("cannot open %s (%s); retrying", link_url, e)
            agent.stop_event.wait(1.0)
            continue
        if not announced and ready:
            ready(f"serving on {link_url}")
            announced = True
        with link:
            serve_session(agent, link, Session("serial", link_url, link))
        agent.stop_event.wait(0.2)
