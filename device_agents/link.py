"""Links: a byte stream plus the frame codec, for the host end and the agent end.

The host opens links through pyserial's `serial_for_url`, so one code path serves a USB serial
port (`/dev/ttyUSB0?baudrate=115200`), TCP (`socket://host:port`, or `tcp://host:port` as an
alias), `rfc2217://` and the in-process `loop://` used in tests; `tls://host:port` (pyserial has
no TLS) is a standard-library socket under `ssl` with the operator's client certificate.

The agent end of TCP is a plain standard-library socket server (`listen`), written by hand
because pyserial only has client-side URL handlers (device_agents.server runs its sessions, TLS
included); each connection is wrapped in `SocketStream`, which offers the same `read(n)` /
`write(b)` / `timeout` interface, so `read_message` / `write_message` and `Link` work on it
unchanged.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import ssl
import time
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

import serial

from device_agents.protocol import (
    MAX_FRAME,
    LinkClosed,
    LinkError,
    LinkTimeout,
    Message,
    Stream,
    read_message,
    wire_time_s,
    write_message,
)

log = logging.getLogger(__name__)

DEFAULT_BAUDRATE = 115200
AGENT_URL = "tcp://127.0.0.1:7447"
URL_SCHEMES = ("/dev/... (serial device path)", "tls://", "socket://", "tcp://", "loop://", "rfc2217://")


def _flag(value: str) -> bool:
    return value.lower() in ("1", "true", "yes")


# Query parameters accepted on a plain serial device path, and how to parse them.
_SERIAL_PARAMS: dict[str, Callable[[str], Any]] = {"baudrate": int, "rtscts": _flag}
_PUSHBACK_LIMIT = 64  # unsolicited messages kept while a request waits for its reply


class Link:
    """Frames over a pyserial-like stream. Not thread-safe: one conversation at a time.

    `request` stamps the message with the next sequence number and returns the first message
    carrying that number; messages that arrive meanwhile with another number (a late reply to a
    request that timed out, or an unsolicited REPORT) are dropped if stale or kept for `receive`.
    """

    def __init__(self, stream: Stream, timeout_s: float = 5.0, baudrate: int | None = None):
        self.stream = stream
        self.timeout_s = timeout_s
        self.baudrate = baudrate  # None on sockets; sizes per-frame timeouts on serial lines
        self._seq = 0
        self._held: collections.deque[Message] = collections.deque(maxlen=_PUSHBACK_LIMIT)

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def frame_timeout_s(self, nbytes: int = MAX_FRAME) -> float:
        """Base timeout plus twice the wire time of `nbytes` at this link's baud rate."""
        return self.timeout_s + 2.0 * wire_time_s(nbytes, self.baudrate)

    def send(self, msg: Message) -> None:
        try:
            write_message(self.stream, msg)
        except serial.SerialTimeoutException as e:
            raise LinkTimeout(f"write of a {msg.type.name} frame timed out: {e}") from e
        except OSError as e:  # SerialException is an OSError too
            raise LinkError(f"write of a {msg.type.name} frame failed: {e}") from e

    def receive(self, timeout_s: float | None = None) -> Message:
        """The next message (held unsolicited ones first). Raises LinkTimeout, ProtocolError."""
        if self._held:
            return self._held.popleft()
        return self._read(self.timeout_s if timeout_s is None else timeout_s)

    def request(self, msg: Message, timeout_s: float | None = None) -> Message:
        """Send `msg` with a fresh seq; return the reply carrying the same seq."""
        self._seq = self._seq % 0xFFFF + 1  # 1..65535; 0 marks unsolicited messages
        seq = self._seq
        self.send(Message(msg.type, msg.header, msg.payload, seq=seq, flags=msg.flags))
        budget = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkTimeout(f"no reply to {msg.type.name} (seq {seq}) within {budget:.3g} s")
            reply = self._read(left)
            if reply.seq == seq:
                return reply
            if reply.seq == 0:
                self._held.append(reply)
            else:
                log.debug("dropping stale %s seq %d (waiting for %d)", reply.type.name, reply.seq, seq)

    def _read(self, timeout_s: float) -> Message:
        try:
            return read_message(self.stream, timeout_s)
        except OSError as e:  # SerialException and socket errors; ours are not OSErrors
            raise LinkClosed(f"link read failed: {e}") from e

    def close(self) -> None:
        close = getattr(self.stream, "close", None)  # `Stream` does not require one
        if close is not None:
            with contextlib.suppress(OSError):
                close()


def _serial_kwargs(query: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _SERIAL_PARAMS:
            raise LinkError(f"unknown serial parameter {key!r}; valid: {sorted(_SERIAL_PARAMS)}")
        try:
            kwargs[key] = _SERIAL_PARAMS[key](value)
        except ValueError as e:
            raise LinkError(f"bad value {value!r} for serial parameter {key!r}") from e
    return kwargs


def open_link(
    url: str, timeout_s: float = 5.0, tls: ssl.SSLContext | None = None, server_name: str | None = None
) -> Link:
    """Open a host-side link.

    `url` is a serial device path with optional `?baudrate=N` (default 115200), or a pyserial URL
    (`socket://host:port`, `loop://`, `rfc2217://host:port`); `tcp://host:port` means
    `socket://host:port`; `tls://host:port` is TCP under TLS with the operator's client
    certificate (`tls`, from `device_agents.tls.client_context`), checking that the agent's
    certificate names `server_name` (default: the host). `timeout_s` is the default read timeout
    of `receive` and `request`.
    """
    if not isinstance(url, str) or not url:
        raise LinkError(f"link URL {url!r} is empty; expected one of {URL_SCHEMES}")
    if url.startswith("tls://"):
        return _open_tls(url, timeout_s, tls, server_name)
    baudrate: int | None = None
    kwargs: dict[str, Any] = {}
    if url.startswith("tcp://"):
        url = "socket://" + url[len("tcp://") :]
    if "://" in url:
        scheme = url.split("://", 1)[0].lower()
        if scheme not in ("socket", "loop", "rfc2217", "spy", "hwgrep", "alt"):
            raise LinkError(f"link URL scheme {scheme!r} in {url!r}; expected one of {URL_SCHEMES}")
        if scheme in ("loop", "rfc2217"):
            baudrate = DEFAULT_BAUDRATE
    else:
        path, _, query = url.partition("?")
        kwargs = _serial_kwargs(query)
        kwargs.setdefault("baudrate", DEFAULT_BAUDRATE)
        baudrate = kwargs["baudrate"]
        url = path
    # A write must not block forever if the far end stops reading; allow a whole frame's time.
    write_timeout = timeout_s + 2.0 * wire_time_s(MAX_FRAME, baudrate)
    try:
        stream = serial.serial_for_url(url, timeout=timeout_s, write_timeout=write_timeout, **kwargs)
    except (serial.SerialException, ValueError, OSError) as e:
        raise LinkError(f"cannot open link {url!r}: {e}") from e
    return Link(stream, timeout_s=timeout_s, baudrate=baudrate)


def _open_tls(url: str, timeout_s: float, tls: ssl.SSLContext | None, server_name: str | None) -> Link:
    parts = urlsplit(url)
    if not parts.hostname or parts.port is None:
        raise LinkError(f"link URL {url!r} must look like tls://HOST:PORT")
    if tls is None:
        raise LinkError(
            f"{url} needs the operator's TLS credentials (the fleet file's [credentials]; "
            "`robonas keys ca` and `robonas keys operator` make them)"
        )
    try:
        raw = socket.create_connection((parts.hostname, parts.port), timeout=timeout_s)
    except OSError as e:
        raise LinkError(f"cannot open link {url!r}: {e}") from e
    try:
        sock = tls.wrap_socket(raw, server_hostname=server_name or parts.hostname)
    except (ssl.SSLError, OSError) as e:
        raw.close()
        raise LinkError(f"TLS handshake with {url} (as {server_name or parts.hostname!r}) failed: {e}") from e
    return link_for_socket(sock, timeout_s)


def link_for_socket(sock: socket.socket, timeout_s: float = 5.0) -> Link:
    """A `Link` over a connected socket (plain or TLS), with a write timeout for a whole frame."""
    stream = SocketStream(sock, timeout=timeout_s)
    stream.write_timeout = timeout_s + 2.0 * wire_time_s(MAX_FRAME, None)
    return Link(stream, timeout_s=timeout_s)


class SocketStream:
    """A connected socket with pyserial's read/write/timeout semantics.

    `read(n)` blocks until n bytes arrive or `timeout` seconds pass (None: forever, 0: return
    what is there), and returns what it has; it raises LinkClosed when the peer has closed.
    """

    def __init__(self, sock: socket.socket, timeout: float | None = None):
        self.sock = sock
        self.timeout = timeout
        self.write_timeout: float | None = None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames are request/reply

    def read(self, size: int = 1) -> bytes:
        data = bytearray()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while len(data) < size:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(size - len(data))
            except (socket.timeout, BlockingIOError, ssl.SSLWantReadError):
                break
            if not chunk:
                if data:
                    break  # hand over what arrived; the next read reports the close
                raise LinkClosed("peer closed the connection")
            data += chunk
            if deadline is not None and time.monotonic() >= deadline:
                break
        return bytes(data)

    def write(self, data: bytes) -> int:
        self.sock.settimeout(self.write_timeout)
        try:
            self.sock.sendall(data)
        except socket.timeout as e:
            raise LinkTimeout(f"socket write of {len(data)} bytes timed out") from e
        return len(data)

    def flush(self) -> None:
        """Nothing to do: sendall has handed every byte to the kernel."""

    def fileno(self) -> int:
        return self.sock.fileno()

    def pending(self) -> int:
        """Bytes already received and decrypted but not read yet (TLS); a plain socket has none
        outside the kernel, where `select` sees them."""
        pending = getattr(self.sock, "pending", None)
        return int(pending()) if pending is not None else 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("tcp", "socket") or not parts.hostname or parts.port is None:
        raise LinkError(f"listen URL {url!r} must look like tcp://HOST:PORT (e.g. {AGENT_URL})")
    return parts.hostname, parts.port


class Listener:
    """The agent's TCP endpoint. `accept_socket()` hands over the next connection's socket (the
    server wraps it in TLS and a `Link`), `accept()` the next one as a plain `Link`. Port 0 binds
    a free port; `address` tells which.
    """

    def __init__(self, host: str, port: int, timeout_s: float = 5.0, backlog: int = 16):
        self.timeout_s = timeout_s
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as e:
            self._sock.close()
            raise LinkError(f"cannot listen on {host}:{port}: {e}") from e
        self._sock.listen(backlog)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"tcp://{host}:{port}"

    def accept_socket(self, timeout_s: float | None = None) -> tuple[socket.socket, str]:
        """The next connection's socket and "host:port" (None: wait forever). Raises LinkTimeout."""
        self._sock.settimeout(timeout_s)
        try:
            conn, peer = self._sock.accept()
        except socket.timeout as e:
            raise LinkTimeout(f"no connection to {self.url} within {timeout_s} s") from e
        except OSError as e:
            raise LinkError(f"accept on {self.url} failed: {e}") from e
        log.info("connection from %s:%s", *peer[:2])
        return conn, f"{peer[0]}:{peer[1]}"

    def accept(self, timeout_s: float | None = None) -> Link:
        """Wait for the next connection (None: forever) as a plain `Link`. Raises LinkTimeout."""
        conn, _ = self.accept_socket(timeout_s)
        return link_for_socket(conn, self.timeout_s)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def listen(url: str = AGENT_URL, timeout_s: float = 5.0, backlog: int = 16) -> Listener:
    """Agent side: listen on `tcp://HOST:PORT` (default tcp://127.0.0.1:7447)."""
    host, port = _host_port(url)
    return Listener(host, port, timeout_s=timeout_s, backlog=backlog)
