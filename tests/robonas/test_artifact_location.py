"""Where trial files go: beside a SQLite store, else a directory every worker can read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from robonas.artifact_location import ENV_VAR, artifact_root
from robonas.errors import ConfigError

PG = "postgresql+psycopg://user:secret@db.example:5432/robonas"


def test_a_sqlite_store_keeps_its_files_beside_it(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert artifact_root(f"sqlite:///{tmp_path / 'a' / 'r.db'}") == tmp_path / "a"


def test_a_shared_store_needs_a_directory_and_says_how_without_the_password(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ConfigError) as e:
        artifact_root(PG)
    assert "--artifacts" in str(e.value) and ENV_VAR in str(e.value) and "secret" not in str(e.value)
    assert "\n" not in str(e.value)


def test_the_flag_beats_the_environment_beats_the_config_beats_the_study(tmp_path, monkeypatch):
    flag, env, conf, rec = (str(tmp_path / n) for n in ("flag", "env", "conf", "rec"))
    monkeypatch.setenv(ENV_VAR, env)
    assert artifact_root(PG, flag, conf, rec) == Path(flag)
    assert artifact_root(PG, None, conf, rec) == Path(env)
    monkeypatch.delenv(ENV_VAR)
    assert artifact_root(PG, None, conf, rec) == Path(conf)
    assert artifact_root(PG, None, None, rec) == Path(rec)
    with pytest.raises(ConfigError, match="is a URL"):
        artifact_root(PG, "s3://bucket/robonas")


def test_search_on_a_shared_store_without_a_directory_is_one_line_and_writes_nothing(
    tmp_path, postgres_server
):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "robonas.cli", "search", "launch/cartpole.toml", "--store", postgres_server]
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "--artifacts DIR" in r.stderr, r.stderr
    from robonas.store import Store

    with Store(postgres_server) as store:
        assert "cartpole" not in {s.name for s in store.list_studies()}
