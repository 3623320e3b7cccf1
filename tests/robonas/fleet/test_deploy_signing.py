"""Deploy-time signing in `robonas.fleet.deploy.rollout`: one fresh `sequence` per rollout,
stamped into the manifest that every robot receives (with a signature over it), a higher one
for the next rollout; without a key the artifact's own manifest and signature go out."""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import pytest

from device_agents.signing import generate_keypair, verify_manifest
from robonas.errors import ConfigError
from robonas.fleet.client import DeployResult
from robonas.fleet.inventory import parse_inventory

MODEL = b"TFL3-fake-model" * 50
SHA = hashlib.sha256(MODEL).hexdigest()


class RecordingClient:
    """Accepts every deploy and records what it was sent."""

    sent: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, entry):
        self.entry = entry

    def hello(self):
        return {"agent": self.entry.name, "protocol": 1}

    def status(self):
        return {"active": None, "slots": {}}

    def deploy(self, artifact_dir, canary, progress, *, signature=None, manifest=None):
        self.sent.append({"agent": self.entry.name, "signature": signature, "manifest": manifest})
        progress(len(MODEL), len(MODEL))
        return DeployResult(self.entry.name, True, SHA, len(MODEL), reason="ok", slot="a", active="a")

    def close(self):
        pass


@pytest.fixture()
def fleet(monkeypatch):
    import robonas.fleet.client as client_mod

    manifest = {"sha256": SHA, "format_version": 1, "trial": 1}
    monkeypatch.setattr(client_mod, "read_artifact", lambda d: (dict(manifest), MODEL, "file-sig"))
    agents = [
        {"name": n, "link": f"tcp://127.0.0.1:{7100 + i}", "device": "x86-host", "robot": "sim:x"}
        for i, n in enumerate(["c1", "r1", "r2"])
    ]
    RecordingClient.sent = []
    return parse_inventory({"agent": agents}), manifest


def _rollout(inv, **kw):
    from robonas.fleet.deploy import rollout

    return rollout("art", inv, canary_count=1, client_factory=RecordingClient, **kw)


def test_one_stamped_manifest_per_rollout_sent_to_every_robot(tmp_path, fleet):
    inv, manifest = fleet
    priv, pub = generate_keypair(tmp_path / "keys")
    first = _rollout(inv, key=priv)
    assert first.ok and [s["agent"] for s in RecordingClient.sent] == ["c1", "r1", "r2"]
    sent = RecordingClient.sent
    assert all(s["manifest"] == sent[0]["manifest"] and s["signature"] == sent[0]["signature"] for s in sent)
    stamped = sent[0]["manifest"]
    assert stamped == {**manifest, "sequence": first.sequence} and first.sequence >= 1
    assert verify_manifest(stamped, sent[0]["signature"], [pub]).ok
    assert not verify_manifest(manifest, sent[0]["signature"], [pub]).ok  # the number is signed
    RecordingClient.sent = []
    second = _rollout(inv, key=priv)
    assert second.sequence is not None and second.sequence > first.sequence
    assert {s["manifest"]["sequence"] for s in RecordingClient.sent} == {second.sequence}


def test_without_a_key_the_artifacts_own_manifest_and_signature_go_out(fleet):
    inv, _ = fleet
    result = _rollout(inv)
    assert result.ok and result.sequence is None
    assert all(s["manifest"] is None and s["signature"] is None for s in RecordingClient.sent)


def test_an_unreadable_key_is_a_config_error_before_any_robot(tmp_path, fleet):
    inv, _ = fleet
    (tmp_path / "bad.key").write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="signing key"):
        _rollout(inv, key=tmp_path / "bad.key")
    assert RecordingClient.sent == []
