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


@contextlib.contextmanager
def start_cluster() -> Iterator[str]:
    """Yield the SQLAlchemy URL of a fresh database on a fresh server."""
    bin_dir = _bin_dir()
    assert bin_dir is not None, unavailable()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
    root = Path(tempfile.mkdtemp(prefix="robonas-pg-"))
    data = root / "data"
    if as_postgres:
        shutil.chown(root, "postgres")
    port = _free_port()

    def run(*args: str) -> None:
        subprocess.run([*as_postgres, *args], check=True, capture_output=True, timeout=120)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", user, "-A", "trust", "--no-sync")
        opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start")
        try:
            yield f"postgresql+psycopg://{user}@127.0.0.1:{port}/postgres"
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
