"""A/B slots: atomic commit, recovery from every partial state a crash can leave, slot states
(pending / promoted / rejected) and the ordering that refuses a replayed older artifact."""

from __future__ import annotations

import hashlib
import itertools
import json

import pytest

from device_agents.signing import generate_keypair, key_id, load_private_key, load_public_key, sign_manifest
from device_agents.slots import SlotError, SlotStore

_SEQ = itertools.count(1)


@pytest.fixture()
def keys(tmp_path):
    priv, pub = generate_keypair(tmp_path / "keys")
    return load_private_key(priv), pub


def artifact(key, payload: bytes, sequence: int | None = None):
    """A signed artifact; each call gets a higher sequence than the last unless one is given."""
    manifest = {
        "sha256": hashlib.sha256(payload).hexdigest(),
        "model_size": len(payload),
        "sequence": next(_SEQ) if sequence is None else sequence,
    }
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


# ----------------------------------------------------------------------------- slot states
def _kid(pub) -> str:
    return key_id(load_public_key(pub))


def test_states_are_recorded_and_summarised(tmp_path, keys):
    key, pub = keys
    store = SlotStore(tmp_path / "s", [pub])
    art = artifact(key, b"one", sequence=7)
    slot = store.write_standby(*art)
    assert store.inspect(slot).state == "pending"
    status = json.loads((tmp_path / "s" / "slots" / slot / "status.json").read_text())
    assert status["state"] == "pending" and status["sha256"] == art[1]["sha256"] and status["sequence"] == 7
    store.commit(slot)
    summary = store.status()["slots"][slot]
    assert (summary["state"], summary["sequence"], summary["reason_rejected"]) == ("promoted", 7, None)
    assert store.status()["highest_sequence"] == {_kid(pub): 7}
    other = store.write_standby(*artifact(key, b"two", sequence=8))
    store.mark_rejected(other, "mean return 3 < 100")
    summary = store.status()["slots"][other]
    assert summary["state"] == "rejected" and summary["reason_rejected"] == "mean return 3 < 100"
    with pytest.raises(SlotError, match="active"):
        store.mark_rejected(slot, "no")


def test_pending_status_is_written_before_any_other_file(tmp_path, keys, monkeypatch):
    """A power cut right after the first file of a new artifact: the slot already says pending,
    so the old promoted status can never be paired with the new bytes."""
    import device_agents.slots as slots_mod

    key, pub = keys
    store = SlotStore(tmp_path / "s", [pub])
    deploy(store, artifact(key, b"one"))
    deploy(store, artifact(key, b"two"))  # b active, a promoted and previous
    written: list[str] = []
    real = slots_mod.atomic_write

    def recording(path, data, mode=None):
        written.append(path.name)
        return real(path, data, mode)

    monkeypatch.setattr(slots_mod, "atomic_write", recording)
    store.write_standby(*artifact(key, b"three"))
    slot_files = [n for n in written if n != "state.json"]
    assert slot_files[0] == "status.json" and set(slot_files[1:]) == {
        "manifest.sig",
        "policy.tflite",
        "manifest.json",
    }


def test_pending_slot_is_never_activated_by_fallback(tmp_path, keys):
    """Power cut after write_standby, before the canary finished: the new slot verifies but
    stays pending; whatever state.json says afterwards, it is not activated."""
    key, pub = keys
    root = tmp_path / "s"
    store = SlotStore(root, [pub])
    deploy(store, artifact(key, b"old"))  # a
    store.write_standby(*artifact(key, b"new, canary unfinished"))  # b, pending
    assert store.inspect("b").ok and store.inspect("b").state == "pending"
    (root / "state.json").write_bytes(b"\x00garbage")
    assert SlotStore(root, [pub]).recover() == "a"
    (root / "state.json").write_text(json.dumps({"active": "b"}))  # names the pending slot
    assert SlotStore(root, [pub]).recover() == "a"
    (root / "slots" / "a" / "policy.tflite").write_bytes(b"torn")  # and the old one is damaged
    (root / "state.json").write_bytes(b"{")
    fresh = SlotStore(root, [pub])
    assert fresh.recover() is None and fresh.active is None
    with pytest.raises(SlotError, match="rejected: slot b is pending"):
        fresh.runnable("b", force=False)


def test_rejected_slot_is_never_activated_by_recover_rollback_or_run(tmp_path, keys):
    key, pub = keys
    root = tmp_path / "s"
    store = SlotStore(root, [pub])
    deploy(store, artifact(key, b"v1"))  # a
    deploy(store, artifact(key, b"v2"))  # b, previous a
    slot = store.write_standby(*artifact(key, b"v3 fails its canary"))
    assert slot == "a"
    store.mark_rejected(slot, "canary: mean return 1 < 50")
    assert store.previous is None
    with pytest.raises(SlotError):
        store.rollback()
    with pytest.raises(SlotError, match="rejected"):
        store.commit(slot)
    with pytest.raises(SlotError, match=r"rejected: slot a was rejected \(canary: mean return 1 < 50\)"):
        store.runnable(slot, force=False)
    store.runnable(slot, force=True)  # an operator's explicit request
    store.runnable("b", force=False)  # the promoted active slot runs
    # state.json unreadable: the rejected slot is the newest on disk, yet b is chosen
    (root / "state.json").write_bytes(b"\xff\xfe not json")
    again = SlotStore(root, [pub])
    assert again.recover() == "b"
    # and with b damaged too there is no policy rather than the rejected one
    (root / "slots" / "b" / "manifest.sig").unlink()
    (root / "state.json").write_bytes(b"garbage")
    assert SlotStore(root, [pub]).recover() is None
    # a state file that names the rejected slot active does not make it active either
    (root / "state.json").write_text(json.dumps({"active": "a"}))
    assert SlotStore(root, [pub]).recover() is None


def test_rollback_only_to_a_promoted_previous_slot(tmp_path, keys):
    key, pub = keys
    root = tmp_path / "s"
    store = SlotStore(root, [pub])
    deploy(store, artifact(key, b"v1"))
    deploy(store, artifact(key, b"v2"))
    # damage on disk turns the previous slot's status into pending: no rollback to it
    status_path = root / "slots" / "a" / "status.json"
    status = json.loads(status_path.read_text())
    status_path.write_text(json.dumps(dict(status, state="pending")))
    with pytest.raises(SlotError, match="pending"):
        SlotStore(root, [pub]).rollback()
    status_path.write_text(json.dumps(status))
    assert SlotStore(root, [pub]).rollback() == "a"


def test_with_both_promoted_and_no_state_file_the_last_promoted_wins(tmp_path, keys):
    """After a rollback the older slot is the one in use; a lost state.json keeps it so."""
    key, pub = keys
    root = tmp_path / "s"
    store = SlotStore(root, [pub])
    deploy(store, artifact(key, b"v1"))
    deploy(store, artifact(key, b"v2"))
    assert store.rollback() == "a"
    (root / "state.json").write_bytes(b"")
    assert SlotStore(root, [pub]).recover() == "a"


def test_legacy_slots_without_status_keep_working(tmp_path, keys):
    """Slots written before slot states existed: state "unknown", kept when state.json names
    them, adopted as promoted on start-up; never picked by fallback on their own."""
    key, pub = keys
    root = tmp_path / "s"
    store = SlotStore(root, [pub])
    deploy(store, artifact(key, b"v1"))
    deploy(store, artifact(key, b"v2"))
    for s in "ab":
        (root / "slots" / s / "status.json").unlink()
    legacy = SlotStore(root, [pub])
    assert legacy.inspect("a").state == "unknown"
    assert legacy.recover() == "b"
    assert legacy.inspect("b").state == "promoted" and legacy.inspect("a").state == "promoted"
    for s in "ab":
        (root / "slots" / s / "status.json").unlink()
    (root / "state.json").write_bytes(b"garbage")  # nothing vouches for either slot now
    assert SlotStore(root, [pub]).recover() is None


# ----------------------------------------------------------------------------- ordering
def test_replayed_older_artifact_is_refused_and_the_same_one_accepted(tmp_path, keys):
    key, pub = keys
    kid = _kid(pub)
    store = SlotStore(tmp_path / "s", [pub])
    v1, v2 = artifact(key, b"v1", sequence=100), artifact(key, b"v2", sequence=200)
    assert store.order_verdict(v1[1], kid) == (True, "ok", "")
    deploy(store, v1)
    deploy(store, v2)
    assert store.highest_sequence(kid) == 200
    ok, reason, detail = store.order_verdict(v1[1], kid)
    assert (ok, reason) == (False, "downgrade") and "100" in detail and "200" in detail
    assert store.order_verdict(v2[1], kid)[0]  # the same artifact again is fine
    deploy(store, v2)  # and commits
    same_number = artifact(key, b"another model", sequence=200)
    assert store.order_verdict(same_number[1], kid)[:2] == (False, "downgrade")
    assert store.order_verdict(artifact(key, b"v3", sequence=201)[1], kid)[0]
    for bad in (None, 0, -5, 3.0, "300", True):
        manifest = dict(v2[1], sequence=bad)
        if bad is None:
            del manifest["sequence"]
        assert store.order_verdict(manifest, kid)[:2] == (False, "unordered")
    # another key has its own order
    assert store.order_verdict(v1[1], "0123456789abcdef")[0]
    assert store.highest_sequence("0123456789abcdef") is None


def test_commit_refuses_an_older_slot_unless_asked_and_rollback_keeps_the_highest(tmp_path, keys):
    key, pub = keys
    kid = _kid(pub)
    store = SlotStore(tmp_path / "s", [pub])
    v1, v2 = artifact(key, b"v1", sequence=10), artifact(key, b"v2", sequence=20)
    deploy(store, v2)
    slot = store.write_standby(*v1)
    with pytest.raises(SlotError, match="downgrade"):
        store.commit(slot)
    assert store.active != slot
    store.commit(slot, allow_downgrade=True)  # an operator asked explicitly
    assert store.active == slot and store.highest_sequence(kid) == 20
    assert store.rollback() != slot  # back to v2
    assert store.rollback() == slot  # and to v1 again: allowed, and the highest stays
    assert store.highest_sequence(kid) == 20
    assert store.order_verdict(v1[1], kid)[1] == "downgrade"


def test_order_survives_a_corrupt_state_file_and_a_lost_order_file(tmp_path, keys):
    key, pub = keys
    kid = _kid(pub)
    root = tmp_path / "s"
    store = SlotStore(root, [pub])
    v1, v2 = artifact(key, b"v1", sequence=1000), artifact(key, b"v2", sequence=2000)
    deploy(store, v1)
    deploy(store, v2)
    order = json.loads((root / "order.json").read_text())
    assert order == {kid: {"sequence": 2000, "sha256": v2[1]["sha256"]}}
    (root / "state.json").write_bytes(b"\x00\x01 not json")
    again = SlotStore(root, [pub])
    assert again.recover() == "b"
    assert again.highest_sequence(kid) == 2000
    assert again.order_verdict(v1[1], kid)[1] == "downgrade"
    (root / "order.json").write_bytes(b"{broken")  # the promoted slot still carries its number
    assert SlotStore(root, [pub]).order_verdict(v1[1], kid)[1] == "downgrade"
    # a slot overwritten since does not lower it either: order.json had it
    (root / "order.json").write_text(json.dumps(order))
    store = SlotStore(root, [pub])
    store.recover()
    slot = store.write_standby(*artifact(key, b"v3", sequence=3000))
    store.mark_rejected(slot, "canary")
    assert store.highest_sequence(kid) == 2000
