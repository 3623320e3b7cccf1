"""Ed25519 artifact signing: keys on disk, canonical JSON, and every way a verdict can fail."""

from __future__ import annotations

import base64
import hashlib
import os
import stat

import pytest

from device_agents.signing import (
    BAD_MANIFEST,
    BAD_SIGNATURE,
    NO_TRUSTED_KEYS,
    OK,
    SHA256_MISMATCH,
    UNSIGNED,
    SigningError,
    canonical_json,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    load_public_keys,
    sign_manifest,
    verify_artifact,
    verify_manifest,
)

MODEL = bytes(range(256)) * 40


def _manifest(model: bytes = MODEL) -> dict:
    return {
        "name": "hopper-arch-17",
        "version": 3,
        "arch": {"widths": [64, 32], "activation": "tanh"},
        "control_hz": 50.0,
        "quantisation": "int8",
        "sha256": hashlib.sha256(model).hexdigest(),
        "note": "größe µ",
    }


@pytest.fixture()
def keys(tmp_path):
    priv, pub = generate_keypair(tmp_path / "keys")
    return load_private_key(priv), load_public_key(pub), priv, pub


def test_keypair_files_and_modes(keys, tmp_path):
    _, public, priv_path, pub_path = keys
    assert stat.S_IMODE(os.stat(priv_path).st_mode) == 0o600
    assert priv_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    with pytest.raises(SigningError, match="exists"):
        generate_keypair(tmp_path / "keys")
    assert load_public_keys(tmp_path / "keys")[0].public_bytes_raw() == public.public_bytes_raw()
    assert not [p for p in (tmp_path / "keys").iterdir() if p.name.startswith(".")]  # no temp left


def test_public_key_formats_agree(keys):
    _, public, _, pub_path = keys
    raw = public.public_bytes_raw()
    for source in (public, pub_path, str(pub_path), pub_path.read_bytes(), raw, base64.b64encode(raw)):
        assert key_id(load_public_key(source)) == key_id(public)
    with pytest.raises(SigningError, match="Ed25519"):
        load_public_key(b"not a key at all")


def test_canonical_json_is_byte_stable():
    a = canonical_json({"b": [1, 2.5], "a": {"z": "µ", "y": None}})
    assert a == '{"a":{"y":null,"z":"µ"},"b":[1,2.5]}'.encode()
    assert canonical_json({"a": {"y": None, "z": "µ"}, "b": [1, 2.5]}) == a
    with pytest.raises(SigningError):
        canonical_json({"x": float("inf")})


def test_good_artifact_verifies_with_the_signing_key_among_others(keys, tmp_path):
    private, public, _, _ = keys
    _, other_pub = generate_keypair(tmp_path / "other")
    manifest = _manifest()
    sig = sign_manifest(manifest, private)
    verdict = verify_artifact(manifest, sig, MODEL, [other_pub, public])
    assert verdict.ok and bool(verdict) and verdict.reason == OK
    assert verdict.key_id == key_id(public) and verdict.sha256_ok
    # a manifest may carry its own signature: it is not part of the signed bytes
    assert verify_artifact({**manifest, "signature": sig}, sig, MODEL, [public]).ok


def test_signing_from_a_key_path_is_the_same_signature(keys):
    private, _, priv_path, _ = keys
    assert sign_manifest(_manifest(), priv_path) == sign_manifest(_manifest(), private)


def test_one_flipped_byte_in_the_model_fails(keys):
    private, public, _, _ = keys
    manifest = _manifest()
    sig = sign_manifest(manifest, private)
    bad = bytearray(MODEL)
    bad[1234] ^= 0x01
    verdict = verify_artifact(manifest, sig, bytes(bad), [public])
    assert not verdict.ok and verdict.reason == SHA256_MISMATCH and not verdict.sha256_ok


@pytest.mark.parametrize("field, value", [("version", 4), ("note", "größe μ"), ("arch", {})])
def test_a_changed_manifest_fails(keys, field, value):
    private, public, _, _ = keys
    manifest = _manifest()
    sig = sign_manifest(manifest, private)
    verdict = verify_artifact({**manifest, field: value}, sig, MODEL, [public])
    assert not verdict.ok and verdict.reason == BAD_SIGNATURE and verdict.sha256_ok


def test_one_flipped_byte_in_the_signature_fails(keys):
    private, public, _, _ = keys
    manifest = _manifest()
    raw = bytearray(base64.b64decode(sign_manifest(manifest, private)))
    raw[0] ^= 0x80
    flipped = base64.b64encode(bytes(raw)).decode()
    assert verify_artifact(manifest, flipped, MODEL, [public]).reason == BAD_SIGNATURE
    assert verify_artifact(manifest, "***not base64***", MODEL, [public]).reason == BAD_SIGNATURE


def test_a_different_key_fails(keys, tmp_path):
    private, _, _, _ = keys
    _, stranger = generate_keypair(tmp_path / "stranger")
    manifest = _manifest()
    verdict = verify_artifact(manifest, sign_manifest(manifest, private), MODEL, [stranger])
    assert not verdict.ok and verdict.reason == BAD_SIGNATURE and "tried" in verdict.detail


def test_unsigned_and_keyless_and_malformed_are_flagged(keys):
    private, public, _, _ = keys
    manifest = _manifest()
    for missing in (None, ""):
        verdict = verify_artifact(manifest, missing, MODEL, [public])
        assert not verdict.ok and verdict.reason == UNSIGNED and verdict.sha256_ok
    sig = sign_manifest(manifest, private)
    assert verify_artifact(manifest, sig, MODEL, []).reason == NO_TRUSTED_KEYS
    no_sha = {k: v for k, v in manifest.items() if k != "sha256"}
    assert verify_artifact(no_sha, sig, MODEL, [public]).reason == BAD_MANIFEST


def test_manifest_only_check_for_deploy_begin(keys, tmp_path):
    private, public, _, _ = keys
    _, stranger = generate_keypair(tmp_path / "stranger")
    manifest = _manifest()
    sig = sign_manifest(manifest, private)
    verdict = verify_manifest(manifest, sig, [public])
    assert verdict.ok and verdict.sha256_ok is None and verdict.key_id == key_id(public)
    assert verify_manifest(manifest, sig, [stranger]).reason == BAD_SIGNATURE
    assert verify_manifest({**manifest, "sha256": "00" * 32}, sig, [public]).reason == BAD_SIGNATURE
    assert verify_manifest(manifest, None, [public]).reason == UNSIGNED
