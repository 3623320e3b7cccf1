"""Roll an artifact out to a fleet: K canary robots first, the rest only if every canary passed.

Leans on `robonas.fleet.client.AgentClient` for the conversation with each agent (which runs its
own canary episodes at DEPLOY_END and rolls itself back if they fail) and on
`robonas.fleet.reports` for the store rows. Robots are deployed one after another: a fleet is a
handful of robots behind one laptop, serial links are slow and the agent is single-session, so
sequential keeps the progress readable and the failure of one robot easy to attribute.

Every robot ends in one of four states (`RobotResult.status`): `ok`; `refused` (the agent said
NACK, e.g. a bad signature or a failed canary; `reason` is its code); `link-failure` (the link
dropped or timed out on every attempt; the agent keeps its previous policy, because the active
slot is only touched after DEPLOY_END passes); `skipped` (a canary failed, so it was not tried).
Link failures are retried `retries` times on a fresh link; a new DEPLOY_BEGIN abandons the
agent's half-received transfer, so a retry always starts from offset 0.

Signing at deploy time (`key`) stamps the manifest with a fresh `sequence` once per rollout
(`device_agents.signing.stamp_and_sign`) and sends that stamped manifest, with its signature,
to every robot: agents refuse artifacts older than the newest they promoted from that key, so
every robot of one rollout must see the same number, and the next rollout a higher one.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robonas.errors import ConfigError
from robonas.fleet.client import (
    AgentClient,
    AgentRefused,
    Canary,
    DeployResult,
    LinkFailure,
    fleet_credentials,
)
from robonas.fleet.inventory import AgentEntry, Inventory
from robonas.fleet.reports import (
    ArtifactRef,
    find_artifact,
    record_deployment,
    record_report,
    register_device,
)

if TYPE_CHECKING:
    from robonas.credentials import HostCredentials
    from robonas.store import Store

STATUSES = ("ok", "refused", "link-failure", "skipped")
RETRY_BACKOFF_S = 0.5  # wait before retry n: n x this (an agent re-listens after a dropped link)


@dataclass(frozen=True)
class RolloutEvent:
    """Progress of one robot: phase is connect / transfer / canary / retry / done / skipped."""

    agent: str
    phase: str
    bytes_sent: int = 0
    total: int = 0
    attempt: int = 1
    message: str = ""


@dataclass
class RobotResult:
    name: str
    role: str  # canary | fleet
    status: str = "skipped"
    reason: str = ""
    detail: str = ""
    attempts: int = 0
    deploy: dict[str, Any] | None = None
    previous: dict[str, Any] | None = None  # STATUS before the deploy (active slot, slots)
    deployment_id: int | None = None
    report_id: int | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class RolloutResult:
    artifact: str
    sha256: str
    size: int
    artifact_id: int | None
    canary_names: list[str]
    robots: list[RobotResult]
    sequence: int | None = None  # the manifest's ordering number as sent (stamped here with a key)

    @property
    def ok(self) -> bool:
        return bool(self.robots) and all(r.ok for r in self.robots)

    def get(self, name: str) -> RobotResult:
        for r in self.robots:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


ClientFactory = Callable[[AgentEntry], AgentClient]
Listener = Callable[[RolloutEvent], None]


def default_client(entry: AgentEntry, credentials: HostCredentials | None = None) -> AgentClient:
    return AgentClient.for_entry(entry, credentials)


def _sign(manifest: dict[str, Any], key: str | Path | None) -> tuple[dict[str, Any] | None, str | None]:
    """(stamped manifest, signature) signed now with the key file, or (None, None) without a key
    (the artifact's own manifest and `manifest.sig` are sent)."""
    if key is None:
        return None, None
    from device_agents.signing import SigningError, stamp_and_sign

    try:
        return stamp_and_sign(manifest, key)
    except SigningError as e:
        raise ConfigError(f"signing key {key}: {e}") from e


def _deploy_one(
    entry: AgentEntry,
    role: str,
    artifact_dir: Path,
    canary: Canary,
    signature: str | None,
    manifest: dict[str, Any] | None,
    retries: int,
    store: Store | None,
    ref: ArtifactRef,
    make_client: ClientFactory,
    emit: Listener,
    sha: str,
    sequence: int | None = None,
    allow_downgrade: bool = False,
) -> RobotResult:
    res = RobotResult(entry.name, role)
    outcome: DeployResult | None = None
    refusal: AgentRefused | None = None
    for attempt in range(1, retries + 2):
        res.attempts = attempt
        if attempt > 1:
            emit(RolloutEvent(entry.name, "retry", attempt=attempt, message=res.errors[-1]))
            time.sleep(RETRY_BACKOFF_S * (attempt - 1))
        client = make_client(entry)
        try:
            emit(RolloutEvent(entry.name, "connect", attempt=attempt))
            client.hello()
            status = client.status()
            if res.previous is None:
                res.previous = status
            if store is not None:
                register_device(store, entry.name, entry.device)

            def on_bytes(sent: int, total: int, _a: int = attempt) -> None:
                emit(RolloutEvent(entry.name, "transfer", sent, total, _a))
                if sent >= total:
                    emit(
                        RolloutEvent(
                            entry.name, "canary", sent, total, _a, f"{canary.episodes} canary episode(s)"
                        )
                    )

            # manifest only when signed here: None means the artifact's own, and clients that
            # predate the keyword (scripted ones in tests) keep working
            extra: dict[str, Any] = {} if manifest is None else {"manifest": manifest}
            if allow_downgrade:
                extra["allow_downgrade"] = True
            outcome = client.deploy(artifact_dir, canary, on_bytes, signature=signature, **extra)
            break
        except LinkFailure as e:
            res.errors.append(str(e))
        except AgentRefused as e:  # e.g. HELLO from an agent speaking another protocol
            refusal = e
            break
        finally:
            client.close()
    if refusal is not None:
        res.status, res.reason, res.detail = "refused", refusal.reason, str(refusal)
    elif outcome is None:
        res.status, res.reason = "link-failure", "link"
        res.detail = res.errors[-1] if res.errors else ""
    else:
        res.deploy = outcome.to_dict()
        res.status = "ok" if outcome.ok else "refused"
        res.reason, res.detail = outcome.reason, outcome.detail
    emit(
        RolloutEvent(
            entry.name,
            "done",
            attempt=res.attempts,
            message=res.status if res.ok else f"{res.status}: {res.reason} {res.detail}",
        )
    )
    if store is not None:
        _store(store, entry, res, outcome, ref, sha, sequence)
    return res


def _store(
    store: Store,
    entry: AgentEntry,
    res: RobotResult,
    outcome: DeployResult | None,
    ref: ArtifactRef,
    sha: str,
    sequence: int | None,
) -> None:
    detail = {
        "sha256": sha,
        "sequence": sequence,
        "role": res.role,
        "reason": res.reason,
        "detail": res.detail,
        "attempts": res.attempts,
        "errors": res.errors,
        "link": entry.link,
        "previous_active": (res.previous or {}).get("active"),
    }
    if outcome is not None:
        detail.update(
            slot=outcome.slot,
            active=outcome.active,
            step=outcome.step,
            bytes=outcome.size,
            transfer_s=outcome.transfer_s,
            total_s=outcome.total_s,
        )
    res.deployment_id = record_deployment(store, ref, entry.name, res.status, detail)
    if outcome is not None and outcome.canary:
        report = dict(outcome.canary)
        report.setdefault("sha256", sha)
        report.setdefault("slot", outcome.slot)
        res.report_id = record_report(
            store,
            entry.name,
            "canary",
            report,
            ref,
            link=entry.link,
            passed=outcome.ok,
            reason=outcome.reason,
            transfer_s=outcome.transfer_s,
            total_s=outcome.total_s,
            deployment_id=res.deployment_id,
        )


def rollout(
    artifact_dir: str | Path,
    inventory: Inventory,
    agents: Sequence[str] | str | None = None,
    canary_count: int = 1,
    episodes: int = 3,
    *,
    seed: int = 0,
    min_return: float | None = None,
    max_miss_rate: float | None = None,
    max_steps: int | None = None,
    store: Store | None = None,
    retries: int = 1,
    key: str | Path | None = None,
    progress: Listener | None = None,
    client_factory: ClientFactory | None = None,
    allow_downgrade: bool = False,
) -> RolloutResult:
    """Deploy `artifact_dir` to the selected agents, canaries first; see the module docstring.

    `agents` selects robots by name (default: all, in file order); the first `canary_count` of
    them are the canaries. `allow_downgrade` asks each agent to accept the artifact even if it is
    older than the newest it has promoted (measuring earlier candidates; the operator needs the
    rollback role). `key` (a private key file) stamps a fresh `sequence` into the
    manifest and signs it now, once for the whole rollout (else the artifact's manifest and
    `manifest.sig` are sent). With a `store`, every robot's device row, deployment row and
    canary report are written.
    """
    if isinstance(canary_count, bool) or not isinstance(canary_count, int) or canary_count < 0:
        raise ConfigError(f"canary count: {canary_count!r} must be an integer >= 0")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"retries: {retries!r} must be an integer >= 0")
    canary = Canary(
        episodes=episodes, seed=seed, min_return=min_return, max_miss_rate=max_miss_rate, max_steps=max_steps
    )
    from robonas.fleet.client import read_artifact

    manifest, model, _sig = read_artifact(artifact_dir)
    sent_manifest, signature = _sign(manifest, key)
    from device_agents.signing import valid_sequence

    seq = (sent_manifest or manifest).get("sequence")
    sequence = seq if valid_sequence(seq) else None
    sha = hashlib.sha256(model).hexdigest()
    selected = inventory.select(agents)
    ref = find_artifact(store, artifact_dir, manifest) if store is not None else ArtifactRef(None, None)
    emit = progress or (lambda _e: None)
    if client_factory is not None:
        make_client = client_factory
    else:
        credentials = fleet_credentials(inventory)

        def make_client(entry: AgentEntry) -> AgentClient:
            return default_client(entry, credentials)

    k = min(canary_count, len(selected))
    canaries, rest = selected[:k], selected[k:]

    results: list[RobotResult] = []
    for entry in canaries:
        results.append(
            _deploy_one(
                entry,
                "canary",
                Path(artifact_dir),
                canary,
                signature,
                sent_manifest,
                retries,
                store,
                ref,
                make_client,
                emit,
                sha,
                sequence,
                allow_downgrade,
            )
        )
    failed = [r.name for r in results if not r.ok]
    for entry in rest:
        if failed:
            res = RobotResult(
                entry.name,
                "fleet",
                "skipped",
                "canary failed",
                f"canary robot(s) {', '.join(failed)} did not pass",
            )
            emit(RolloutEvent(entry.name, "skipped", message=res.detail))
            results.append(res)
            continue
        results.append(
            _deploy_one(
                entry,
                "fleet",
                Path(artifact_dir),
                canary,
                signature,
                sent_manifest,
                retries,
                store,
                ref,
                make_client,
                emit,
                sha,
                sequence,
                allow_downgrade,
            )
        )
    return RolloutResult(
        str(artifact_dir),
        sha,
        len(model),
        ref.artifact_id,
        [e.name for e in canaries],
        results,
        sequence,
    )


__all__ = ["STATUSES", "RobotResult", "RolloutEvent", "RolloutResult", "rollout"]
