"""A/B model slots in the agent's state directory, written so that a power cut never leaves a
half-written policy in use, a policy that failed its canary is never activated by itself, and
an older artifact never replaces a newer one by accident.

Layout::

    STATE/slots/a/{status.json, policy.tflite, manifest.json, manifest.sig}
    STATE/slots/b/...
    STATE/state.json   {"active": "a"|"b"|null, "active_sha256": ..., "previous": ...,
                        "previous_sha256": ...}
    STATE/order.json   {key_id: {"sequence": highest promoted, "sha256": its model}}

Rules (standard library only: `os.replace` + `fsync` are the whole trick, as in Ray Tune's
checkpoints; signatures and hashes come from `device_agents.signing`):

- every file is written atomically: temp file in the same directory, fsync, `os.replace`,
  fsync of the directory;
- only the standby slot (the one `state.json` does not name as active) is ever written, and
  before the first byte goes into it `state.json` forgets it as `previous` (it is about to stop
  holding that policy);
- each slot's `status.json` {state, sha256, sequence, reason, key_id, generation} says what
  became of it: "pending" is written before any other file of a new artifact, "promoted" at
  commit (before `state.json` flips), "rejected" by `mark_rejected` (a failed canary). A slot
  written before slot states existed has no status file: its state is "unknown";
- commit = status "promoted", then `order.json`, then flip `state.json`, after the slot's files
  are on disk and verify;
- on start-up `recover()` verifies the active slot (sha256 + Ed25519 signature against the
  trusted keys) and otherwise falls back to the other slot only if it verifies and was
  promoted (a pending or rejected slot never becomes active by itself, whatever `state.json`
  says or fails to say); with none, no policy;
- ordering: signed manifests carry `sequence` (`device_agents.signing.stamp_and_sign`).
  `order.json` remembers per signing key the highest sequence promoted, separately from
  `state.json` so a damaged state file does not forget it; `order_verdict` refuses an
  artifact without a sequence ("unordered") or older than that ("downgrade"). A rollback is an
  explicit operator request: it may activate an older slot and never lowers the highest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agents.atomic import atomic_write
from device_agents.errors import DeviceError
from device_agents.signing import OK, KeySource, Verdict, load_public_key, valid_sequence, verify_artifact

log = logging.getLogger(__name__)

SLOTS = ("a", "b")
MODEL_FILE, MANIFEST_FILE, SIGNATURE_FILE = "policy.tflite", "manifest.json", "manifest.sig"
STATUS_FILE = "status.json"
STATE_FILE = "state.json"
ORDER_FILE = "order.json"

PENDING, PROMOTED, REJECTED, UNKNOWN = "pending", "promoted", "rejected", "unknown"
_STATES = (PENDING, PROMOTED, REJECTED)
UNORDERED, DOWNGRADE = "unordered", "downgrade"  # order_verdict's refusal reasons
UNSIGNED_KEY = "unsigned"  # order.json key for artifacts no key signed (key_id None)
_MAX_REASON = 500  # characters of a rejection reason kept in status.json


class SlotError(DeviceError):
    """A slot operation is impossible (no previous slot, bad slot name, disk failure, a
    rejected or out-of-order slot)."""


@dataclass(frozen=True)
class SlotInfo:
    """What a slot holds, whether it verifies, and what became of it (`state`).

    `state` is pending / promoted / rejected from the slot's status.json, or "unknown" for a
    slot written before slot states existed. A status that names other bytes than the slot's
    manifest (only after damage on disk) counts as pending: nothing vouches for those bytes.
    """

    slot: str
    verdict: Verdict
    manifest: dict | None
    model_path: Path
    state: str = UNKNOWN
    status: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verdict.ok

    @property
    def sha256(self) -> str | None:
        return None if self.manifest is None else self.manifest.get("sha256")

    @property
    def sequence(self) -> int | None:
        seq = None if self.manifest is None else self.manifest.get("sequence")
        return seq if valid_sequence(seq) else None

    @property
    def reason_rejected(self) -> str | None:
        return self.status.get("reason") if self.state == REJECTED else None

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
            "state": self.state,
            "sequence": self.sequence,
            "reason_rejected": self.reason_rejected,
        }


def _check_slot(slot: str) -> str:
    if slot not in SLOTS:
        raise SlotError(f"slot {slot!r} is not one of {', '.join(SLOTS)}")
    return slot


def _order_key(key_id: str | None) -> str:
    return key_id if isinstance(key_id, str) and key_id else UNSIGNED_KEY


def _generation(status: dict[str, Any]) -> int:
    gen = status.get("generation")
    return gen if valid_sequence(gen) else 0


def _read_json(path: Path) -> Any:
    """The parsed file, None if it does not exist; raises OSError/ValueError if unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


class SlotStore:
    """The two slots, the state file and the order file under `state_dir`; see the module
    docstring."""

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
        except (OSError, ValueError) as e:  # unreadable: recover() picks a promoted slot
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

    def _forget_previous(self, slot: str) -> None:
        if self.previous == slot:
            self._write_state(dict(self.state, previous=None, previous_sha256=None))

    # --- status.json (per slot) ------------------------------------------------------------
    def slot_status(self, slot: str) -> dict[str, Any]:
        """The slot's status.json as written: {state, sha256, sequence, reason, key_id,
        generation}; state "unknown" when there is none (or it is unreadable)."""
        path = self.slot_dir(slot) / STATUS_FILE
        try:
            raw = _read_json(path)
        except (OSError, ValueError) as e:
            log.warning("slot status %s unreadable (%s); treated as unknown", path, e)
            raw = None
        if not isinstance(raw, dict) or raw.get("state") not in _STATES:
            return {"state": UNKNOWN}
        return raw

    def _write_status(
        self,
        slot: str,
        state: str,
        sha256: Any,
        sequence: Any,
        reason: str | None = None,
        key_id: str | None = None,
    ) -> None:
        status: dict[str, Any] = {
            "state": state,
            "sha256": sha256 if isinstance(sha256, str) else None,
            "sequence": sequence if valid_sequence(sequence) else None,
            "reason": None if reason is None else str(reason)[:_MAX_REASON],
        }
        if key_id is not None:
            status["key_id"] = key_id
        if state == PROMOTED:
            # which slot was promoted last, without trusting a clock (a robot may have no RTC)
            status["generation"] = 1 + max(_generation(self.slot_status(s)) for s in SLOTS if s != slot)
        atomic_write(self.slot_dir(slot) / STATUS_FILE, json.dumps(status, sort_keys=True).encode("utf-8"))

    @staticmethod
    def _effective_state(status: dict[str, Any], manifest_sha: Any) -> str:
        state = str(status.get("state", UNKNOWN))
        if state != UNKNOWN and manifest_sha is not None and status.get("sha256") != manifest_sha:
            return PENDING  # the status describes other bytes: nothing vouches for these
        return state

    # --- verification ----------------------------------------------------------------------
    def inspect(self, slot: str) -> SlotInfo:
        """Read and verify one slot (sha256 of the model + signature over the manifest)."""
        d = self.slot_dir(slot)
        model_path = d / MODEL_FILE
        status = self.slot_status(slot)

        def info(verdict: Verdict, manifest: dict | None) -> SlotInfo:
            sha = None if manifest is None else manifest.get("sha256")
            return SlotInfo(slot, verdict, manifest, model_path, self._effective_state(status, sha), status)

        try:
            manifest = json.loads((d / MANIFEST_FILE).read_text(encoding="utf-8"))
            model = model_path.read_bytes()
        except FileNotFoundError as e:
            return info(Verdict(False, "empty", None, detail=f"{e.filename} missing"), None)
        except (OSError, ValueError) as e:
            return info(Verdict(False, "bad manifest", None, detail=str(e)[:200]), None)
        if not isinstance(manifest, dict):
            return info(Verdict(False, "bad manifest", None), None)
        try:
            signature: str | None = (d / SIGNATURE_FILE).read_text(encoding="ascii").strip()
        except (OSError, ValueError):
            signature = None
        return info(verify_artifact(manifest, signature or None, model, self.keys), manifest)

    def recover(self) -> str | None:
        """Start-up check: keep the active slot if it verifies, else fall back to a verified,
        promoted slot; returns the active slot (None: no policy). Leftover temp files are
        removed. A slot written before slot states existed is kept when `state.json` names it
        active (or falls back to it when it names it previous with the same sha256), and its
        status is then recorded as promoted: it was, when it became active."""
        for s in SLOTS:
            for stale in self.slot_dir(s).glob(".*.tmp"):
                stale.unlink()
        for name in (STATE_FILE, ORDER_FILE):
            for stale in self.root.glob(f".{name}.*.tmp"):
                stale.unlink()
        info = {s: self.inspect(s) for s in SLOTS}
        active, previous = self.active, self.previous

        def vouched(s: str | None, sha_key: str) -> bool:
            """Verifies, matches state.json, and was promoted (or is a legacy slot state.json
            names: only a commit ever put a slot there)."""
            if s is None or not info[s].ok or self.state.get(sha_key) not in (None, info[s].sha256):
                return False
            return info[s].state in (PROMOTED, UNKNOWN)

        if vouched(active, "active_sha256"):
            assert active is not None
            keep_previous = (
                previous is not None
                and previous != active
                and vouched(previous, "previous_sha256")
                and info[previous].sha256 == self.state.get("previous_sha256")
            )
            if previous and not keep_previous:
                self._write_state(dict(self.state, previous=None, previous_sha256=None))
            for kept in (active, previous if keep_previous else None):
                if kept is not None and info[kept].state == UNKNOWN:
                    self._adopt_legacy(info[kept])
            return active
        candidates = [s for s in SLOTS if s != active and info[s].ok and info[s].state == PROMOTED]
        if (
            previous is not None
            and previous != active
            and info[previous].state == UNKNOWN
            and vouched(previous, "previous_sha256")
            and info[previous].sha256 == self.state.get("previous_sha256")
        ):
            candidates.append(previous)
        # with both promoted (state.json unreadable), the one promoted last
        candidates.sort(key=lambda s: _generation(info[s].status), reverse=True)
        if candidates:
            chosen = candidates[0]
            log.warning(
                "active slot %s does not verify or was never promoted (%s); falling back to slot %s",
                active,
                f"{info[active].verdict.reason}, {info[active].state}" if active else "none",
                chosen,
            )
            if info[chosen].state == UNKNOWN:
                self._adopt_legacy(info[chosen])
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
                "no slot verifies and was promoted (%s); the agent has no policy",
                ", ".join(f"{s}: {info[s].verdict.reason}, {info[s].state}" for s in SLOTS),
            )
            self._write_state(
                {"active": None, "active_sha256": None, "previous": None, "previous_sha256": None}
            )
        return None

    def _adopt_legacy(self, info: SlotInfo) -> None:
        self._write_status(info.slot, PROMOTED, info.sha256, info.sequence, key_id=info.verdict.key_id)

    # --- ordering --------------------------------------------------------------------------
    def _read_order(self) -> dict[str, dict[str, Any]]:
        path = self.root / ORDER_FILE
        try:
            raw = _read_json(path)
        except (OSError, ValueError) as e:
            # the promoted slots' status files still carry their sequences (highest_sequence)
            log.error("order file %s unreadable (%s); using the promoted slots' sequences", path, e)
            raw = None
        order: dict[str, dict[str, Any]] = {}
        for key, value in (raw if isinstance(raw, dict) else {}).items():
            entry = value if isinstance(value, dict) else {"sequence": value, "sha256": None}
            if valid_sequence(entry.get("sequence")):
                sha = entry.get("sha256")
                order[str(key)] = {
                    "sequence": entry["sequence"],
                    "sha256": sha if isinstance(sha, str) else None,
                }
        return order

    def _highest(self, key_id: str | None) -> dict[str, Any] | None:
        """{sequence, sha256} of the highest promoted for this key: order.json, raised by any
        promoted slot's status (so a lost order.json forgets nothing a slot still holds)."""
        key = _order_key(key_id)
        best = self._read_order().get(key)
        for s in SLOTS:
            st = self.slot_status(s)
            seq = st.get("sequence")
            ours = st.get("state") == PROMOTED and _order_key(st.get("key_id")) == key
            if ours and valid_sequence(seq) and (best is None or seq > best["sequence"]):
                best = {"sequence": seq, "sha256": st.get("sha256")}
        return best

    def highest_sequence(self, key_id: str | None) -> int | None:
        """The highest sequence promoted on this robot for artifacts signed by `key_id`."""
        best = self._highest(key_id)
        return None if best is None else int(best["sequence"])

    def order_verdict(self, manifest: dict, key_id: str | None) -> tuple[bool, str, str]:
        """(ok, reason, detail): may an artifact with this (verified) manifest, signed by
        `key_id`, be promoted? Refused "unordered" without a sequence, "downgrade" when older
        than the highest promoted for that key, or as old with another model. The same artifact
        sent again is fine."""
        seq = manifest.get("sequence") if isinstance(manifest, dict) else None
        if not valid_sequence(seq):
            return (
                False,
                UNORDERED,
                f"the manifest's sequence is {seq!r}, not an integer >= 1; sign it with "
                "stamp_and_sign (robonas deploy --key, or export with a key file)",
            )
        best = self._highest(key_id)
        if best is None:
            return True, OK, ""
        high = int(best["sequence"])
        sha = manifest.get("sha256")
        if seq < high:
            return (
                False,
                DOWNGRADE,
                f"sequence {seq} is older than {high}, the highest promoted here for key "
                f"{_order_key(key_id)}; an operator may roll back explicitly",
            )
        if seq == high and best.get("sha256") not in (None, sha):
            return (
                False,
                DOWNGRADE,
                f"sequence {seq} was promoted here with another model (sha256 {best['sha256']})",
            )
        return True, OK, ""

    def _raise_order(self, key_id: str | None, sequence: Any, sha256: Any) -> None:
        if not valid_sequence(sequence):
            return
        key = _order_key(key_id)
        order = self._read_order()
        best = order.get(key)
        if best is not None and sequence <= best["sequence"]:
            return  # a rollback, or the same artifact again: the highest never goes down
        order[key] = {"sequence": sequence, "sha256": sha256 if isinstance(sha256, str) else None}
        atomic_write(self.root / ORDER_FILE, json.dumps(order, sort_keys=True).encode("utf-8"))

    # --- writing ---------------------------------------------------------------------------
    def write_standby(self, model: bytes, manifest: dict, signature: str | None) -> str:
        """Write an artifact into the standby slot (not yet active, status "pending"); returns
        the slot name.

        The caller has verified it already; it is verified again from disk at commit."""
        from device_agents.signing import canonical_json

        slot = self.standby()
        # the slot is about to stop holding the previous policy: forget it first
        self._forget_previous(slot)
        d = self.slot_dir(slot)
        # "pending" first, so no crash can leave the new bytes beside an old "promoted"; the
        # signature before the manifest, so a torn write never pairs a new manifest with an old
        # signature that happens to verify something else
        sig_path = d / SIGNATURE_FILE
        try:
            self._write_status(slot, PENDING, manifest.get("sha256"), manifest.get("sequence"))
            if signature:
                atomic_write(sig_path, signature.encode("ascii") + b"\n")
            elif sig_path.exists():
                sig_path.unlink()
            atomic_write(d / MODEL_FILE, bytes(model))
            atomic_write(d / MANIFEST_FILE, canonical_json(manifest))
        except OSError as e:
            raise SlotError(f"cannot write slot {slot} under {d}: {e}") from e
        return slot

    def mark_rejected(self, slot: str, reason: str) -> None:
        """Record that `slot` failed (its canary): it is never activated by fallback or
        rollback, nor run without force (`runnable`). The active slot cannot be rejected."""
        _check_slot(slot)
        if slot == self.active:
            raise SlotError(f"slot {slot} is active; roll back or deploy over it before rejecting it")
        self._forget_previous(slot)
        try:
            manifest = _read_json(self.slot_dir(slot) / MANIFEST_FILE)
        except (OSError, ValueError):
            manifest = None
        status = self.slot_status(slot)
        m = manifest if isinstance(manifest, dict) else status
        try:
            self._write_status(slot, REJECTED, m.get("sha256"), m.get("sequence"), reason or "rejected")
        except OSError as e:
            raise SlotError(f"cannot mark slot {slot} rejected: {e}") from e

    def commit(self, slot: str, allow_downgrade: bool = False, allow_rejected: bool = False) -> None:
        """Make `slot` active (after verifying it from disk); the old active becomes previous.

        Refused (SlotError) when the slot does not verify, was rejected (unless
        `allow_rejected`), or is out of order for its key (`order_verdict`: no sequence, or
        older than the highest promoted) unless `allow_downgrade`, an operator's explicit
        request. The highest sequence is only ever raised."""
        info = self.inspect(_check_slot(slot))
        if not info.ok:
            raise SlotError(f"slot {slot} does not verify ({info.verdict.reason}); not committed")
        if info.state == REJECTED and not allow_rejected:
            raise SlotError(f"rejected: slot {slot} failed ({info.reason_rejected}); not committed")
        assert info.manifest is not None  # it verified
        ok, reason, detail = self.order_verdict(info.manifest, info.verdict.key_id)
        if not ok and not allow_downgrade:
            raise SlotError(f"{reason}: {detail}; slot {slot} not committed")
        old = self.active
        old_sha = self.state.get("active_sha256")
        try:
            self._write_status(slot, PROMOTED, info.sha256, info.sequence, key_id=info.verdict.key_id)
            self._raise_order(info.verdict.key_id, info.sequence, info.sha256)
            self._write_state(
                {
                    "active": slot,
                    "active_sha256": info.sha256,
                    "previous": old if old != slot else None,
                    "previous_sha256": old_sha if old != slot else None,
                }
            )
        except OSError as e:
            raise SlotError(f"cannot commit slot {slot}: {e}") from e

    def rollback(self) -> str:
        """Switch to the previous slot if it still holds a verified, promoted policy (an
        operator's explicit request: it may be older than the highest); returns it."""
        prev = self.previous
        if prev is None:
            raise SlotError(
                "no previous policy to roll back to (never replaced, or its slot has been overwritten since)"
            )
        info = self.inspect(prev)
        if not info.ok or info.sha256 != self.state.get("previous_sha256"):
            raise SlotError(f"previous slot {prev} no longer verifies ({info.verdict.reason})")
        if info.state not in (PROMOTED, UNKNOWN):  # UNKNOWN: a legacy slot state.json vouches for
            raise SlotError(f"previous slot {prev} is {info.state}, never promoted; not rolled back")
        self.commit(prev, allow_downgrade=True)
        return prev

    def runnable(self, slot: str, force: bool) -> None:
        """May `slot` be RUN? Raises SlotError("rejected ...") for a rejected or pending slot
        (or a legacy one `state.json` does not vouch for) unless `force`, an operator's
        explicit request. Does not verify the slot (`inspect` does)."""
        if force:
            return
        status = self.slot_status(slot)
        try:
            manifest = _read_json(self.slot_dir(slot) / MANIFEST_FILE)
        except (OSError, ValueError):
            manifest = None
        sha = manifest.get("sha256") if isinstance(manifest, dict) else None
        state = self._effective_state(status, sha)
        if state == PROMOTED or (state == UNKNOWN and slot in (self.active, self.previous)):
            return
        why = {
            REJECTED: f"was rejected ({status.get('reason')})",
            PENDING: "is pending (its canary has not passed)",
            UNKNOWN: "was never promoted on record",
        }.get(state, state)
        raise SlotError(f"rejected: slot {slot} {why}; run it only on an explicit request (force)")

    def status(self) -> dict[str, Any]:
        order = self._read_order()
        return {
            "active": self.active,
            "previous": self.previous,
            "slots": {s: self.inspect(s).summary() for s in SLOTS},
            "highest_sequence": {k: v["sequence"] for k, v in order.items()},
        }

    def active_info(self) -> SlotInfo | None:
        return None if self.active is None else self.inspect(self.active)
