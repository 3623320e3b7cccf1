"""Who may command this robot: the agent's trusted operators, their roles, and serial-link auth.

One operator identity is one Ed25519 key pair. Over TCP the operator proves it holds the key
with a TLS client certificate that carries the same public key (device_agents.tls); over a
serial link, where TLS does not fit, it signs a fresh challenge from the agent (below). Either
way the agent ends up with a public key and asks `Operators.lookup` who that is and what they
may do.

The trust configuration is a JSON file the agent reads at start-up:

    {"operators": [
        {"name": "alice", "key": "alice.crt", "roles": ["deploy", "run", "rollback", "bench"]},
        {"name": "viewer", "key": "q0X4...base64 of the 32 raw key bytes...=", "roles": []}
    ]}

`key` is a path (relative to the file's folder) to a PEM public key, a PEM X.509 certificate
whose key is Ed25519, or a raw 32-byte key file; or it is the base64 of the 32 raw key bytes
inline. Every operator may read status; the other roles are granted per operator.

The challenge signed over serial is canonical JSON of a fixed context string, the agent's id
and the challenge, so a signature made for one agent, one challenge or another protocol (an
artifact manifest, say) is never accepted here. The agent must issue a fresh challenge per
session and accept at most one answer to it; `verify_challenge` only checks the signature.

Leans on `cryptography` for keys, certificates and signatures, and on device_agents.signing
for key ids and canonical JSON; everything else is the standard library.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_agents.errors import DeviceError
from device_agents.signing import SigningError, canonical_json, load_private_key
from device_agents.signing import key_id as key_id_of

ROLES = ("status", "run", "deploy", "rollback", "bench")
STATUS = "status"  # every operator holds it, whatever the file says
AUTH_CONTEXT = "robonas-operator-auth-v1"
CHALLENGE_BYTES = 32
SIGNATURE_BYTES = 64  # an Ed25519 signature is always 64 bytes

# AuthError reasons: short, stable codes an agent can put in a reply and a test can compare.
UNKNOWN_OPERATOR = "unknown operator"
BAD_SIGNATURE = "bad signature"
BAD_CHALLENGE = "bad challenge"
NO_OPERATORS = "no operators"

# Operator names end up in logs, certificate CNs and file names: keep them plain.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_ENTRY_FIELDS = ("name", "key", "roles")
_REQUIRED_FIELDS = ("name", "key")
_BASE64_KEY_RE = re.compile(r"^[A-Za-z0-9+/]{43}=$")  # exactly what 32 bytes encode to
_BASE64_TEXT_RE = re.compile(rb"^[A-Za-z0-9+/]+={0,2}$")

PathLike = Union[str, "os.PathLike[str]"]
OperatorKeySource = Union[Ed25519PublicKey, PathLike, bytes]


class TrustConfigError(DeviceError):
    """The operators file (or one operator key) cannot be used; the message names file and entry."""


class AuthError(DeviceError):
    """An operator could not be authenticated; `reason` is a short code (see the constants above)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Operator:
    """One trusted operator. `roles` always includes "status"."""

    name: str
    key_id: str
    # The key is compared through key_id (derived from it); key objects need not be hashable.
    public_key: Ed25519PublicKey = dataclasses.field(compare=False, repr=False)
    roles: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.roles) - set(ROLES))
        if unknown:
            raise TrustConfigError(
                f"operator {self.name!r}: unknown role(s) {unknown}; roles are {list(ROLES)}"
            )
        if key_id_of(self.public_key) != self.key_id:
            raise TrustConfigError(f"operator {self.name!r}: key_id {self.key_id!r} is not its key's id")
        # frozen: set the normalised value the way dataclasses do it themselves
        object.__setattr__(self, "roles", frozenset(self.roles) | {STATUS})

    def may(self, role: str) -> bool:
        """Whether this operator holds `role`; "status" always, an unknown role never."""
        return role == STATUS or role in self.roles

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "key_id": self.key_id, "roles": sorted(self.roles)}


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Operators:
    """The agent's trusted operators, looked up by public key or key id."""

    def __init__(self, operators: Iterable[Operator] = (), source: str | None = None) -> None:
        self.source = source
        self._by_id: dict[str, Operator] = {}
        names: set[str] = set()
        where = f"{source}: " if source else ""
        for op in operators:
            if op.name in names:
                raise TrustConfigError(f"{where}operator name {op.name!r} is used twice")
            if op.key_id in self._by_id:
                other = self._by_id[op.key_id].name
                raise TrustConfigError(
                    f"{where}operators {other!r} and {op.name!r} have the same key (key id {op.key_id})"
                )
            names.add(op.name)
            self._by_id[op.key_id] = op

    @classmethod
    def from_file(cls, path: PathLike) -> Operators:
        """Read and check an operators JSON file; any fault raises TrustConfigError naming it."""
        p = Path(path)
        if p.is_dir():
            raise TrustConfigError(f"operators file {p} is a directory, expected a JSON file")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise TrustConfigError(f"cannot read operators file {p}: {e.strerror or e}") from e
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TrustConfigError(f"operators file {p} is not UTF-8 text (byte {e.start})") from e
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise TrustConfigError(f"operators file {p} is not valid JSON: {e}") from e
        return cls.from_document(doc, p.parent, source=str(p))

    @classmethod
    def from_document(cls, doc: object, folder: PathLike, source: str = "operators") -> Operators:
        """Operators from an already-parsed document; key paths are relative to `folder`."""
        if not isinstance(doc, dict) or not isinstance(doc.get("operators"), list):
            raise TrustConfigError(f'{source}: expected an object {{"operators": [...]}}')
        extra = sorted(set(doc) - {"operators"})
        if extra:
            raise TrustConfigError(f"{source}: unknown top-level field(s) {extra}; only 'operators'")
        return cls(
            [_parse_entry(entry, i, Path(folder), source) for i, entry in enumerate(doc["operators"])],
            source=source,
        )

    def lookup(self, public_key: Ed25519PublicKey | None) -> Operator | None:
        """The operator holding exactly this key (the full key is compared, not only its id)."""
        if public_key is None:
            return None
        op = self._by_id.get(key_id_of(public_key))
        if op is None or _raw(op.public_key) != _raw(public_key):
            return None
        return op

    def by_key_id(self, key_id: str) -> Operator | None:
        return self._by_id.get(key_id) if isinstance(key_id, str) else None

    def names(self) -> list[str]:
        return [op.name for op in self]

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Operator]:
        return iter(self._by_id.values())

    def __repr__(self) -> str:
        return f"Operators({[op.describe() for op in self]!r})"


def _parse_entry(entry: object, index: int, folder: Path, source: str) -> Operator:
    where = f"{source}: operators[{index}]"
    if not isinstance(entry, dict):
        raise TrustConfigError(f"{where} must be an object with {list(_ENTRY_FIELDS)}")
    name = entry.get("name")
    if isinstance(name, str) and name:
        where = f"{source}: operator {name!r}"
    missing = [f for f in _REQUIRED_FIELDS if f not in entry]
    if missing:
        raise TrustConfigError(f"{where} lacks field(s) {missing}; fields are {list(_ENTRY_FIELDS)}")
    extra = sorted(set(entry) - set(_ENTRY_FIELDS))
    if extra:
        # a misspelt "roles" would otherwise quietly leave the operator with status only
        raise TrustConfigError(f"{where} has unknown field(s) {extra}; fields are {list(_ENTRY_FIELDS)}")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise TrustConfigError(f"{where}: 'name' {name!r} must be 1-64 letters, digits, '_', '.', '@' or '-'")
    roles = entry.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise TrustConfigError(f"{where}: 'roles' must be a list of role names from {list(ROLES)}")
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise TrustConfigError(f"{where}: unknown role(s) {unknown}; roles are {list(ROLES)}")
    key_field = entry["key"]
    if not isinstance(key_field, str) or not key_field.strip():
        raise TrustConfigError(f"{where}: 'key' must be a key file path or base64 of the 32 raw bytes")
    try:
        public_key = load_operator_key(_resolve_key(key_field.strip(), folder))
    except TrustConfigError as e:
        raise TrustConfigError(f"{where}: {e}") from e
    return Operator(name=name, key_id=key_id_of(public_key), public_key=public_key, roles=frozenset(roles))


def _resolve_key(value: str, folder: Path) -> PathLike | bytes:
    """Inline base64 of 32 bytes stays bytes; anything else is a path relative to `folder`."""
    path = folder / value
    if _BASE64_KEY_RE.match(value) and not path.exists():
        return value.encode("ascii")
    return path


def load_operator_key(source: OperatorKeySource) -> Ed25519PublicKey:
    """An operator's Ed25519 public key from a key object, a file, or bytes.

    Accepts a PEM public key, a PEM (or DER) X.509 certificate whose key is Ed25519, the 32 raw
    key bytes, or their base64. A `str` is a path, unless no such file exists and it is exactly
    the base64 of 32 bytes. Raises TrustConfigError naming the source.
    """
    if isinstance(source, Ed25519PublicKey):
        return source
    if isinstance(source, bytes):
        data, where = source, "key bytes"
    else:
        if isinstance(source, str) and _BASE64_KEY_RE.match(source) and not Path(source).exists():
            data, where = source.encode("ascii"), "base64 key"
        else:
            p = Path(source)
            if p.is_dir():
                raise TrustConfigError(f"key {p} is a directory, expected a key or certificate file")
            try:
                data, where = p.read_bytes(), str(p)
            except OSError as e:
                raise TrustConfigError(f"cannot read key {p}: {e.strerror or e}") from e
    key: object
    try:
        stripped = data.strip()
        if stripped.startswith(b"-----BEGIN CERTIFICATE-----"):
            key = x509.load_pem_x509_certificate(stripped).public_key()
        elif stripped.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(stripped)
        elif len(data) == 32:
            key = Ed25519PublicKey.from_public_bytes(data)
        elif _BASE64_TEXT_RE.match(stripped):  # before DER: base64 text may well start with "0"
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(stripped, validate=True))
        else:  # binary and not 32 bytes: a DER certificate or nothing
            key = x509.load_der_x509_certificate(data).public_key()
    except (ValueError, TypeError, binascii.Error) as e:
        raise TrustConfigError(
            f"{where} is not an Ed25519 public key, certificate, 32 raw bytes or their base64: {e}"
        ) from e
    if not isinstance(key, Ed25519PublicKey):
        raise TrustConfigError(f"{where} holds a {type(key).__name__}, expected an Ed25519 key")
    return key


# --- serial links: a challenge signed with the operator's key ---------------------------------


def new_challenge() -> str:
    """A fresh challenge: base64 of 32 bytes from `secrets` (never repeat one)."""
    return base64.b64encode(secrets.token_bytes(CHALLENGE_BYTES)).decode("ascii")


def challenge_bytes(agent_id: str, challenge: str) -> bytes:
    """What the operator signs: canonical JSON of the context, the agent's id and the challenge."""
    if not isinstance(agent_id, str) or not isinstance(challenge, str) or not challenge:
        raise AuthError(BAD_CHALLENGE, "agent id and challenge must be non-empty strings")
    return canonical_json({"context": AUTH_CONTEXT, "agent": agent_id, "challenge": challenge})


def sign_challenge(
    private_key: Ed25519PrivateKey | PathLike, agent_id: str, challenge: str
) -> dict[str, str]:
    """The operator's answer to a challenge: {"key_id": ..., "signature": base64}."""
    if not isinstance(private_key, Ed25519PrivateKey):
        try:
            private_key = load_private_key(private_key)
        except SigningError as e:
            raise TrustConfigError(str(e)) from e
    signature = private_key.sign(challenge_bytes(agent_id, challenge))
    return {
        "key_id": key_id_of(private_key.public_key()),
        "signature": base64.b64encode(signature).decode("ascii"),
    }


def verify_challenge(
    operators: Operators, agent_id: str, challenge: str, key_id: object, signature: object
) -> Operator:
    """The operator whose key signed this challenge for this agent, or AuthError.

    `key_id` and `signature` come straight from the wire, so any type is refused cleanly.
    """
    if len(operators) == 0:
        raise AuthError(NO_OPERATORS, "the agent trusts no operator")
    signed = challenge_bytes(agent_id, challenge)
    op = operators.by_key_id(key_id) if isinstance(key_id, str) else None
    if op is None:
        shown = key_id if isinstance(key_id, str) and len(key_id) <= 64 else type(key_id).__name__
        raise AuthError(UNKNOWN_OPERATOR, f"no trusted operator has key id {shown!r}")
    try:
        raw_sig = base64.b64decode(signature, validate=True) if isinstance(signature, str) else b""
    except (binascii.Error, ValueError):
        raw_sig = b""
    if len(raw_sig) != SIGNATURE_BYTES:
        raise AuthError(BAD_SIGNATURE, "signature is not base64 of 64 bytes")
    try:
        op.public_key.verify(raw_sig, signed)
    except InvalidSignature:
        raise AuthError(BAD_SIGNATURE, f"signature does not verify for operator {op.name!r}") from None
    return op
