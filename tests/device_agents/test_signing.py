"""Ed25519 artifact signing: keys on disk, canonical JSON, and every way a verdict can fail."""

from __future__ import annotations

import base64
import hashlib
import multiprocessing
import os
import stat
import time

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
    next_sequence,
    sign_manifest,
    stamp_and_sign,
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


# ----------------------------------------------------------------------------- key files
def test_key_folder_and_private_key_are_private_under_umask_0(tmp_path):
    old = os.umask(0)
    try:
        priv, pub = generate_keypair(tmp_path / "new" / "keys")
        next_sequence(priv)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new" / "keys").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pub).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(f"{priv}.seq").st_mode) == 0o600


def test_an_existing_key_folder_keeps_its_mode(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o750)
    generate_keypair(shared)
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o750


# ----------------------------------------------------------------------------- ordering
def test_next_sequence_grows_and_is_at_least_the_clock(keys):
    _, _, priv, _ = keys
    before = time.time_ns() // 1_000_000
    first = next_sequence(priv)
    assert first >= before
    assert next_sequence(priv) > first
    (priv.parent / f"{priv.name}.seq").write_text(str(first + 10**9))  # a number from the future
    assert next_sequence(priv) == first + 10**9 + 1
    (priv.parent / f"{priv.name}.seq").write_text("garbage")  # unreadable: the clock takes over
    assert next_sequence(priv) >= before


def test_next_sequence_is_distinct_across_racing_processes(keys):
    """Two processes x 200 calls on one key: every number distinct (the flock is the property;
    without it both read the same last value within a millisecond)."""
    _, _, priv, _ = keys
    ctx = multiprocessing.get_context("spawn")  # no fork of pytest's threads
    with ctx.Pool(2) as pool:
        # chunksize 200: each worker process makes 200 calls in a tight loop
        numbers = pool.map(next_sequence, [str(priv)] * 400, chunksize=200)
    assert len(set(numbers)) == 400
    assert int((priv.parent / f"{priv.name}.seq").read_text()) == max(numbers)


def test_stamp_and_sign(keys):
    private, public, priv, _ = keys
    manifest = {**_manifest(), "signature": "stale", "sequence": 1}
    stamped, sig = stamp_and_sign(manifest, priv)
    assert manifest["sequence"] == 1 and manifest["signature"] == "stale"  # the input is untouched
    assert "signature" not in stamped and stamped["sequence"] > 1
    assert {k: v for k, v in stamped.items() if k != "sequence"} == _manifest()
    assert verify_artifact(stamped, sig, MODEL, [public]).ok
    assert not verify_artifact(manifest, sig, MODEL, [public]).ok  # the sequence is signed
    again, _ = stamp_and_sign(manifest, str(priv))
    assert again["sequence"] > stamped["sequence"]
    with pytest.raises(SigningError, match="key file"):
        stamp_and_sign(manifest, private)
