"""A/B slots: atomic commit, and recovery from every partial state a crash can leave."""

from __future__ import annotations

import hashlib
import json

import pytest

from device_agents.signing import generate_keypair, load_private_key, sign_manifest
from device_agents.slots import SlotError, SlotStore


@pytest.fixture()
def keys(tmp_path):
    priv, pub = generate_keypair(tmp_path / "keys")
    return load_private_key(priv), pub


def artifact(key, payload: bytes):
    manifest = {"sha256": hashlib.sha256(payload).hexdigest(), "model_size": len(payload)}
    return payload, manifest, sign_manifest(manifest, key)


def deploy(store, art):
    slot = store.write_standby(*art)
    store.commit(slot)
    return slot


def test_first_deploy_commits_and_second_goes_to_the_other_slot(tmp_path, keys):
    key, pub = keys
    store = SlotStore(tmp_path / "state", [pub])
    assert store.recover() is None and store.active is None
    a = artifact(key, b"model-one")
    assert deploy(store, a) == "a"
    assert store.active == "a" and store.previous is None
    b = artifact(key, b"model-two")
    assert deploy(store, b) == "b"
    assert (store.active, store.previous) == ("b", "a")
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["active_sha256"] == b[1]["sha256"]
    # a new store (a restart) sees the same state and keeps it
    again = SlotStore(tmp_path / "state", [pub])
    assert again.recover() == "b"
    assert again.rollback() == "a" and again.active == "a" and again.previous == "b"


def test_standby_write_without_commit_leaves_active_and_forgets_previous(tmp_path, keys):
    key, pub = keys
    store = SlotStore(tmp_path / "s", [pub])
    deploy(store, artifact(key, b"one"))
    deploy(store, artifact(key, b"two"))  # active b, previous a
    store.write_standby(*artifact(key, b"three"))  # overwrites a (canary failed, say)
    assert store.active == "b" and store.previous is None
    with pytest.raises(SlotError):
        store.rollback()
    assert SlotStore(tmp_path / "s", [pub]).recover() == "b"


@pytest.mark.parametrize(
    "damage",
    [
        "model missing",
        "manifest missing",
        "sig missing",
        "truncated model",
        "bad sig",
        "garbage manifest",
        "slot emptied",
    ],
)
def test_damaged_active_slot_falls_back_to_the_verified_other(tmp_path, keys, damage):
    key, pub = keys
    store = SlotStore(tmp_path / "s", [pub])
    first = artifact(key, b"old-model" * 10)
    deploy(store, first)
    deploy(store, artifact(key, b"new-model" * 10))
    d = tmp_path / "s" / "slots" / "b"
    if damage == "model missing":
        (d / "policy.tflite").unlink()
    elif damage == "manifest missing":
        (d / "manifest.json").unlink()
    elif damage == "sig missing":
        (d / "manifest.sig").unlink()
    elif damage == "truncated model":
        (d / "policy.tflite").write_bytes(b"new-mo")
    elif damage == "bad sig":
        other_key = load_private_key(generate_keypair(tmp_path / "k2")[0])
        (d / "manifest.sig").write_text(sign_manifest(first[1], other_key))
    elif damage == "garbage manifest":
        (d / "manifest.json").write_bytes(b"{not json")
    elif damage == "slot emptied":
        for f in d.iterdir():
            f.unlink()
    again = SlotStore(tmp_path / "s", [pub])
    assert again.recover() == "a"
    info = again.active_info()
    assert info.ok and info.sha256 == first[1]["sha256"]
    assert again.previous is None  # the broken slot is not a rollback target


def test_state_pointing_at_empty_slot_and_never_deployed(tmp_path, keys):
    key, pub = keys
    root = tmp_path / "s"
    store = SlotStore(root, [pub])
    (root / "state.json").write_text(json.dumps({"active": "b"}))
    assert SlotStore(root, [pub]).recover() is None  # nothing anywhere: no policy
    deploy(store, artifact(key, b"x"))  # goes to a
    (root / "state.json").write_text(json.dumps({"active": "b", "previous": "a"}))
    assert SlotStore(root, [pub]).recover() == "a"
    (root / "state.json").write_bytes(b"\x00garbage")
    s = SlotStore(root, [pub])
    assert s.recover() == "a" and json.loads((root / "state.json").read_text())["active"] == "a"


def test_untrusted_key_means_no_policy_and_temp_files_are_swept(tmp_path, keys):
    key, pub = keys
    store = SlotStore(tmp_path / "s", [pub])
    deploy(store, artifact(key, b"m"))
    stale = tmp_path / "s" / "slots" / "b" / ".policy.tflite.abc.tmp"
    stale.write_bytes(b"half")
    _, other_pub = generate_keypair(tmp_path / "other")
    fresh = SlotStore(tmp_path / "s", [other_pub])
    assert fresh.recover() is None
    assert not stale.exists()


def test_commit_refuses_a_slot_that_does_not_verify(tmp_path, keys):
    key, pub = keys
    store = SlotStore(tmp_path / "s", [pub])
    payload, manifest, _ = artifact(key, b"m")
    store.write_standby(payload, manifest, None)  # unsigned
    with pytest.raises(SlotError, match="unsigned"):
        store.commit("a")
    assert store.active is None
    with pytest.raises(SlotError, match="not one of"):
        store.slot_dir("c")


def test_atomic_write_permissions_follow_umask_unless_given(tmp_path):
    import os
    import stat

    from device_agents.atomic import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "artifact.bin", b"x")
        atomic_write(tmp_path / "secret.key", b"y", mode=0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "artifact.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "secret.key").stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
