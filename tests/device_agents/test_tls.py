"""Mutual TLS on the agent's TCP link, over real loopback sockets with Ed25519 certificates.

The certificates come from robonas.credentials (what `robonas keys` writes), so these tests also
show that the host's files and the agent's TLS code agree.
"""

from __future__ import annotations

import datetime
import queue
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_agents.operators import Operator, Operators, load_operator_key
from device_agents.signing import key_id
from device_agents.tls import (
    TLSConfigError,
    client_context,
    peer_name,
    peer_public_key,
    server_context,
    wrap_server,
)
from robonas.credentials import make_agent, make_ca, make_operator

GREETING = b"hello"
WAIT_S = 10.0  # generous: only bounds how long a broken test hangs


def _raw(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Pki:
    fleet: Path  # fleet CA, agent robot-a, operator alice
    rogue: Path  # another CA, with its own operator mallory and its own "robot-a"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    fleet, rogue = root / "fleet", root / "rogue"
    for ca in (fleet, rogue):
        make_ca(ca)
        make_agent(ca, "robot-a", ca, hosts=("127.0.0.1",))
    make_operator(fleet, "alice", fleet)
    make_operator(rogue, "mallory", rogue)
    return Pki(fleet, rogue)


def _server_ctx(pki: Pki) -> ssl.SSLContext:
    f = pki.fleet
    return server_context(f / "robot-a.crt", f / "robot-a.key", f / "fleet-ca.crt")


def _client_ctx(folder: Path, operator: str | None, ca: Path) -> ssl.SSLContext:
    if operator is None:
        return client_context(None, None, ca)
    return client_context(folder / f"{operator}.crt", folder / f"{operator}.key", ca)


@dataclass
class Outcome:
    ok: bool
    peer_key: object = None
    peer_cn: str | None = None
    version: str | None = None
    error: BaseException | None = None


class Agent:
    """A one-connection TLS server on loopback, run in a thread, reporting what it saw."""

    def __init__(self, ctx: ssl.SSLContext, handshake_timeout: float = WAIT_S) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.outcomes: queue.Queue[Outcome] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, args=(ctx, handshake_timeout), daemon=True)
        self.thread.start()

    def _serve(self, ctx: ssl.SSLContext, handshake_timeout: float) -> None:
        conn, _ = self.listener.accept()
        try:
            tls = wrap_server(ctx, conn, timeout=handshake_timeout)
        except (ssl.SSLError, OSError) as e:
            self.outcomes.put(Outcome(False, error=e))
            return
        with tls:
            self.outcomes.put(Outcome(True, peer_public_key(tls), peer_name(tls), tls.version()))
            tls.sendall(GREETING)
            tls.recv(1)  # until the client closes

    def result(self) -> Outcome:
        outcome = self.outcomes.get(timeout=WAIT_S)
        self.thread.join(WAIT_S)
        self.listener.close()
        return outcome


def _connect(port: int, ctx: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> bytes | BaseException:
    """The greeting the agent sends after a good handshake, or what went wrong on the client."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    try:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            # TLS 1.3: the client finishes its side before the server has checked the client's
            # certificate, so a refusal shows up as an alert on the first read.
            data = b""
            while len(data) < len(GREETING):
                chunk = tls.recv(len(GREETING) - len(data))
                if not chunk:
                    break
                data += chunk
            return data
    except (ssl.SSLError, OSError) as e:
        return e
    finally:
        raw.close()


def test_mutual_tls_handshake_identifies_the_operator(pki: Pki):
    f = pki.fleet
    agent = Agent(_server_ctx(pki))
    ctx = _client_ctx(f, "alice", f / "fleet-ca.crt")
    raw = socket.create_connection(("127.0.0.1", agent.port), timeout=WAIT_S)
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.recv(len(GREETING)) == GREETING
        # the host sees the agent's own key and name
        assert _raw(peer_public_key(tls)) == _raw(load_operator_key(f / "robot-a.crt"))
        assert peer_name(tls) == "robot-a"
    seen = agent.result()
    assert seen.ok and seen.version == "TLSv1.3"
    alice = load_operator_key(f / "alice.crt")
    assert seen.peer_key is not None and _raw(seen.peer_key) == _raw(alice)
    assert seen.peer_cn == "alice"
    # what the agent does next: the key (not the name) decides who this is
    ops = Operators([Operator("alice", key_id(alice), alice, frozenset({"deploy"}))])
    op = ops.lookup(seen.peer_key)  # type: ignore[arg-type]
    assert op is not None and op.may("deploy")


def test_host_may_check_the_agent_by_name_while_dialling_its_address(pki: Pki):
    f = pki.fleet
    agent = Agent(_server_ctx(pki))
    assert _connect(agent.port, _client_ctx(f, "alice", f / "fleet-ca.crt"), "robot-a") == GREETING
    assert agent.result().ok


def test_client_without_a_certificate_is_refused_at_the_handshake(pki: Pki):
    f = pki.fleet
    agent = Agent(_server_ctx(pki))
    got = _connect(agent.port, _client_ctx(f, None, f / "fleet-ca.crt"))
    seen = agent.result()
    assert not seen.ok and isinstance(seen.error, ssl.SSLError)
    assert "certificate" in str(seen.error).lower()
    assert got != GREETING


def test_client_with_a_certificate_from_another_ca_is_refused(pki: Pki):
    agent = Agent(_server_ctx(pki))
    # mallory trusts the fleet CA (so she can reach the agent) but her own cert is rogue
    got = _connect(agent.port, _client_ctx(pki.rogue, "mallory", pki.fleet / "fleet-ca.crt"))
    seen = agent.result()
    assert not seen.ok and isinstance(seen.error, ssl.SSLError)
    assert got != GREETING


def test_host_refuses_an_agent_certificate_for_another_name(pki: Pki):
    f = pki.fleet
    agent = Agent(_server_ctx(pki))
    got = _connect(agent.port, _client_ctx(f, "alice", f / "fleet-ca.crt"), server_hostname="robot-b")
    assert isinstance(got, ssl.SSLCertVerificationError)
    assert "robot-b" in str(got)
    assert not agent.result().ok
    # nor "localhost": this agent's certificate names only robot-a and 127.0.0.1
    agent = Agent(_server_ctx(pki))
    assert isinstance(_connect(agent.port, _client_ctx(f, "alice", f / "fleet-ca.crt"), "localhost"),
                      ssl.SSLCertVerificationError)  # fmt: skip
    assert not agent.result().ok


def test_host_refuses_an_impostor_agent_with_the_right_name_from_another_ca(pki: Pki):
    r, f = pki.rogue, pki.fleet
    impostor = Agent(server_context(r / "robot-a.crt", r / "robot-a.key", f / "fleet-ca.crt"))
    got = _connect(impostor.port, _client_ctx(f, "alice", f / "fleet-ca.crt"), "robot-a")
    assert isinstance(got, ssl.SSLCertVerificationError)
    assert not impostor.result().ok


def test_tls_1_2_is_refused(pki: Pki):
    f = pki.fleet
    agent = Agent(_server_ctx(pki))
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.load_cert_chain(f / "alice.crt", f / "alice.key")
    old.load_verify_locations(f / "fleet-ca.crt")
    got = _connect(agent.port, old)
    assert isinstance(got, ssl.SSLError)
    assert not agent.result().ok


def test_a_silent_client_cannot_hold_the_handshake(pki: Pki):
    agent = Agent(_server_ctx(pki), handshake_timeout=0.3)
    with socket.create_connection(("127.0.0.1", agent.port), timeout=WAIT_S):
        seen = agent.result()  # returns because the handshake gave up, not because we hung up
    assert not seen.ok and isinstance(seen.error, (TimeoutError, socket.timeout))


def test_contexts_are_mutual_tls_1_3(pki: Pki):
    f = pki.fleet
    server = _server_ctx(pki)
    client = _client_ctx(f, "alice", f / "fleet-ca.crt")
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname
    assert server.num_tickets == 0


def test_unusable_files_raise_tls_config_error_naming_the_file(pki: Pki, tmp_path: Path):
    f = pki.fleet
    ca, cert, key = f / "fleet-ca.crt", f / "robot-a.crt", f / "robot-a.key"
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    cases = [
        (lambda: server_context(tmp_path / "none.crt", key, ca), "none.crt"),
        (lambda: server_context(cert, tmp_path / "none.key", ca), "none.key"),
        (lambda: server_context(cert, key, tmp_path), str(tmp_path)),
        (lambda: server_context(cert, f / "alice.key", ca), "alice.key"),  # not the cert's key
        (lambda: server_context(tmp_path / "junk.pem", key, ca), "junk.pem"),
        (lambda: server_context(cert, key, tmp_path / "junk.pem"), "junk.pem"),
        (lambda: client_context(f / "alice.crt", None, ca), "private key"),
        (lambda: client_context(f / "alice.crt", f / "alice.key", tmp_path / "none.crt"), "none.crt"),
    ]
    for call, fragment in cases:
        with pytest.raises(TLSConfigError) as info:
            call()
        assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


class _FakePeer:
    def __init__(self, der: bytes | None) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        assert binary_form
        return self.der


def test_peer_key_is_none_without_a_certificate_or_for_a_non_ed25519_one():
    assert peer_public_key(_FakePeer(None)) is None  # type: ignore[arg-type]
    assert peer_name(_FakePeer(None)) is None  # type: ignore[arg-type]
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p256")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    peer = _FakePeer(cert.public_bytes(serialization.Encoding.DER))
    assert peer_public_key(peer) is None  # type: ignore[arg-type]
    assert peer_name(peer) == "p256"  # type: ignore[arg-type]
