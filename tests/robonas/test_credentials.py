"""Host credentials: the fleet CA, operator and agent certificates, the host's identity, trust files."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agents.operators import Operators, load_operator_key
from device_agents.signing import key_id, load_private_key
from robonas.credentials import (
    HostCredentials,
    add_operator,
    find_host_credentials,
    make_agent,
    make_ca,
    make_operator,
)
from robonas.errors import ConfigError


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _cert(p: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(p.read_bytes())


def _raw(key: object) -> bytes:
    assert isinstance(key, Ed25519PublicKey)
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@pytest.fixture
def umask0() -> Iterator[None]:
    """The most permissive umask: whatever the files get, they get it on purpose."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    make_ca(tmp_path / "keys")
    return tmp_path / "keys"


def test_key_files_are_0600_and_created_folders_0700_whatever_the_umask(tmp_path: Path, umask0: None):
    out = tmp_path / "a" / "b" / "keys"
    ca_cert, ca_key = make_ca(out)
    assert (ca_cert, ca_key) == (out / "fleet-ca.crt", out / "fleet-ca.key")
    op_cert, op_key = make_operator(tmp_path / "ops" / "alice", "alice", out)
    ag_cert, ag_key = make_agent(tmp_path / "agents", "robot-a", out)
    for key in (ca_key, op_key, ag_key):
        assert _mode(key) == 0o600, key
    for cert in (ca_cert, op_cert, ag_cert):
        assert _mode(cert) == 0o644, cert
    for folder in (tmp_path / "a", tmp_path / "a" / "b", out, tmp_path / "ops", tmp_path / "ops" / "alice"):
        assert _mode(folder) == 0o700, folder
    assert _mode(tmp_path / "agents") == 0o700
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files behind


def test_existing_folders_keep_their_mode(tmp_path: Path, umask0: None):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    make_ca(shared)
    assert _mode(shared) == 0o755  # not ours to change; only the keys inside are private
    assert _mode(shared / "fleet-ca.key") == 0o600


def test_ca_certificate_is_a_path_length_zero_ca(ca_dir: Path):
    cert = _cert(ca_dir / "fleet-ca.crt")
    assert cert.subject == cert.issuer
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    key = load_private_key(ca_dir / "fleet-ca.key")
    assert _raw(key.public_key()) == _raw(cert.public_key())
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 3650 <= days <= 3651


def test_operator_certificate_carries_the_operator_key_for_client_auth(ca_dir: Path, tmp_path: Path):
    cert_path, key_path = make_operator(tmp_path / "host", "alice", ca_dir)
    assert (cert_path.name, key_path.name) == ("alice.crt", "alice.key")
    cert = _cert(cert_path)
    ca = _cert(ca_dir / "fleet-ca.crt")
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # the signing module reads the key, and the agent's trust loader reads the certificate
    private = load_private_key(key_path)
    assert _raw(private.public_key()) == _raw(load_operator_key(cert_path))
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc


def test_agent_certificate_names_the_agent_and_its_hosts(ca_dir: Path):
    cert_path, _ = make_agent(ca_dir, "robot-a", ca_dir, hosts=("10.0.0.5", "robot-a.lan", "::1", "10.0.0.5"))
    cert = _cert(cert_path)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["robot-a", "robot-a.lan"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    default_san = _cert(make_agent(ca_dir, "robot-b", ca_dir)[0]).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert default_san.value.get_values_for_type(x509.DNSName) == ["robot-b", "localhost"]
    assert default_san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_refuses_to_overwrite_unless_asked(ca_dir: Path):
    with pytest.raises(ConfigError, match=r"already holds fleet-ca\.crt, fleet-ca\.key"):
        make_ca(ca_dir)
    make_operator(ca_dir, "alice", ca_dir)
    first = (ca_dir / "alice.key").read_bytes()
    with pytest.raises(ConfigError, match="--overwrite"):
        make_operator(ca_dir, "alice", ca_dir)
    assert (ca_dir / "alice.key").read_bytes() == first
    make_operator(ca_dir, "alice", ca_dir, overwrite=True)
    assert (ca_dir / "alice.key").read_bytes() != first
    with pytest.raises(ConfigError, match="CA's name"):
        make_operator(ca_dir, "fleet-ca", ca_dir, overwrite=True)


def test_bad_inputs_are_one_line_config_errors(tmp_path: Path, ca_dir: Path):
    cases = [
        (lambda: make_operator(tmp_path, "alice", tmp_path / "nope"), "robonas keys ca --out"),
        (lambda: make_operator(tmp_path, "../evil", ca_dir), "operator name"),
        (lambda: make_operator(tmp_path, "alice", ca_dir, days=0), "days"),
        (lambda: make_agent(tmp_path, "robot a", ca_dir), "agent name"),
        (lambda: make_agent(tmp_path, "robot-a", ca_dir, hosts=("*.lan",)), "neither an IP"),
        (lambda: make_agent(tmp_path, "robot-a", ca_dir, hosts=("",)), "host"),
    ]
    for call, fragment in cases:
        with pytest.raises(ConfigError) as info:
            call()
        assert fragment in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        make_ca(tmp_path / "file")
    other = make_ca(tmp_path / "other")[1]
    (ca_dir / "fleet-ca.key").write_bytes(other.read_bytes())  # the wrong key beside the CA cert
    with pytest.raises(ConfigError, match="does not belong"):
        make_operator(tmp_path, "alice", ca_dir)


# --- the host's identity ------------------------------------------------------------------------


def test_find_host_credentials_picks_the_only_operator(ca_dir: Path):
    make_operator(ca_dir, "alice", ca_dir)
    make_agent(ca_dir, "robot-a", ca_dir)  # a server certificate in the same folder is not a candidate
    (ca_dir / "robonas.key").write_text("signing key lives here too")
    creds = find_host_credentials(ca_dir)
    assert creds == HostCredentials(
        ca=ca_dir / "fleet-ca.crt", cert=ca_dir / "alice.crt", key=ca_dir / "alice.key"
    )
    assert creds.name == "alice"
    assert creds.key_id == key_id(load_operator_key(ca_dir / "alice.crt"))
    assert _raw(creds.private_key().public_key()) == _raw(load_operator_key(creds.cert))
    ctx = creds.client_context()
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3


def test_find_host_credentials_names_one_of_several(ca_dir: Path):
    make_operator(ca_dir, "alice", ca_dir)
    make_operator(ca_dir, "bob", ca_dir)
    with pytest.raises(ConfigError, match=r"several operators \(alice, bob\)"):
        find_host_credentials(ca_dir)
    assert find_host_credentials(ca_dir, "bob").cert == ca_dir / "bob.crt"
    make_agent(ca_dir, "robot-a", ca_dir)
    with pytest.raises(ConfigError, match="not an operator certificate"):
        find_host_credentials(ca_dir, "robot-a")


def _message(call) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_find_host_credentials_says_what_is_missing_and_how_to_make_it(tmp_path: Path, ca_dir: Path):
    m = _message(lambda: find_host_credentials(tmp_path / "absent"))
    assert "does not exist" in m and "robonas keys ca --out" in m
    empty = tmp_path / "empty"
    empty.mkdir()
    m = _message(lambda: find_host_credentials(empty))
    assert "fleet-ca.crt" in m and "robonas keys ca" in m
    m = _message(lambda: find_host_credentials(ca_dir))
    assert "no operator certificate" in m and "robonas keys operator NAME" in m
    m = _message(lambda: find_host_credentials(ca_dir, "carol"))
    assert "carol.crt, carol.key" in m and "robonas keys operator carol" in m
    make_operator(ca_dir, "alice", ca_dir)
    (ca_dir / "alice.key").unlink()
    m = _message(lambda: find_host_credentials(ca_dir))
    assert "alice.crt without its .key" in m
    m = _message(lambda: find_host_credentials(ca_dir, "alice"))
    assert "lacks alice.key" in m


def test_find_host_credentials_refuses_foreign_or_mismatched_pairs(tmp_path: Path, ca_dir: Path):
    other = tmp_path / "other-ca"
    make_ca(other)
    make_operator(ca_dir, "mallory", other)  # cert from another CA, in this host's folder
    assert "not issued by the CA" in _message(lambda: find_host_credentials(ca_dir))
    (ca_dir / "mallory.crt").unlink()
    (ca_dir / "mallory.key").unlink()
    make_operator(ca_dir, "alice", ca_dir)
    make_operator(tmp_path / "spare", "alice", ca_dir)
    (ca_dir / "alice.key").write_bytes((tmp_path / "spare" / "alice.key").read_bytes())
    assert "does not belong" in _message(lambda: find_host_credentials(ca_dir))


# --- the agent's operators file -----------------------------------------------------------------


def test_add_operator_creates_and_extends_the_trust_file(ca_dir: Path, tmp_path: Path, umask0: None):
    alice_crt, _ = make_operator(ca_dir, "alice", ca_dir)
    bob_crt, _ = make_operator(ca_dir, "bob", ca_dir)
    trust = tmp_path / "robot" / "etc" / "operators.json"
    assert add_operator(trust, "alice", alice_crt, "deploy, run,rollback,bench") == trust
    assert _mode(trust.parent) == 0o700 and _mode(trust) == 0o644
    add_operator(trust, "bob", bob_crt, [])
    doc = json.loads(trust.read_text())
    assert [e["name"] for e in doc["operators"]] == ["alice", "bob"]
    assert doc["operators"][0]["roles"] == ["run", "deploy", "rollback", "bench"]  # ROLES order
    ops = Operators.from_file(trust)
    alice = ops.lookup(load_operator_key(alice_crt))
    bob = ops.lookup(load_operator_key(bob_crt))
    assert alice is not None and alice.name == "alice" and alice.may("deploy")
    assert bob is not None and bob.may("status") and not bob.may("run")
    # inline keys: the file alone is enough on the robot, with the certificates gone
    alice_crt.unlink()
    assert len(Operators.from_file(trust)) == 2


def test_add_operator_refuses_duplicates_unless_replacing(ca_dir: Path, tmp_path: Path):
    alice_crt, _ = make_operator(ca_dir, "alice", ca_dir)
    bob_crt, _ = make_operator(ca_dir, "bob", ca_dir)
    trust = tmp_path / "operators.json"
    add_operator(trust, "alice", alice_crt, "run")
    before = trust.read_bytes()
    with pytest.raises(ConfigError, match="already trusts an operator named 'alice'"):
        add_operator(trust, "alice", bob_crt, "run")
    with pytest.raises(ConfigError, match="already trusts this key"):
        add_operator(trust, "alias", alice_crt, "deploy")
    with pytest.raises(ConfigError, match="unknown role"):
        add_operator(trust, "bob", bob_crt, "deploy,sudo")
    assert trust.read_bytes() == before  # nothing written by a refused call
    add_operator(trust, "alice", alice_crt, "run,deploy", replace=True)
    ops = Operators.from_file(trust)
    assert len(ops) == 1 and next(iter(ops)).may("deploy")
    add_operator(trust, "alice", bob_crt, "run", replace=True)  # a new key for alice
    assert Operators.from_file(trust).lookup(load_operator_key(bob_crt)) is not None
    assert Operators.from_file(trust).lookup(load_operator_key(alice_crt)) is None


def test_add_operator_by_path_and_bad_existing_files(ca_dir: Path, tmp_path: Path):
    alice_crt, _ = make_operator(ca_dir, "alice", ca_dir)
    trust = ca_dir / "operators.json"
    add_operator(trust, "alice", alice_crt, "run", inline=False)
    assert json.loads(trust.read_text())["operators"][0]["key"] == "alice.crt"
    assert len(Operators.from_file(trust)) == 1
    bob_crt, _ = make_operator(tmp_path / "bob", "bob", ca_dir)
    inline_only = base64.b64encode(_raw(load_operator_key(bob_crt))).decode()
    m = _message(lambda: add_operator(trust, "bob", inline_only, "run", inline=False))
    assert "needs a key file" in m
    broken = tmp_path / "broken.json"
    broken.write_bytes(b"\xff\xfe")
    m = _message(lambda: add_operator(broken, "alice", alice_crt, "run"))
    assert "not UTF-8" in m and "fix or remove" in m
    m = _message(lambda: add_operator(tmp_path, "alice", alice_crt, "run"))
    assert "directory" in m
    m = _message(lambda: add_operator(tmp_path / "x.json", "alice", tmp_path / "none.crt", "run"))
    assert "none.crt" in m
