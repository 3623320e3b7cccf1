"""Rollouts: one artifact sent to a fleet in phases, with health gates between the phases, kept in
the store so that a rollout the host lost (killed, laptop closed) resumes where it stopped.

How a rollout goes (the model is Mender's and AWS IoT jobs' phased deployments):
- `start_rollout` checks everything before any robot is touched: the robots selected (names, a
  group such as `site=lab-a`), that the artifact is for their kind, and that the phase plan
  ("1,10%,rest") adds up. It stores the rollout, its plan and one row per robot.
- `run_rollout` works the phases in order. In a phase, up to `concurrency` robots are updated at
  once (threads: each transfer is a blocking conversation over its own link). A robot that
  already runs the artifact is marked updated without a transfer, so a resumed rollout never
  sends twice. A robot whose link fails on every attempt is `offline`: it stays pending for
  `resume`, and the phase's gate is judged on the robots that were reached.
- After a phase, its gate: the share of reached robots whose canary passed, their deadline-miss
  rate, and their mean canary return against the fleet's current policy on the same robots (the
  canary reports in the store), after a soak time in which every updated robot must keep the new
  policy. A failed gate stops the rollout (`aborted`) and, with `rollback`, switches the phase's
  updated robots back to their previous slot. The report says which gate failed, with figures.
- `pause` and `abort` are store writes that a running rollout reads before each robot.

Each robot's own conversation (retries with backoff, the agent's canary, store rows) is
`robonas.fleet.deploy._deploy_one`, shared with `robonas deploy`.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robonas.errors import ConfigError, RobonasError
from robonas.fleet.client import AgentClient, Canary, LinkFailure, read_artifact
from robonas.fleet.deploy import RETRY_BACKOFF_S, Listener, RolloutEvent, _deploy_one, _sign
from robonas.fleet.inventory import AgentEntry, Inventory

if TYPE_CHECKING:
    from robonas.store import RolloutRobotRow, RolloutRow, Store

ClientFactory = Callable[[AgentEntry], AgentClient]
# states a robot may be in when a phase (re)starts and still needs the artifact
TO_DO = ("pending", "offline", "sending")
# how often a running rollout looks at its status for a pause or an abort (seconds)
CONTROL_POLL_S = 0.5


@dataclass(frozen=True)
class Gates:
    """What a phase must show before the next one starts."""

    min_pass_rate: float = 1.0  # share of the reached robots whose canary passed
    max_miss_rate: float | None = None  # mean deadline-miss rate of the updated robots' canaries
    max_return_drop: float | None = (
        None  # largest drop of the mean canary return, as a share of the current policy's
    )
    soak_s: float = 0.0  # wait this long after the phase; the updated robots must still run it

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_pass_rate <= 1.0:
            raise ConfigError(f"--min-pass-rate: {self.min_pass_rate!r} must lie in [0, 1]")
        if self.max_miss_rate is not None and not 0.0 <= self.max_miss_rate <= 1.0:
            raise ConfigError(f"--max-miss-rate: {self.max_miss_rate!r} must lie in [0, 1]")
        if self.max_return_drop is not None and not self.max_return_drop >= 0.0:
            raise ConfigError(f"--max-return-drop: {self.max_return_drop!r} must be >= 0 (a share, e.g. 0.1)")
        if not self.soak_s >= 0.0:
            raise ConfigError(f"--soak: {self.soak_s!r} must be >= 0 seconds")


@dataclass(frozen=True)
class RolloutPlan:
    phases: tuple[int, ...]  # robots per phase, in order
    concurrency: int
    gates: Gates = field(default_factory=Gates)
    rollback: bool = True  # a failed gate switches the phase's updated robots back
    canary: dict[str, Any] = field(default_factory=dict)  # Canary fields
    retries: int = 2
    # the manifest and signature every robot gets, fixed at the start (a resume re-sends the same)
    manifest: dict[str, Any] | None = None
    signature: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolloutPlan:
        return cls(
            phases=tuple(d["phases"]),
            concurrency=int(d["concurrency"]),
            gates=Gates(**d.get("gates", {})),
            rollback=bool(d.get("rollback", True)),
            canary=dict(d.get("canary", {})),
            retries=int(d.get("retries", 2)),
            manifest=d.get("manifest"),
            signature=d.get("signature"),
        )


def parse_phases(spec: str, n: int) -> tuple[int, ...]:
    """Robots per phase from "1,10%,rest": counts, percentages of the `n` selected (rounded up)
    and a final "rest"; they must cover the `n` robots exactly."""
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or any(not p for p in parts):
        raise ConfigError(f"--phases: {spec!r} is not a list like 1,10%,rest")
    sizes: list[int] = []
    for i, p in enumerate(parts):
        if p == "rest":
            if i != len(parts) - 1:
                raise ConfigError(f"--phases: {spec!r}: 'rest' must be the last phase")
            size = n - sum(sizes)
            if size <= 0:
                raise ConfigError(
                    f"--phases: {spec!r}: the phases before 'rest' already cover the {n} robots"
                )
        elif p.endswith("%"):
            try:
                share = float(p[:-1])
            except ValueError:
                raise ConfigError(f"--phases: {p!r} is not a percentage like 10%") from None
            if not 0.0 < share <= 100.0:
                raise ConfigError(f"--phases: {p!r} must lie in (0%, 100%]")
            size = max(1, math.ceil(n * share / 100.0))
        else:
            if not p.isdigit() or int(p) == 0:
                raise ConfigError(f"--phases: {p!r} is not a positive robot count, a percentage or 'rest'")
            size = int(p)
        sizes.append(size)
    if sum(sizes) != n:
        raise ConfigError(
            f"--phases: {spec!r} covers {sum(sizes)} of the {n} robots selected; "
            f"make the phases add up to {n} or end with 'rest'"
        )
    return tuple(sizes)


def artifact_kind(manifest: dict[str, Any]) -> str | None:
    """The robot kind an artifact is for: the env id its policy was trained on."""
    kind = manifest.get("env_id") or (manifest.get("spaces") or {}).get("env_id")
    return str(kind) if kind else None


def start_rollout(
    store: Store,
    artifact_dir: str | Path,
    inventory: Inventory,
    fleet_path: str,
    *,
    phases: str = "1,10%,rest",
    concurrency: int = 4,
    group: str | None = None,
    agents: Sequence[str] | str | None = None,
    gates: Gates | None = None,
    rollback: bool = True,
    canary: Canary | None = None,
    retries: int = 2,
    key: str | Path | None = None,
) -> RolloutRow:
    """Check and store a rollout; nothing is sent (`run_rollout` does that)."""
    from robonas.fleet.inventory import robot_kind

    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigError(f"--concurrency: {concurrency!r} must be an integer >= 1")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"--retries: {retries!r} must be an integer >= 0")
    manifest, model, _sig = read_artifact(artifact_dir)
    selected = inventory.where(group)
    if agents:
        named = {e.name for e in inventory.select(agents)}
        selected = [e for e in selected if e.name in named]
    if not selected:
        raise ConfigError(f"no robot is both in group {group!r} and among --agents {agents!r}")
    kind = artifact_kind(manifest)
    other = [(e.name, robot_kind(e)) for e in selected if robot_kind(e) != kind]
    if other:
        shown = ", ".join(
            f"{name} ({k or 'kind unknown: set kind in the fleet file'})" for name, k in other[:5]
        )
        more = f" and {len(other) - 5} more" if len(other) > 5 else ""
        raise ConfigError(f"artifact {artifact_dir} is for {kind}; not for robot(s) {shown}{more}")
    sizes = parse_phases(phases, len(selected))
    sent_manifest, signature = _sign(manifest, key)
    plan = RolloutPlan(
        phases=sizes,
        concurrency=concurrency,
        gates=gates or Gates(),
        rollback=rollback,
        canary=asdict(canary or Canary()),
        retries=retries,
        manifest=sent_manifest,
        signature=signature,
    )
    robots: list[tuple[str, int]] = []
    for phase, size in enumerate(sizes):
        robots += [(e.name, phase) for e in selected[len(robots) : len(robots) + size]]
    sha = hashlib.sha256(model).hexdigest()
    return store.create_rollout(str(Path(artifact_dir).resolve()), sha, fleet_path, plan.to_dict(), robots)


@dataclass
class _Run:
    """What the threads of one `run_rollout` share."""

    store: Store
    rollout: RolloutRow
    plan: RolloutPlan
    entries: dict[str, AgentEntry]
    make_client: ClientFactory
    emit: Listener
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    peak: int = 0
    stopped: str | None = None  # "paused" / "aborted" once seen
    last_look: float = 0.0
    # the artifact's store row and the sequence every robot is sent, found once per run
    ref: Any = None
    sequence: int | None = None

    def should_stop(self) -> bool:
        """A pause or an abort written by another command (looked up at most every
        CONTROL_POLL_S)."""
        with self.lock:
            if self.stopped is not None:
                return True
            now = time.monotonic()
            if now - self.last_look < CONTROL_POLL_S:
                return False
            self.last_look = now
        status = self.store.get_rollout(self.rollout.id).status
        if status in ("paused", "aborted"):
            with self.lock:
                self.stopped = status
            return True
        return False


def _active_sha(status: dict[str, Any]) -> str | None:
    active = status.get("active")
    return ((status.get("slots") or {}).get(active) or {}).get("sha256") if active else None


def _update_robot(run: _Run, row: RolloutRobotRow) -> None:
    """One robot of a phase: skip it when it already runs the artifact, else deploy."""
    if run.should_stop():
        return
    entry = run.entries[row.name]
    store, rid, sha = run.store, run.rollout.id, run.rollout.sha256
    with run.lock:
        run.in_flight += 1
        run.peak = max(run.peak, run.in_flight)
    try:
        status = None
        for attempt in range(run.plan.retries + 1):
            if attempt:
                time.sleep(RETRY_BACKOFF_S * attempt)
            client = run.make_client(entry)
            try:
                client.hello()
                status = client.status()
                break
            except LinkFailure as e:
                run.emit(RolloutEvent(entry.name, "retry", attempt=attempt + 1, message=str(e)))
            finally:
                client.close()
        if status is None:
            store.set_rollout_robot(rid, row.name, "offline", {"reason": "no answer", "at": time.time()})
            run.emit(RolloutEvent(entry.name, "done", message="offline"))
            return
        if _active_sha(status) == sha:
            # a host lost after the robot promoted the artifact: it is updated; send nothing
            store.set_rollout_robot(
                rid, row.name, "updated", {"already_running": True, "finished_at": time.time()}
            )
            run.emit(RolloutEvent(entry.name, "done", message="already runs it"))
            return
        previous = row.detail.get("previous_sha256") or _active_sha(status)
        store.set_rollout_robot(
            rid,
            row.name,
            "sending",
            {"previous_sha256": previous, "started_at": time.time()},
            attempt=True,
        )
        res = _deploy_one(
            entry,
            "canary" if row.phase == 0 else "fleet",
            Path(run.rollout.artifact),
            Canary(**run.plan.canary),
            run.plan.signature,
            run.plan.manifest,
            run.plan.retries,
            store,
            run.ref,
            run.make_client,
            run.emit,
            sha,
            run.sequence,
        )
        canary = (res.deploy or {}).get("canary") or {}
        detail = {
            "finished_at": time.time(),
            "reason": res.reason,
            "detail": res.detail[:500],
            "mean_return": canary.get("mean_return"),
            "miss_rate": canary.get("miss_rate"),
        }
        state = {"ok": "updated", "refused": "failed"}.get(res.status, "offline")
        store.set_rollout_robot(rid, row.name, state, detail)
    finally:
        with run.lock:
            run.in_flight -= 1


def _baseline_return(store: Store, robot: str, sha: str | None) -> float | None:
    """The robot's newest canary mean return on the policy it ran before (None if never seen)."""
    if not sha:
        return None
    for r in reversed(store.device_reports(device=robot, kind="canary")):
        if r.payload.get("sha256") == sha and r.payload.get("mean_return") is not None:
            return float(r.payload["mean_return"])
    return None


def _gate(run: _Run, phase: int, robots: list[RolloutRobotRow]) -> dict[str, Any]:
    """The phase's verdict: {"phase", "ok", "figures", "failures": [{"gate", "value", "limit",
    "robots"}], "notes"}."""
    g = run.plan.gates
    reached = [r for r in robots if r.state in ("updated", "failed")]
    updated = [r for r in reached if r.state == "updated"]
    figures: dict[str, Any] = {"robots": len(robots), "reached": len(reached), "updated": len(updated)}
    failures: list[dict[str, Any]] = []
    notes: list[str] = []
    if not reached:
        return {"phase": phase, "ok": False, "waiting": True, "figures": figures, "failures": [], "notes": []}
    if g.soak_s > 0 and updated:
        time.sleep(g.soak_s)
        fell_back = [r.name for r in updated if not _still_runs(run, r.name)]
        figures["fell_back"] = len(fell_back)
        if fell_back:
            failures.append({"gate": "soak", "value": len(fell_back), "limit": 0, "robots": fell_back})
    pass_rate = len(updated) / len(reached)
    figures["pass_rate"] = pass_rate
    if pass_rate < g.min_pass_rate:
        bad = [r.name for r in reached if r.state == "failed"]
        failures.append({"gate": "pass_rate", "value": pass_rate, "limit": g.min_pass_rate, "robots": bad})
    misses = [float(r.detail["miss_rate"]) for r in updated if r.detail.get("miss_rate") is not None]
    if misses:
        figures["miss_rate"] = sum(misses) / len(misses)
        if g.max_miss_rate is not None and figures["miss_rate"] > g.max_miss_rate:
            worst = sorted(
                (r for r in updated if r.detail.get("miss_rate") is not None),
                key=lambda r: -r.detail["miss_rate"],
            )
            failures.append(
                {
                    "gate": "miss_rate",
                    "value": figures["miss_rate"],
                    "limit": g.max_miss_rate,
                    "robots": [r.name for r in worst if r.detail["miss_rate"] > g.max_miss_rate],
                }
            )
    pairs = []
    for r in updated:
        base = _baseline_return(run.store, r.name, r.detail.get("previous_sha256"))
        if base is not None and r.detail.get("mean_return") is not None:
            pairs.append((r.name, base, float(r.detail["mean_return"])))
    if pairs:
        base_mean = sum(b for _, b, _ in pairs) / len(pairs)
        new_mean = sum(n for _, _, n in pairs) / len(pairs)
        drop = (base_mean - new_mean) / abs(base_mean) if base_mean else 0.0
        figures.update(current_return=base_mean, new_return=new_mean, return_drop=drop, compared=len(pairs))
        if g.max_return_drop is not None and drop > g.max_return_drop:
            worse = [name for name, b, n in pairs if n < b]
            failures.append(
                {"gate": "return_drop", "value": drop, "limit": g.max_return_drop, "robots": worse}
            )
    elif g.max_return_drop is not None:
        notes.append("return gate not judged: no canary report of the current policy on these robots")
    return {"phase": phase, "ok": not failures, "figures": figures, "failures": failures, "notes": notes}


def _still_runs(run: _Run, name: str) -> bool:
    client = run.make_client(run.entries[name])
    try:
        client.hello()
        return _active_sha(client.status()) == run.rollout.sha256
    except LinkFailure:
        return False  # not reachable after the soak: not counted as healthy
    finally:
        client.close()


def _roll_back(run: _Run, robots: list[RolloutRobotRow]) -> dict[str, Any]:
    """Switch the phase's updated robots back to their previous slot, in parallel."""
    t0 = time.monotonic()
    done: list[str] = []
    failed: dict[str, str] = {}

    def one(r: RolloutRobotRow) -> None:
        client = run.make_client(run.entries[r.name])
        try:
            client.hello()
            if _active_sha(client.status()) != run.rollout.sha256:
                done.append(r.name)  # it is not on the new policy (e.g. its agent fell back)
            else:
                client.rollback()
                done.append(r.name)
            run.store.set_rollout_robot(
                run.rollout.id, r.name, "rolled-back", {"rolled_back_at": time.time()}
            )
            run.emit(RolloutEvent(r.name, "done", message="rolled back"))
        except RobonasError as e:
            failed[r.name] = str(e)
        finally:
            client.close()

    targets = [r for r in robots if r.state == "updated"]
    with ThreadPoolExecutor(max_workers=max(1, run.plan.concurrency)) as pool:
        list(pool.map(one, targets))
    return {"rolled_back": sorted(done), "rollback_failed": failed, "rollback_s": time.monotonic() - t0}


def run_rollout(
    store: Store,
    rollout_id: int,
    inventory: Inventory,
    *,
    client_factory: ClientFactory | None = None,
    progress: Listener | None = None,
) -> RolloutRow:
    """Run (or resume) a stored rollout until it completes, stops at a gate, is paused or
    aborted, or is left waiting for offline robots; returns its row as it then is."""
    rollout = store.get_rollout(rollout_id)
    if rollout.status in ("complete", "aborted"):
        return rollout
    plan = RolloutPlan.from_dict(rollout.plan)
    manifest, model, _sig = read_artifact(rollout.artifact)
    if hashlib.sha256(model).hexdigest() != rollout.sha256:
        raise ConfigError(
            f"artifact {rollout.artifact} changed since rollout {rollout_id} started; start a new rollout"
        )
    robots = store.rollout_robots(rollout_id)
    missing = sorted({r.name for r in robots} - set(inventory.names))
    if missing:
        raise ConfigError(
            f"{inventory.origin}: robot(s) {', '.join(missing)} of rollout {rollout_id} are not in it"
        )
    if client_factory is None:
        from robonas.fleet.client import fleet_credentials

        credentials = fleet_credentials(inventory)

        def client_factory(entry: AgentEntry) -> AgentClient:
            return AgentClient.for_entry(entry, credentials)

    store.set_rollout_status(rollout_id, "running")
    run = _Run(
        store,
        store.get_rollout(rollout_id),
        plan,
        {e.name: e for e in inventory.agents},
        client_factory,
        progress or (lambda _e: None),
    )
    from robonas.fleet.reports import find_artifact

    run.ref = find_artifact(store, rollout.artifact, manifest)
    sequence = (plan.manifest or manifest).get("sequence")
    run.sequence = sequence if isinstance(sequence, int) else None
    report: dict[str, Any] = dict(rollout.report)
    gates: dict[str, Any] = dict(report.get("gates", {}))
    for phase in range(len(plan.phases)):
        members = [r for r in store.rollout_robots(rollout_id) if r.phase == phase]
        todo = [r for r in members if r.state in TO_DO]
        if todo:
            with ThreadPoolExecutor(max_workers=plan.concurrency, thread_name_prefix=f"phase{phase}") as pool:
                list(pool.map(lambda r: _update_robot(run, r), todo))
        report["peak_concurrency"] = max(run.peak, int(report.get("peak_concurrency", 0)))
        if run.stopped is not None or run.should_stop():
            store.set_rollout_status(rollout_id, run.stopped or "paused", {**report, "gates": gates})
            return store.get_rollout(rollout_id)
        members = [r for r in store.rollout_robots(rollout_id) if r.phase == phase]
        verdict = _gate(run, phase, members)
        gates[str(phase)] = verdict
        if verdict.get("waiting"):
            report.update(gates=gates, stopped_at_phase=phase)
            store.set_rollout_status(rollout_id, "incomplete", report)
            return store.get_rollout(rollout_id)
        if not verdict["ok"]:
            failed_at = time.monotonic()
            if plan.rollback:
                verdict.update(_roll_back(run, members))
                verdict["gate_to_rolled_back_s"] = time.monotonic() - failed_at
            later = [r for r in store.rollout_robots(rollout_id) if r.phase > phase and r.state in TO_DO]
            for r in later:
                store.set_rollout_robot(
                    rollout_id, r.name, "skipped", {"reason": f"gate of phase {phase + 1} failed"}
                )
            report.update(gates=gates, stopped_at_phase=phase)
            store.set_rollout_status(rollout_id, "aborted", report)
            return store.get_rollout(rollout_id)
        report["gates"] = gates
        store.set_rollout_status(rollout_id, "running", report)
    left = [r for r in store.rollout_robots(rollout_id) if r.state in TO_DO]
    store.set_rollout_status(rollout_id, "incomplete" if left else "complete", report)
    return store.get_rollout(rollout_id)


def set_control(store: Store, rollout_id: int, status: str) -> RolloutRow:
    """`pause` or `abort` a rollout (a running host stops before its next robot)."""
    rollout = store.get_rollout(rollout_id)
    if rollout.status in ("complete", "aborted"):
        verb = {"paused": "pause", "aborted": "abort"}.get(status, status)
        raise ConfigError(f"rollout {rollout_id} is {rollout.status}; nothing to {verb}")
    store.set_rollout_status(rollout_id, status)
    return store.get_rollout(rollout_id)


__all__ = [
    "Gates",
    "RolloutPlan",
    "artifact_kind",
    "parse_phases",
    "run_rollout",
    "set_control",
    "start_rollout",
]
