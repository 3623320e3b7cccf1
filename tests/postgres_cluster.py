"""A throwaway PostgreSQL server for the tests: Debian's `postgresql` package, a fresh cluster in a
temporary directory, on a free loopback port, stopped and deleted afterwards.

The server refuses to run as root, so when the tests run as root the cluster belongs to the
`postgres` user (`runuser -u postgres -- initdb / pg_ctl`). Where there is no PostgreSQL, no
`psycopg` or no way to become `postgres`, `start_cluster` says why and the tests skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unavailable() -> str | None:
    """Why a cluster cannot be started here, or None."""
    try:
        import psycopg  # noqa: F401  (the driver the store's postgresql+psycopg URLs use)
    except ImportError:
        return "psycopg is not installed (pip install 'robonas[postgres]')"
    if _bin_dir() is None:
        return "no PostgreSQL server binaries (Debian package postgresql)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: cannot start PostgreSQL as its own user"
    return None


class Cluster:
    """One throwaway server: `start()`, `stop()` (and start again: the fault tests drop it for a
    while), `url`; `close()` stops it for good and deletes its files."""

    def __init__(self) -> None:
        bin_dir = _bin_dir()
        assert bin_dir is not None, unavailable()
        self._bin = bin_dir
        self._as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
        self.root = Path(tempfile.mkdtemp(prefix="robonas-pg-"))
        self._data = self.root / "data"
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
        self.port = _free_port()
        self.url = f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/postgres"
        self._run("initdb", "-D", str(self._data), "-U", user, "-A", "trust", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [*self._as_postgres, str(self._bin / tool), *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "log")
        self._run("pg_ctl", "-D", str(self._data), "-o", opts, "-l", log, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; `fast` ends every client's connection, as a restart does."""
        self._run("pg_ctl", "-D", str(self._data), "-m", mode, "-w", "stop")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    """A started cluster the caller may stop and start; deleted afterwards."""
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.close()


@contextlib.contextmanager
def start_cluster() -> Iterator[str]:
    """Yield the SQLAlchemy URL of a fresh database on a fresh server."""
    with cluster() as c:
        yield c.url
