"""Fixtures shared by the host package's tests: store URLs on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sub' / 'robonas.db'}"


_DATABASES = iter(range(1, 1_000_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """The store's tests run on both: the embedded SQLite file and a real PostgreSQL server
    (a fresh database each, on the session's throwaway server)."""
    if request.param == "sqlite":
        return sqlite_url
    server = request.getfixturevalue("postgres_server")
    import psycopg

    name = f"robonas_test_{next(_DATABASES)}"
    conninfo = server.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server.rsplit("/", 1)[0] + f"/{name}"
