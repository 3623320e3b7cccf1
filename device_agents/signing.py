"""Artifact signing: Ed25519 signatures over a model manifest, and the agent's check of both.

Leans on `cryptography` for keys and signatures (nothing cryptographic is done by hand). The
manifest is signed as canonical JSON (sorted keys, no spaces, UTF-8, no NaN); the host and the
agent both call `canonical_json` from here, so they agree byte for byte. The manifest carries
the model's sha256, so one signature covers the model too. A `signature` key inside the manifest
is left out of the signed bytes, so a manifest may carry its own signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_agents.atomic import atomic_write
from device_agents.errors import DeviceError

OK = "ok"
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad signature"
SHA256_MISMATCH = "sha256 mismatch"
NO_TRUSTED_KEYS = "no trusted keys"
BAD_MANIFEST = "bad manifest"

PathLike = Union[str, "os.PathLike[str]"]
KeySource = Union[Ed25519PublicKey, PathLike, bytes]


class SigningError(DeviceError):
    """A key cannot be written or loaded, or a manifest cannot be signed."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of `verify_artifact`.

    `ok` only when the sha256 matches (when checked) and a trusted key signed the manifest;
    `reason` is one of ok / unsigned / bad signature / sha256 mismatch / no trusted keys /
    bad manifest. `sha256_ok` is reported separately (None: not checked) so an agent configured
    to accept unsigned models can still insist on an intact one. `key_id` names the signing key.
    """

    ok: bool
    reason: str
    sha256_ok: bool | None
    key_id: str | None = None
    detail: str = ""

    def __bool__(self) -> bool:
        return self.ok


def canonical_json(obj: object) -> bytes:
    """The bytes that get signed: sorted keys, no whitespace, UTF-8, no NaN/Infinity."""
    try:
        return json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise SigningError(f"manifest is not canonical-JSON serialisable: {e}") from e


def _signed_bytes(manifest: dict) -> bytes:
    if not isinstance(manifest, dict):
        raise SigningError(f"manifest must be a dict, got {type(manifest).__name__}")
    return canonical_json({k: v for k, v in manifest.items() if k != "signature"})


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short fingerprint: the first 16 hex digits of sha256 over the raw 32-byte key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out_dir: PathLike, name: str = "robonas", overwrite: bool = False) -> tuple[Path, Path]:
    """Write `<name>.key` (PKCS#8 PEM, mode 0600) and `<name>.pub` (PEM) to `out_dir`.

    Refuses to replace an existing private key unless `overwrite` is true.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    if private_path.exists() and not overwrite:
        raise SigningError(f"{private_path} exists; pass overwrite=True to replace it")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write(private_path, private_pem, 0o600)
    atomic_write(public_path, public_pem, 0o644)
    return private_path, public_path


def load_private_key(path: PathLike) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (unencrypted PKCS#8) or a raw 32-byte file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SigningError(f"cannot read private key {path}: {e}") from e
    try:
        if len(data) == 32:
            return Ed25519PrivateKey.from_private_bytes(data)
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SigningError(f"{path} is not an unencrypted Ed25519 private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} holds a {type(key).__name__}, expected an Ed25519 key")
    return key


def load_public_key(source: KeySource) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, a file path, PEM bytes, or raw/base64 bytes."""
    if isinstance(source, Ed25519PublicKey):
        return source
    if isinstance(source, bytes):
        data, where = source, "key bytes"
    else:
        try:
            data, where = Path(source).read_bytes(), str(source)
        except OSError as e:
            raise SigningError(f"cannot read public key {source}: {e}") from e
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            raw = data if len(data) == 32 else base64.b64decode(data.strip(), validate=True)
            key = Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError, binascii.Error) as e:
        raise SigningError(f"{where} is not an Ed25519 public key (PEM, 32 raw bytes or base64): {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{where} holds a {type(key).__name__}, expected an Ed25519 key")
    return key


def load_public_keys(sources: PathLike | Iterable[KeySource]) -> list[Ed25519PublicKey]:
    """Trusted keys from a directory (every `*.pub` in it), one file, or a list of sources."""
    if isinstance(sources, (str, os.PathLike)):
        path = Path(sources)
        if path.is_dir():
            return [load_public_key(p) for p in sorted(path.glob("*.pub"))]
        return [load_public_key(path)]
    return [load_public_key(s) for s in sources]


def sign_manifest(manifest: dict, private_key: Ed25519PrivateKey | PathLike) -> str:
    """Base64 Ed25519 signature over canonical_json(manifest without its `signature` key)."""
    if not isinstance(private_key, Ed25519PrivateKey):
        private_key = load_private_key(private_key)
    return base64.b64encode(private_key.sign(_signed_bytes(manifest))).decode("ascii")


def verify_manifest(manifest: dict, signature: str | None, trusted_keys: Iterable[KeySource]) -> Verdict:
    """Check only the signature over the manifest (what the agent can do at DEPLOY_BEGIN).

    `sha256_ok` is None in the verdict: no model bytes were checked.
    """
    keys = [load_public_key(k) for k in trusted_keys]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), str):
        return Verdict(False, BAD_MANIFEST, None, detail="manifest has no sha256 string")
    return _check_signature(manifest, signature, keys, None)


def verify_artifact(
    manifest: dict,
    signature: str | None,
    model_bytes: bytes,
    trusted_keys: Iterable[KeySource],
) -> Verdict:
    """Check the model against manifest["sha256"] and the signature against every trusted key.

    The reason names the first failure in the order: bad manifest, sha256 mismatch, unsigned,
    no trusted keys, bad signature. Key-loading problems raise SigningError (a configuration
    fault, not a bad artifact).
    """
    keys = [load_public_key(k) for k in trusted_keys]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), str):
        return Verdict(False, BAD_MANIFEST, False, detail="manifest has no sha256 string")
    actual = hashlib.sha256(model_bytes).hexdigest()
    expected = manifest["sha256"].strip().lower()
    if not hmac.compare_digest(actual, expected):
        return Verdict(
            False, SHA256_MISMATCH, False, detail=f"model sha256 {actual}, manifest says {expected}"
        )
    return _check_signature(manifest, signature, keys, True)


def _check_signature(
    manifest: dict,
    signature: str | None,
    keys: list[Ed25519PublicKey],
    sha256_ok: bool | None,
) -> Verdict:
    if not signature:
        return Verdict(False, UNSIGNED, sha256_ok, detail="no signature was supplied")
    if not keys:
        return Verdict(False, NO_TRUSTED_KEYS, sha256_ok, detail="the agent trusts no signing key")
    try:
        raw_sig = base64.b64decode(signature, validate=True)
        signed = _signed_bytes(manifest)
    except (binascii.Error, ValueError, TypeError, SigningError) as e:
        return Verdict(False, BAD_SIGNATURE, sha256_ok, detail=f"signature unreadable: {e}")
    for key in keys:
        try:
            key.verify(raw_sig, signed)
        except InvalidSignature:
            continue
        return Verdict(True, OK, sha256_ok, key_id=key_id(key))
    ids = ", ".join(key_id(k) for k in keys)
    return Verdict(False, BAD_SIGNATURE, sha256_ok, detail=f"no trusted key verifies it (tried {ids})")
