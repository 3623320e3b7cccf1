"""Atomic file writes: temp file in the same directory, fsync, `os.replace`, fsync the directory.

After a crash or power loss at any instant the path holds either the old content or the new,
never a torn mix. One implementation for the agent's slots and keys and for the host's
artifacts, weights and reports (robonas imports it from here; device_agents imports nothing of
robonas). Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Union

PathLike = Union[str, "os.PathLike[str]"]


def fsync_dir(path: PathLike) -> None:
    """Make a rename inside `path` durable (POSIX: the directory entry is data too)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask_mode() -> int:
    """What open() would give a new file (mkstemp's own 0600 is for secrets, not artifacts)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_writer(path: PathLike, mode: int | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file; on a clean exit it replaces `path` atomically, else it vanishes.

    `mode` sets the permissions before any byte is written (e.g. 0o600 for a private key);
    by default a new file gets the usual permissions under the process umask.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=str(target.parent), prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _umask_mode() if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, str(target))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def atomic_write(path: PathLike, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one."""
    with atomic_writer(path, mode) as f:
        f.write(data)
