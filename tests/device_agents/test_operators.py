"""The agent's trusted operators: the operators file, role checks, and the serial-link challenge."""

from __future__ import annotations

import base64
import datetime
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from device_agents.errors import DeviceError
from device_agents.operators import (
    AUTH_CONTEXT,
    BAD_CHALLENGE,
    BAD_SIGNATURE,
    NO_OPERATORS,
    ROLES,
    UNKNOWN_OPERATOR,
    AuthError,
    Operator,
    Operators,
    TrustConfigError,
    challenge_bytes,
    load_operator_key,
    new_challenge,
    sign_challenge,
    verify_challenge,
)
from device_agents.signing import canonical_json, key_id

AGENT = "cartpole-1"


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _cert_pem(private_key, cn: str = "alice") -> bytes:
    """A self-signed certificate for `private_key` (Ed25519 or EC), as PEM."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    algorithm = None
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        from cryptography.hazmat.primitives import hashes

        algorithm = hashes.SHA256()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(private_key, algorithm)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _pub_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def keys() -> dict[str, Ed25519PrivateKey]:
    return {n: Ed25519PrivateKey.generate() for n in ("alice", "bob", "carol", "dave", "mallory")}


@pytest.fixture
def trust_dir(tmp_path: Path, keys: dict[str, Ed25519PrivateKey]) -> Path:
    """An operators file using each kind of key reference: cert, PEM public key, raw file, base64."""
    d = tmp_path / "agent"
    d.mkdir()
    (d / "certs").mkdir()
    (d / "certs" / "alice.crt").write_bytes(_cert_pem(keys["alice"]))
    (d / "bob.pub").write_bytes(_pub_pem(keys["bob"].public_key()))
    (d / "carol.raw").write_bytes(_raw(keys["carol"].public_key()))
    dave_b64 = base64.b64encode(_raw(keys["dave"].public_key())).decode()
    doc = {
        "operators": [
            {"name": "alice", "key": "certs/alice.crt", "roles": ["deploy", "run", "rollback", "bench"]},
            {"name": "bob", "key": "bob.pub", "roles": ["run"]},
            {"name": "carol", "key": "carol.raw", "roles": []},
            {"name": "dave", "key": dave_b64},
        ]
    }
    (d / "operators.json").write_text(json.dumps(doc))
    return d


def test_operators_file_reads_every_key_form_relative_to_its_folder(
    trust_dir: Path, keys: dict[str, Ed25519PrivateKey], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.chdir(tmp_path)  # not the file's folder: key paths must resolve against the file
    ops = Operators.from_file(trust_dir / "operators.json")
    assert len(ops) == 4
    assert [op.name for op in ops] == ["alice", "bob", "carol", "dave"]
    for name in ("alice", "bob", "carol", "dave"):
        op = ops.lookup(keys[name].public_key())
        assert op is not None and op.name == name
        assert op.key_id == key_id(keys[name].public_key())
        assert ops.by_key_id(op.key_id) is op
    assert ops.lookup(keys["mallory"].public_key()) is None
    assert ops.by_key_id(key_id(keys["mallory"].public_key())) is None
    assert ops.lookup(None) is None


def test_roles_status_is_implicit_and_others_are_granted(trust_dir: Path, keys):
    ops = Operators.from_file(trust_dir / "operators.json")
    alice, bob, carol, dave = (ops.lookup(keys[n].public_key()) for n in ("alice", "bob", "carol", "dave"))
    assert alice and bob and carol and dave
    assert all(alice.may(r) for r in ROLES)
    assert bob.may("run") and bob.may("status")
    assert not bob.may("deploy") and not bob.may("rollback") and not bob.may("bench")
    for status_only in (carol, dave):
        assert status_only.may("status")
        assert not any(status_only.may(r) for r in ROLES if r != "status")
    assert not alice.may("reboot")  # unknown roles are never granted
    assert bob.describe() == {"name": "bob", "key_id": bob.key_id, "roles": ["run", "status"]}
    assert alice.describe()["roles"] == sorted(ROLES)


def test_operator_checks_its_own_fields(keys):
    pub = keys["alice"].public_key()
    with pytest.raises(TrustConfigError, match="unknown role"):
        Operator("alice", key_id(pub), pub, frozenset({"root"}))
    with pytest.raises(TrustConfigError, match="key_id"):
        Operator("alice", "0" * 16, pub, frozenset())
    op = Operator("alice", key_id(pub), pub, frozenset({"run"}))
    assert op.roles == frozenset({"run", "status"})
    with pytest.raises(TrustConfigError, match="same key"):
        Operators([op, Operator("alias", key_id(pub), pub, frozenset())])
    other = keys["bob"].public_key()
    with pytest.raises(TrustConfigError, match="used twice"):
        Operators([op, Operator("alice", key_id(other), other, frozenset())])


def _write(tmp_path: Path, doc: object) -> Path:
    p = tmp_path / "ops.json"
    p.write_text(json.dumps(doc))
    return p


def _one_line_error(path: Path, *fragments: str) -> str:
    with pytest.raises(TrustConfigError) as info:
        Operators.from_file(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(info.value, DeviceError)
    return message


def test_operators_file_errors_name_the_file_and_entry(tmp_path: Path, keys):
    alice_b64 = base64.b64encode(_raw(keys["alice"].public_key())).decode()
    bob_b64 = base64.b64encode(_raw(keys["bob"].public_key())).decode()

    p = tmp_path / "ops.json"
    p.write_text("{not json")
    _one_line_error(p, "not valid JSON")
    p.write_bytes(b'{"operators": []}\xff\xfe')
    _one_line_error(p, "not UTF-8")
    d = tmp_path / "dir.json"
    d.mkdir()
    _one_line_error(d, "directory")
    _one_line_error(tmp_path / "missing.json", "cannot read")

    _one_line_error(_write(tmp_path, []), '{"operators"')
    _one_line_error(_write(tmp_path, {"operators": [], "admins": []}), "admins")
    _one_line_error(_write(tmp_path, {"operators": ["alice"]}), "operators[0]")
    _one_line_error(
        _write(tmp_path, {"operators": [{"name": "alice", "key": alice_b64, "roles": ["deploy", "root"]}]}),
        "operator 'alice'",
        "unknown role",
        "root",
    )
    _one_line_error(
        _write(tmp_path, {"operators": [{"name": "alice", "key": alice_b64, "roles": "deploy"}]}),
        "operator 'alice'",
        "list",
    )
    _one_line_error(
        _write(
            tmp_path,
            {"operators": [{"name": "alice", "key": alice_b64}, {"name": "alice", "key": bob_b64}]},
        ),
        "'alice'",
        "used twice",
    )
    _one_line_error(
        _write(
            tmp_path, {"operators": [{"name": "alice", "key": alice_b64}, {"name": "bob", "key": alice_b64}]}
        ),
        "same key",
    )
    _one_line_error(_write(tmp_path, {"operators": [{"name": "alice"}]}), "operator 'alice'", "key")
    _one_line_error(_write(tmp_path, {"operators": [{"key": alice_b64}]}), "operators[0]", "name")
    _one_line_error(
        _write(tmp_path, {"operators": [{"name": "alice", "key": alice_b64, "role": ["deploy"]}]}),
        "unknown field",
        "role",
    )
    _one_line_error(
        _write(tmp_path, {"operators": [{"name": "al ice", "key": alice_b64}]}),
        "'name'",
    )
    _one_line_error(
        _write(tmp_path, {"operators": [{"name": "alice", "key": "nowhere.crt"}]}),
        "operator 'alice'",
        "nowhere.crt",
    )
    (tmp_path / "junk.pem").write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    _one_line_error(
        _write(tmp_path, {"operators": [{"name": "alice", "key": "junk.pem"}]}),
        "operator 'alice'",
        "junk.pem",
    )
    (tmp_path / "ec.crt").write_bytes(_cert_pem(ec.generate_private_key(ec.SECP256R1())))
    _one_line_error(
        _write(tmp_path, {"operators": [{"name": "alice", "key": "ec.crt"}]}), "ec.crt holds a", "Ed25519"
    )


def test_an_empty_operators_file_loads_and_trusts_nobody(tmp_path: Path, keys):
    ops = Operators.from_file(_write(tmp_path, {"operators": []}))
    assert len(ops) == 0 and list(ops) == []
    assert ops.lookup(keys["alice"].public_key()) is None


def test_load_operator_key_accepts_each_form(tmp_path: Path, keys):
    key = keys["alice"]
    pub = key.public_key()
    raw = _raw(pub)
    (tmp_path / "a.crt").write_bytes(_cert_pem(key))
    (tmp_path / "a.pub").write_bytes(_pub_pem(pub))
    der = x509.load_pem_x509_certificate(_cert_pem(key)).public_bytes(serialization.Encoding.DER)
    (tmp_path / "a.der").write_bytes(der)
    sources = [
        pub,
        tmp_path / "a.crt",
        str(tmp_path / "a.pub"),
        tmp_path / "a.der",
        raw,
        base64.b64encode(raw),
        base64.b64encode(raw).decode(),
        _cert_pem(key),
    ]
    for source in sources:
        assert _raw(load_operator_key(source)) == raw, source
    # base64 text that happens to start with "0" (0x30, an ASN.1 SEQUENCE byte) is still base64
    zero = next(
        k
        for k in iter(Ed25519PrivateKey.generate, None)
        if base64.b64encode(_raw(k.public_key()))[:1] == b"0"
    )
    zero_raw = _raw(zero.public_key())
    (tmp_path / "zero.b64").write_bytes(base64.b64encode(zero_raw) + b"\n")
    assert _raw(load_operator_key(tmp_path / "zero.b64")) == zero_raw
    with pytest.raises(TrustConfigError, match="directory"):
        load_operator_key(tmp_path)
    with pytest.raises(TrustConfigError, match="cannot read"):
        load_operator_key(tmp_path / "absent.crt")
    with pytest.raises(TrustConfigError, match="not an Ed25519"):
        load_operator_key(b"x" * 31)


# --- the challenge ------------------------------------------------------------------------------


@pytest.fixture
def ops(keys) -> Operators:
    def op(name: str, roles: set[str]) -> Operator:
        pub = keys[name].public_key()
        return Operator(name, key_id(pub), pub, frozenset(roles))

    return Operators([op("alice", {"deploy", "run"}), op("bob", set())])


def test_challenges_are_fresh_32_byte_values():
    seen = {new_challenge() for _ in range(200)}
    assert len(seen) == 200
    assert all(len(base64.b64decode(c, validate=True)) == 32 for c in seen)


def test_challenge_bytes_bind_context_agent_and_challenge():
    c = new_challenge()
    signed = challenge_bytes(AGENT, c)
    assert json.loads(signed) == {"context": AUTH_CONTEXT, "agent": AGENT, "challenge": c}
    assert signed == canonical_json({"agent": AGENT, "challenge": c, "context": AUTH_CONTEXT})
    assert signed != challenge_bytes("other-robot", c) and signed != challenge_bytes(AGENT, new_challenge())
    for bad in ((AGENT, ""), (AGENT, None), (None, c)):
        with pytest.raises(AuthError) as info:
            challenge_bytes(*bad)  # type: ignore[arg-type]
        assert info.value.reason == BAD_CHALLENGE


def test_challenge_round_trip_with_key_object_and_key_file(ops: Operators, keys, tmp_path: Path):
    c = new_challenge()
    answer = sign_challenge(keys["alice"], AGENT, c)
    assert set(answer) == {"key_id", "signature"}
    assert answer["key_id"] == key_id(keys["alice"].public_key())
    op = verify_challenge(ops, AGENT, c, answer["key_id"], answer["signature"])
    assert op.name == "alice" and op.may("deploy")

    # the host signs with the PKCS#8 PEM file robonas writes
    pem = keys["bob"].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "bob.key").write_bytes(pem)
    answer = sign_challenge(tmp_path / "bob.key", AGENT, c)
    op = verify_challenge(ops, AGENT, c, **answer)
    assert op.name == "bob" and not op.may("deploy") and op.may("status")


def _reason(ops: Operators, challenge: str, key_id_: object, signature: object, agent: str = AGENT) -> str:
    with pytest.raises(AuthError) as info:
        verify_challenge(ops, agent, challenge, key_id_, signature)
    assert isinstance(info.value, DeviceError)
    return info.value.reason


def test_replayed_or_forged_answers_are_refused(ops: Operators, keys):
    c1 = new_challenge()
    answer = sign_challenge(keys["alice"], AGENT, c1)
    # replay against a new challenge, or against another agent with the same challenge
    assert _reason(ops, new_challenge(), answer["key_id"], answer["signature"]) == BAD_SIGNATURE
    assert _reason(ops, c1, answer["key_id"], answer["signature"], agent="other-robot") == BAD_SIGNATURE
    # alice's signature presented under bob's key id
    bob_id = key_id(keys["bob"].public_key())
    assert _reason(ops, c1, bob_id, answer["signature"]) == BAD_SIGNATURE
    # a signature over the bare challenge (no context): a different protocol's signature
    bare = base64.b64encode(keys["alice"].sign(c1.encode())).decode()
    assert _reason(ops, c1, answer["key_id"], bare) == BAD_SIGNATURE


def test_unknown_key_and_malformed_answers_are_refused(ops: Operators, keys):
    c = new_challenge()
    mallory = sign_challenge(keys["mallory"], AGENT, c)
    assert _reason(ops, c, mallory["key_id"], mallory["signature"]) == UNKNOWN_OPERATOR
    good = sign_challenge(keys["alice"], AGENT, c)
    for bad_id in (None, 7, ["x"], "", "z" * 10_000):
        assert _reason(ops, c, bad_id, good["signature"]) == UNKNOWN_OPERATOR
    sig = base64.b64decode(good["signature"])
    for bad_sig in (
        None,
        7,
        "",
        "not base64!",
        base64.b64encode(sig[:-1]).decode(),
        good["signature"] + "AA",
    ):
        assert _reason(ops, c, good["key_id"], bad_sig) == BAD_SIGNATURE
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    assert _reason(ops, c, good["key_id"], base64.b64encode(flipped).decode()) == BAD_SIGNATURE


def test_no_operators_refuses_everyone(keys):
    c = new_challenge()
    answer = sign_challenge(keys["alice"], AGENT, c)
    assert _reason(Operators([]), c, answer["key_id"], answer["signature"]) == NO_OPERATORS


def test_auth_error_message_carries_reason_and_detail():
    e = AuthError(BAD_SIGNATURE, "for operator 'alice'")
    assert e.reason == BAD_SIGNATURE and str(e) == "bad signature: for operator 'alice'"
    assert str(AuthError(NO_OPERATORS)) == NO_OPERATORS
