"""pybullet without its banners.

pybullet's C code prints "pybullet build time: ..." when the module loads and "argv[0]=" for
each physics client it opens, straight to the process's file descriptors. That noise lands in
every CLI's output (and breaks "one line on stderr" errors), so the import and the connection
run with fds 1 and 2 pointed at /dev/null for that instant.

The fds are process-wide, so the swap is serialised by a lock: two threads interleaving their
dup/dup2 pairs (rl-zoo3 runs Optuna trials as threads) would each restore the other's /dev/null
and leave the process writing to nowhere for good.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

_FD_LOCK = threading.RLock()


@contextlib.contextmanager
def silenced_fds() -> Iterator[None]:
    with _FD_LOCK:
        yield from _silenced()


def _silenced() -> Iterator[None]:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = (os.dup(1), os.dup(2))
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


with silenced_fds():
    import pybullet
    from pybullet_utils import bullet_client  # type: ignore[import-untyped]  # pybullet_utils has no types


def direct_client() -> bullet_client.BulletClient:
    """A new physics client of its own in DIRECT mode (no GUI, no shared server)."""
    with silenced_fds():
        return bullet_client.BulletClient(connection_mode=pybullet.DIRECT)


__all__ = ["bullet_client", "direct_client", "pybullet", "silenced_fds"]
