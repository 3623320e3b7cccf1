"""What the fleet commands write to the run store: devices, deployments and device reports.

Leans on `robonas.store.Store` (SQLAlchemy); this module only decides which rows a deploy, a
canary, a run or a bench makes, and how an agent's report is tied back to an artifact row:
- an artifact directory is matched to its `artifacts` row through the manifest's `trial` and
  the model's sha256 (what `robonas export` records), preferring the row with the same path;
- a report about whatever model is active on a robot is matched through the sha256 it carries
  and the latest deployment of that sha256 to that robot.
A deployment row needs an artifact row (the table's foreign key), so deploying an artifact that
was never indexed in the store records devices and reports but no deployment; the rollout says so.

A run asked with `record=True` brings the agent's record of its episodes (step by step, see
`device_agents.trajectory`): it stays in the report's payload as the encoded dict under
`"record"` (no table of its own), and `episodes_of` reads it back as `Episode`s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robonas.errors import StoreError
from robonas.store import DeviceReportRow, Store

if TYPE_CHECKING:
    from device_agents.trajectory import Episode


@dataclass(frozen=True)
class ArtifactRef:
    """The store's ids for an artifact: None when the artifact is not indexed."""

    artifact_id: int | None
    trial_id: int | None


def _same_path(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def find_artifact(store: Store, artifact_dir: str | Path, manifest: dict[str, Any]) -> ArtifactRef:
    """The artifacts row of this directory (by the manifest's trial and sha256), if any."""
    trial = manifest.get("trial")
    sha = manifest.get("sha256")
    if isinstance(trial, bool) or not isinstance(trial, int) or not isinstance(sha, str):
        return ArtifactRef(None, None)
    rows = [r for r in store.artifacts(trial) if r.sha256 == sha]
    if not rows:
        return ArtifactRef(None, None)
    same = [r for r in rows if _same_path(r.path, artifact_dir)]
    row = (same or rows)[-1]
    return ArtifactRef(row.id, row.trial_id)


def artifact_for_sha(store: Store, device: str, sha256: str | None) -> ArtifactRef:
    """The artifact last deployed to `device` with this model sha256 (None if none was)."""
    if not sha256:
        return ArtifactRef(None, None)
    for dep in reversed(store.deployments(device=device)):
        if dep.detail.get("sha256") == sha256:
            art = store.get_artifact(dep.artifact_id)
            return ArtifactRef(art.id, art.trial_id)
    return ArtifactRef(None, None)


def register_device(store: Store, name: str, profile: str, seen: bool = True) -> None:
    """Add (or update) the robot's device row; `seen` stamps last_seen now."""
    store.add_device(name, profile, last_seen=datetime.now(UTC) if seen else None)


def record_deployment(
    store: Store, ref: ArtifactRef, device: str, status: str, detail: dict[str, Any]
) -> int | None:
    """A deployments row (None when the artifact is not in the store)."""
    if ref.artifact_id is None:
        return None
    return store.add_deployment(ref.artifact_id, device, status, detail).id


def record_report(
    store: Store, device: str, kind: str, report: dict[str, Any], ref: ArtifactRef, **host: Any
) -> int:
    """A device_reports row: the agent's report as sent, plus what the host knows about it
    (`host` keyword arguments, e.g. link, episodes, seed, wall_s) and the host's clock."""
    payload = dict(report)
    payload["host"] = {**host, "received_unix": time.time()}
    return store.add_device_report(
        device, kind, payload, artifact_id=ref.artifact_id, trial_id=ref.trial_id
    ).id


def last_reports(store: Store, device: str) -> dict[str, DeviceReportRow]:
    """The newest report of each kind for `device` ({kind: row})."""
    out: dict[str, DeviceReportRow] = {}
    for row in store.device_reports(device=device):
        out[row.kind] = row  # rows come in id order: the last one wins
    return out


def has_record(report: DeviceReportRow | dict[str, Any]) -> bool:
    """True if the report (a stored row or its payload) carries a record of its episodes."""
    payload = report.payload if isinstance(report, DeviceReportRow) else report
    return isinstance(payload.get("record"), dict)


def episodes_of(report: DeviceReportRow | dict[str, Any]) -> list[Episode]:
    """The recorded episodes of a device report (a stored row or its payload), oldest first;
    [] when the run was not recorded. A malformed record is a StoreError naming the report and
    the field."""
    from device_agents.errors import DeviceError
    from device_agents.trajectory import decode

    payload = report.payload if isinstance(report, DeviceReportRow) else report
    record = payload.get("record")
    if record is None:
        return []
    try:
        return decode(record)
    except DeviceError as e:
        which = f"device report {report.id}" if isinstance(report, DeviceReportRow) else "device report"
        raise StoreError(f"{which}: {e}") from e


def recorded_reports(store: Store, device: str | None = None, kind: str = "run") -> list[DeviceReportRow]:
    """The reports (of `device`, or every device) that carry a record, oldest first."""
    return [r for r in store.device_reports(device=device, kind=kind) if has_record(r)]


def summarise_report(payload: dict[str, Any]) -> dict[str, Any]:
    """p50/p99 ms, deadline misses and mean return of a stored report, for tables."""
    timings = payload.get("timings_ms") or {}
    returns = payload.get("returns") or []
    nums = [float(r) for r in returns if isinstance(r, (int, float))]
    return {
        "p50_ms": timings.get("p50"),
        "p99_ms": timings.get("p99"),
        "deadline_misses": payload.get("deadline_misses"),
        "mean_return": sum(nums) / len(nums) if nums else None,
        "episodes": len(nums) if nums else None,
    }


__all__ = [
    "ArtifactRef",
    "artifact_for_sha",
    "episodes_of",
    "find_artifact",
    "has_record",
    "last_reports",
    "record_deployment",
    "record_report",
    "recorded_reports",
    "register_device",
    "summarise_report",
]
