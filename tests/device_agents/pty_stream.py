"""A test tool: the master end of a pty with pyserial's read/write/timeout semantics, so the
host side of a serial link can be driven over `os.openpty()` in tests."""

from __future__ import annotations

import os
import select
import time


class FdStream:
    def __init__(self, fd: int, timeout: float | None = 5.0):
        self.fd = fd
        self.timeout = timeout

    def read(self, size: int = 1) -> bytes:
        data = bytearray()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while len(data) < size:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.fd], [], [], left)[0]:
                break
            data += os.read(self.fd, size - len(data))
        return bytes(data)

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        return len(data)

    def close(self) -> None:
        os.close(self.fd)
