"""A/B model slots in the agent's state directory, written so that a power cut never leaves a
half-written policy in use.

Layout::

    STATE/slots/a/{policy.tflite, manifest.json, manifest.sig}
    STATE/slots/b/...
    STATE/state.json   {"active": "a"|"b"|null, "active_sha256": ..., "previous": ...,
                        "previous_sha256": ...}

Rules (standard library only: `os.replace` + `fsync` are the whole trick, as in Ray Tune's
checkpoints; signatures and hashes come from `device_agents.signing`):

- every file is written atomically: temp file in the same directory, fsync, `os.replace`,
  fsync of the directory;
- only the standby slot (the one `state.json` does not name as active) is ever written, and
  before the first byte goes into it `state.json` forgets it as `previous` (it is about to stop
  holding that policy);
- commit = flip `state.json` atomically, after the slot's three files are on disk;
- on start-up `recover()` verifies the active slot (sha256 + Ed25519 signature against the
  trusted keys) and falls back to the other slot if that verifies; with neither, no policy
  (only possible on a robot never deployed to, or after both slots were corrupted on disk).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agents.atomic import atomic_write
from device_agents.errors import DeviceError
from device_agents.signing import KeySource, Verdict, load_public_key, verify_artifact

log = logging.getLogger(__name__)

SLOTS = ("a", "b")
MODEL_FILE, MANIFEST_FILE, SIGNATURE_FILE = "policy.tflite", "manifest.json", "manifest.sig"
STATE_FILE = "state.json"


class SlotError(DeviceError):
    """A slot operation is impossible (no previous slot, bad slot name, disk failure)."""


@dataclass(frozen=True)
class SlotInfo:
    """What a slot holds and whether it verifies."""

    slot: str
    verdict: Verdict
    manifest: dict | None
    model_path: Path

    @property
    def ok(self) -> bool:
        return self.verdict.ok

    @property
    def sha256(self) -> str | None:
        return None if self.manifest is None else self.manifest.get("sha256")

    def summary(self) -> dict[str, Any]:
        m = self.manifest or {}
        return {
            "verified": self.ok,
            "reason": self.verdict.reason,
            "sha256": m.get("sha256"),
            "key_id": self.verdict.key_id,
            "arch_id": m.get("arch_id"),
            "study": m.get("study"),
            "trial": m.get("trial"),
            "precision": m.get("precision"),
            "control_hz": m.get("control_hz"),
            "model_size": m.get("model_size"),
        }


def _check_slot(slot: str) -> str:
    if slot not in SLOTS:
        raise SlotError(f"slot {slot!r} is not one of {', '.join(SLOTS)}")
    return slot


class SlotStore:
    """The two slots and the state file under `state_dir`; see the module docstring."""

    def __init__(self, state_dir: str | Path, trusted_keys: Iterable[KeySource]):
        self.root = Path(state_dir)
        self.keys = [load_public_key(k) for k in trusted_keys]
        try:
            for s in SLOTS:
                (self.root / "slots" / s).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SlotError(f"cannot create the state directory {self.root}: {e}") from e
        self.state: dict[str, str | None] = self._read_state()

    # --- state.json ------------------------------------------------------------------------
    def _read_state(self) -> dict[str, str | None]:
        empty: dict[str, str | None] = {
            "active": None,
            "active_sha256": None,
            "previous": None,
            "previous_sha256": None,
        }
        path = self.root / STATE_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return empty
        except (OSError, ValueError) as e:  # unreadable: recover() picks a verified slot
            log.warning("state file %s unreadable (%s); recovering from the slots", path, e)
            return dict(empty, corrupt="yes")
        if not isinstance(raw, dict):
            return dict(empty, corrupt="yes")
        state = dict(empty)
        for key in empty:
            value = raw.get(key)
            state[key] = value if isinstance(value, str) else None
        for key in ("active", "previous"):
            if state[key] not in SLOTS:
                state[key] = None
        return state

    def _write_state(self, state: dict[str, str | None]) -> None:
        clean = {k: state.get(k) for k in ("active", "active_sha256", "previous", "previous_sha256")}
        atomic_write(self.root / STATE_FILE, json.dumps(clean, sort_keys=True).encode("utf-8"))
        self.state = clean

    @property
    def active(self) -> str | None:
        return self.state.get("active")

    @property
    def previous(self) -> str | None:
        return self.state.get("previous")

    def standby(self) -> str:
        """The slot that may be written: the one that is not active."""
        return "b" if self.active == "a" else "a"

    def slot_dir(self, slot: str) -> Path:
        return self.root / "slots" / _check_slot(slot)

    # --- verification ----------------------------------------------------------------------
    def inspect(self, slot: str) -> SlotInfo:
        """Read and verify one slot (sha256 of the model + signature over the manifest)."""
        d = self.slot_dir(slot)
        model_path = d / MODEL_FILE
        try:
            manifest = json.loads((d / MANIFEST_FILE).read_text(encoding="utf-8"))
            model = model_path.read_bytes()
        except FileNotFoundError as e:
            return SlotInfo(
                slot, Verdict(False, "empty", None, detail=f"{e.filename} missing"), None, model_path
            )
        except (OSError, ValueError) as e:
            return SlotInfo(slot, Verdict(False, "bad manifest", None, detail=str(e)[:200]), None, model_path)
        if not isinstance(manifest, dict):
            return SlotInfo(slot, Verdict(False, "bad manifest", None), None, model_path)
        try:
            signature: str | None = (d / SIGNATURE_FILE).read_text(encoding="ascii").strip()
        except (OSError, ValueError):
            signature = None
        verdict = verify_artifact(manifest, signature or None, model, self.keys)
        return SlotInfo(slot, verdict, manifest, model_path)

    def recover(self) -> str | None:
        """Start-up check: keep the active slot if it verifies, else fall back; returns the
        active slot (None: no verified policy). Leftover temp files are removed."""
        for s in SLOTS:
            for stale in self.slot_dir(s).glob(".*.tmp"):
                stale.unlink()
        for stale in self.root.glob(f".{STATE_FILE}.*.tmp"):
            stale.unlink()
        info = {s: self.inspect(s) for s in SLOTS}
        active = self.active
        if (
            active is not None
            and info[active].ok
            and (self.state.get("active_sha256") in (None, info[active].sha256))
        ):
            if self.previous and not (
                info[self.previous].ok and info[self.previous].sha256 == self.state["previous_sha256"]
            ):
                self._write_state(dict(self.state, previous=None, previous_sha256=None))
            return active
        candidates = [s for s in SLOTS if s != active and info[s].ok]
        if self.state.get("corrupt") and len(candidates) > 1:
            # no record of which was newer: take the slot written last
            candidates.sort(key=lambda s: (self.slot_dir(s) / MANIFEST_FILE).stat().st_mtime, reverse=True)
        if candidates:
            chosen = candidates[0]
            log.warning(
                "active slot %s does not verify (%s); falling back to slot %s",
                active,
                info[active].verdict.reason if active else "none",
                chosen,
            )
            self._write_state(
                {
                    "active": chosen,
                    "active_sha256": info[chosen].sha256,
                    "previous": None,
                    "previous_sha256": None,
                }
            )
            return chosen
        if active is not None or self.state.get("corrupt"):
            log.error(
                "no slot verifies (%s); the agent has no policy",
                ", ".join(f"{s}: {info[s].verdict.reason}" for s in SLOTS),
            )
            self._write_state(
                {"active": None, "active_sha256": None, "previous": None, "previous_sha256": None}
            )
        return None

    # --- writing ---------------------------------------------------------------------------
    def write_standby(self, model: bytes, manifest: dict, signature: str | None) -> str:
        """Write an artifact into the standby slot (not yet active); returns the slot name.

        The caller has verified it already; it is verified again from disk at commit."""
        from device_agents.signing import canonical_json

        slot = self.standby()
        if self.previous == slot:
            # the slot is about to stop holding the previous policy: forget it first
            self._write_state(dict(self.state, previous=None, previous_sha256=None))
        d = self.slot_dir(slot)
        # the signature goes first and the manifest last, so a torn write never pairs a new
        # manifest with an old signature that happens to verify something else
        sig_path = d / SIGNATURE_FILE
        try:
            if signature:
                atomic_write(sig_path, signature.encode("ascii") + b"\n")
            elif sig_path.exists():
                sig_path.unlink()
            atomic_write(d / MODEL_FILE, bytes(model))
            atomic_write(d / MANIFEST_FILE, canonical_json(manifest))
        except OSError as e:
            raise SlotError(f"cannot write slot {slot} under {d}: {e}") from e
        return slot

    def commit(self, slot: str) -> None:
        """Make `slot` active (after verifying it from disk); the old active becomes previous."""
        info = self.inspect(_check_slot(slot))
        if not info.ok:
            raise SlotError(f"slot {slot} does not verify ({info.verdict.reason}); not committed")
        old = self.active
        old_sha = self.state.get("active_sha256")
        self._write_state(
            {
                "active": slot,
                "active_sha256": info.sha256,
                "previous": old if old != slot else None,
                "previous_sha256": old_sha if old != slot else None,
            }
        )

    def rollback(self) -> str:
        """Switch to the previous slot if it still holds a verified policy; returns it."""
        prev = self.previous
        if prev is None:
            raise SlotError(
                "no previous policy to roll back to (never replaced, or its slot has been overwritten since)"
            )
        info = self.inspect(prev)
        if not info.ok or info.sha256 != self.state.get("previous_sha256"):
            raise SlotError(f"previous slot {prev} no longer verifies ({info.verdict.reason})")
        self.commit(prev)
        return prev

    def status(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "previous": self.previous,
            "slots": {s: self.inspect(s).summary() for s in SLOTS},
        }

    def active_info(self) -> SlotInfo | None:
        return None if self.active is None else self.inspect(self.active)
