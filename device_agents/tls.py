"""TLS for the agent's TCP link: mutual authentication with certificates from one fleet CA.

The agent presents a server certificate and demands a client certificate signed by the fleet CA
(`server_context`); the host checks the agent's certificate against the same CA and the agent's
name or address (`client_context`). After the handshake the agent reads the operator's public key
from the peer certificate (`peer_public_key`) and asks device_agents.operators who that is: the
CA says the certificate is genuine, the operators file says what its key may do. A certificate
from the CA whose key is not in the operators file is therefore authenticated but has no role.

Certificates are Ed25519 (one key per operator, the same one that signs serial challenges).
TLS 1.3 is the minimum: it is what OpenSSL supports Ed25519 signatures in cleanly, it encrypts
the certificates, and Python 3.7+ on OpenSSL 1.1.1+ always has it (a Raspberry Pi OS image does).
Session tickets are off, so every connection presents its certificate afresh and no resumption
secret outlives the process.

Callers must put a timeout on the raw socket before the handshake (`wrap_server` does) so that
a peer that connects and says nothing cannot hold an accept slot.

Leans on the standard library `ssl` module for TLS and on `cryptography` only to read the
peer's certificate.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from device_agents.errors import DeviceError

PathLike = Union[str, "os.PathLike[str]"]
HANDSHAKE_TIMEOUT_S = 10.0


class TLSConfigError(DeviceError):
    """A certificate, key or CA file cannot be used; the message names the file."""


def _readable(path: PathLike, what: str) -> str:
    """The path as a string, or TLSConfigError naming it (ssl's own errors do not name files)."""
    p = Path(path)
    if p.is_dir():
        raise TLSConfigError(f"{what} {p} is a directory, expected a PEM file")
    try:
        with p.open("rb") as f:
            f.read(1)
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} {p}: {e.strerror or e}") from e
    return str(p)


def _base_context(protocol: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    if not getattr(ssl, "HAS_TLSv1_3", False):  # pragma: no cover - OpenSSL < 1.1.1
        raise TLSConfigError(f"{ssl.OPENSSL_VERSION} has no TLS 1.3; the agent needs OpenSSL 1.1.1 or newer")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # RFC 5280 rules for every certificate in the chain (robonas keys makes conforming ones).
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: PathLike, key: PathLike) -> None:
    cert_s, key_s = _readable(cert, "certificate"), _readable(key, "private key")
    try:
        ctx.load_cert_chain(cert_s, key_s)
    except ssl.SSLError as e:
        raise TLSConfigError(
            f"certificate {cert_s} and key {key_s} cannot be used together "
            f"(not PEM, encrypted, or not a pair): {e.reason or e}"
        ) from e


def _load_ca(ctx: ssl.SSLContext, ca: PathLike) -> None:
    ca_s = _readable(ca, "CA certificate")
    try:
        ctx.load_verify_locations(cafile=ca_s)
    except ssl.SSLError as e:
        raise TLSConfigError(f"CA certificate {ca_s} is not a PEM certificate: {e.reason or e}") from e


def server_context(cert: PathLike, key: PathLike, ca: PathLike) -> ssl.SSLContext:
    """The agent's TLS context: its own cert and key, and client certificates required from `ca`."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(ctx, cert, key)
    _load_ca(ctx, ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0  # no resumption: every session shows its certificate
    return ctx


def client_context(cert: PathLike | None, key: PathLike | None, ca: PathLike) -> ssl.SSLContext:
    """The host's TLS context: trusts only `ca`, checks the agent's name, presents the operator cert.

    `cert`/`key` may both be None for a client with no certificate (which the agent refuses;
    useful to show that it does).
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    if (cert is None) != (key is None):
        raise TLSConfigError("a client certificate needs its private key, and the other way round")
    if cert is not None and key is not None:
        _load_chain(ctx, cert, key)
    _load_ca(ctx, ca)
    return ctx


def wrap_server(
    ctx: ssl.SSLContext, sock: socket.socket, timeout: float = HANDSHAKE_TIMEOUT_S
) -> ssl.SSLSocket:
    """Handshake on an accepted socket within `timeout` seconds; ssl.SSLError/OSError on failure.

    The timeout stays set on the returned socket; the caller sets its own read timeout after.
    On failure the raw socket is closed.
    """
    sock.settimeout(timeout)
    try:
        return ctx.wrap_socket(sock, server_side=True)
    except BaseException:
        sock.close()
        raise


def _peer_certificate(sock: ssl.SSLSocket) -> x509.Certificate | None:
    der = sock.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:  # OpenSSL accepted it, so this should not happen; treat as no identity
        return None


def peer_public_key(sock: ssl.SSLSocket) -> Ed25519PublicKey | None:
    """The Ed25519 key in the peer's (verified) certificate; None if none or not Ed25519."""
    cert = _peer_certificate(sock)
    if cert is None:
        return None
    key = cert.public_key()
    return key if isinstance(key, Ed25519PublicKey) else None


def peer_name(sock: ssl.SSLSocket) -> str | None:
    """The common name in the peer's certificate, for logs (authorisation goes by key, not name)."""
    cert = _peer_certificate(sock)
    if cert is None:
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")
