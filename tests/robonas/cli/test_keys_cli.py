"""`robonas keys`: signing keys, the fleet CA, operator and agent certificates, and trust files,
driven end to end through the command line."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from device_agents.operators import Operators, load_operator_key
from device_agents.signing import key_id, load_private_key
from robonas.cli.app import app, main
from robonas.credentials import find_host_credentials
from robonas.errors import ConfigError


def _run(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result


def _ok(*args: str) -> str:
    result = _run(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_keys_commands_make_a_working_fleet_end_to_end(tmp_path: Path, umask0: None):
    keys = tmp_path / "host" / "keys"
    out = _ok("keys", "ca", "--out", str(keys))
    assert "fleet-ca.crt" in out and "robonas keys operator" in out
    out = _ok("keys", "operator", "alice", "--ca", str(keys))
    assert "alice.crt" in out and "robonas keys trust" in out
    robot = tmp_path / "robot"
    _ok("keys", "agent", "robot-a", "--ca", str(keys), "--out", str(robot),
        "--host", "10.0.0.5", "--host", "robot-a.lan")  # fmt: skip
    _ok("keys", "generate", "--out", str(keys))  # the signing key sits beside the credentials

    for key in ("fleet-ca.key", "alice.key", "robonas.key"):
        assert _mode(keys / key) == 0o600, key
    assert _mode(robot / "robot-a.key") == 0o600
    for folder in (tmp_path / "host", keys, robot):
        assert _mode(folder) == 0o700, folder

    san = x509.load_pem_x509_certificate((robot / "robot-a.crt").read_bytes()).extensions
    names = san.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["robot-a", "robot-a.lan"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]

    trust = robot / "operators.json"
    out = _ok("keys", "trust", str(trust), "--name", "alice", "--key", str(keys / "alice.crt"),
              "--roles", "deploy,run,rollback,bench")  # fmt: skip
    alice_id = key_id(load_operator_key(keys / "alice.crt"))
    assert alice_id in out and "deploy" in out
    ops = Operators.from_file(trust)
    alice = ops.by_key_id(alice_id)
    assert alice is not None and alice.name == "alice"
    assert all(alice.may(r) for r in ("deploy", "run", "rollback", "bench", "status"))

    # the host finds its identity in the keys folder (the signing key there is ignored)
    creds = find_host_credentials(keys)
    assert creds.name == "alice" and creds.key_id == alice_id
    assert key_id(load_private_key(creds.key).public_key()) == alice_id


def test_trust_status_only_replace_and_by_path(tmp_path: Path):
    keys = tmp_path / "keys"
    _ok("keys", "ca", "--out", str(keys))
    _ok("keys", "operator", "viewer", "--ca", str(keys))
    trust = keys / "operators.json"
    _ok("keys", "trust", str(trust), "--name", "viewer", "--key", str(keys / "viewer.crt"))
    viewer = next(iter(Operators.from_file(trust)))
    assert viewer.roles == frozenset({"status"})
    refused = _run("keys", "trust", str(trust), "--name", "viewer", "--key", str(keys / "viewer.crt"),
                   "--roles", "run")  # fmt: skip
    assert refused.exit_code != 0 and isinstance(refused.exception, ConfigError)
    assert "--replace" in str(refused.exception)
    _ok("keys", "trust", str(trust), "--name", "viewer", "--key", str(keys / "viewer.crt"),
        "--roles", "run", "--replace", "--by-path")  # fmt: skip
    assert json.loads(trust.read_text())["operators"] == [
        {"name": "viewer", "key": "viewer.crt", "roles": ["run"]}
    ]
    assert next(iter(Operators.from_file(trust))).may("run")


def _one_line_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Through the real entry point: exit 2 and one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as info:
        main(list(args))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("robonas: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_mistakes_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    keys = tmp_path / "keys"
    err = _one_line_error(capsys, "keys", "operator", "alice", "--ca", str(keys))
    assert "robonas keys ca --out" in err
    main_ok = _run("keys", "ca", "--out", str(keys))
    assert main_ok.exit_code == 0
    assert "--overwrite" in _one_line_error(capsys, "keys", "ca", "--out", str(keys))
    _ok("keys", "operator", "alice", "--ca", str(keys))
    err = _one_line_error(capsys, "keys", "trust", str(tmp_path / "ops.json"), "--name", "alice",
                          "--key", str(keys / "alice.crt"), "--roles", "deploy,admin")  # fmt: skip
    assert "admin" in err and "rollback" in err
    assert not (tmp_path / "ops.json").exists()
    err = _one_line_error(capsys, "keys", "agent", "robot-a", "--ca", str(keys), "--host", "*.lan")
    assert "*.lan" in err
    (tmp_path / "ops.json").write_bytes(b"\xff")
    err = _one_line_error(capsys, "keys", "trust", str(tmp_path / "ops.json"), "--name", "alice",
                          "--key", str(keys / "alice.crt"))  # fmt: skip
    assert "not UTF-8" in err
    err = _one_line_error(capsys, "keys", "trust", str(tmp_path / "new.json"), "--name", "alice",
                          "--key", str(tmp_path / "missing.crt"))  # fmt: skip
    assert "missing.crt" in err
    err = _one_line_error(capsys, "keys", "generate", "--out", str(keys), "--name", "alice")
    assert "alice.key exists" in err


def test_every_keys_command_has_help():
    for command in ("generate", "ca", "operator", "agent", "trust"):
        out = _ok("keys", command, "--help")
        assert "--help" in out and "Usage" in out
    assert "--roles" in _ok("keys", "trust", "--help")
    assert "--host" in _ok("keys", "agent", "--help")
