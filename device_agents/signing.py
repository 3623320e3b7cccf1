"""Artifact signing: Ed25519 signatures over a model manifest, and the agent's check of both.

Leans on `cryptography` for keys and signatures (nothing cryptographic is done by hand). The
manifest is signed as canonical JSON (sorted keys, no spaces, UTF-8, no NaN); the host and the
agent both call `canonical_json` from here, so they agree byte for byte. The manifest carries
the model's sha256, so one signature covers the model too. A `signature` key inside the manifest
is left out of the signed bytes, so a manifest may carry its own signature.

Ordering: a manifest signed for deployment carries `sequence`, an integer >= 1 that grows with
every signature made with one key (`next_sequence`, `stamp_and_sign`). The agent remembers the
highest it promoted per key and refuses older artifacts (`device_agents.slots`), so a replayed,
correctly signed old artifact cannot downgrade a robot. The counter lives beside the private key
in `<key>.seq`, guarded by `fcntl.flock` (POSIX; the host side runs on Linux or macOS), and never
falls behind the wall clock in milliseconds, so two laptops sharing one key stay ordered by time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_agents.atomic import atomic_write
from device_agents.errors import DeviceError

if TYPE_CHECKING:
    from typing import TypeGuard  # 3.10+, only for the checker: annotations stay strings on 3.9

OK = "ok"
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad signature"
SHA256_MISMATCH = "sha256 mismatch"
NO_TRUSTED_KEYS = "no trusted keys"
BAD_MANIFEST = "bad manifest"

SEQUENCE_SUFFIX = ".seq"  # <private key>.seq: the last sequence handed out with that key

log = logging.getLogger(__name__)

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

    Refuses to replace an existing private key unless `overwrite` is true. A folder created here
    gets mode 0700, the private key 0600 and the public key 0644 whatever the process umask; an
    existing folder keeps its mode (it is the operator's).
    """
    out = Path(out_dir)
    try:
        existed = out.is_dir()
        out.mkdir(parents=True, exist_ok=True)
        if not existed:
            os.chmod(out, 0o700)  # chmod, not mkdir(mode=): a mode given to mkdir is umask-filtered
    except OSError as e:
        raise SigningError(f"cannot create the key folder {out}: {e}") from e
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


def valid_sequence(value: object) -> TypeGuard[int]:
    """A manifest `sequence`: an integer >= 1 (JSON true/false and 3.0 are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _unix_ms() -> int:
    return time.time_ns() // 1_000_000


def next_sequence(private_key_path: PathLike) -> int:
    """The next ordering number for manifests signed with this key: max(last + 1, unix ms).

    The last number handed out is kept in `<key>.seq` beside the key (written atomically), under
    an exclusive `fcntl.flock` on `<key>.seq.lock`, so two processes signing with one key at
    the same instant never get the same number. An unreadable `.seq` file is replaced: the
    clock alone still orders it after everything signed before (unless the clock went back).
    """
    import fcntl  # POSIX only; imported here so the agent never needs it

    key = Path(private_key_path)
    seq_path = key.with_name(key.name + SEQUENCE_SUFFIX)
    lock_path = key.with_name(key.name + SEQUENCE_SUFFIX + ".lock")
    try:
        fd = os.open(str(lock_path), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise SigningError(f"cannot open the sequence lock {lock_path}: {e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed, also if we are killed
        last = 0
        try:
            text = seq_path.read_text(encoding="ascii").strip()
            last = int(text)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log.warning("sequence file %s unreadable (%s); continuing from the clock", seq_path, e)
        seq = max(last + 1, _unix_ms(), 1)
        try:
            atomic_write(seq_path, f"{seq}\n".encode("ascii"), 0o600)
        except OSError as e:
            raise SigningError(f"cannot record the sequence in {seq_path}: {e}") from e
        return seq
    finally:
        os.close(fd)


def stamp_and_sign(manifest: dict, private_key_path: PathLike) -> tuple[dict, str]:
    """A copy of `manifest` with a fresh `sequence` (see `next_sequence`), and its signature.

    The key is loaded before a number is taken, so a bad key wastes none. An embedded
    `signature` is dropped from the copy: it signed other bytes.
    """
    if isinstance(private_key_path, (Ed25519PrivateKey, bytes)):
        raise SigningError("stamp_and_sign needs a key file: the sequence is remembered beside it")
    if not isinstance(manifest, dict):
        raise SigningError(f"manifest must be a dict, got {type(manifest).__name__}")
    key = load_private_key(private_key_path)
    stamped = {k: v for k, v in manifest.items() if k != "signature"}
    stamped["sequence"] = next_sequence(private_key_path)
    return stamped, sign_manifest(stamped, key)


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
