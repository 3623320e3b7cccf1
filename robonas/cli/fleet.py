"""The field engineer's commands: `robonas deploy` and `robonas fleet status|rollback|run`.

Typer for arguments, rich for tables and the per-robot progress of a deploy. Heavy modules
(the store's SQLAlchemy, the artifact reader's TFLite runtime) are imported inside the commands
so `robonas --help` stays fast. Bad input (RobonasError, DeviceError) becomes one line on stderr
and exit code 2, and so does a run where any robot failed, after the table has been printed.
Models are refitted and studies re-ranked after a deploy or run only from the robots that sent a
report; when none did, one stderr line says so and why, and nothing is touched.

The lead mounts these on the main app:
    app.command("deploy")(deploy_command)
    app.add_typer(fleet_app, name="fleet")
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import TaskID

    from robonas.fleet.deploy import RobotResult, RolloutEvent, RolloutResult
    from robonas.fleet.inventory import Inventory
    from robonas.store import Store

fleet_app = typer.Typer(help="Robots in a fleet file: status, rollback, fresh runs.", no_args_is_help=True)

# rich reads [..] as markup: escaped brackets print as written
_FLEET_HELP = "Fleet inventory TOML (one \\[\\[agent]] per robot), e.g. launch/fleet.toml."
_STORE_HELP = "Store URL (default: $ROBONAS_STORE or sqlite:///runs/robonas.db)."
_AGENTS_HELP = "Comma-separated agent names (default: every agent in the fleet file)."
_NO_REFIT_HELP = (
    "Store the reports but do not refit twins, latency or gap models or re-rank "
    "(`robonas calibrate` and `robonas identify` refit by hand)."
)

T = TypeVar("T")


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    # piped: wide tables unless the user says how wide (COLUMNS)
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console(stderr=stderr)
    return Console(width=160, stderr=stderr)


def _fail(message: str) -> NoReturn:
    """One line on stderr, exit 2 (the same form as robonas.cli.app.main's handler)."""
    print(f"robonas: error: {' '.join(message.split())}", file=sys.stderr)
    raise typer.Exit(2)


def _guard(fn: Callable[[], T]) -> T:
    """Run fn(); RobonasError/DeviceError -> one line and exit 2 (also when mounted elsewhere)."""
    from device_agents.errors import DeviceError
    from robonas.errors import RobonasError

    try:
        return fn()
    except (RobonasError, DeviceError) as e:
        _fail(str(e))


def _open_store(url: str | None) -> Store:
    from robonas.store import Store

    return Store(url)


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


# ------------------------------------------------------------------------------------ deploy
def deploy_command(
    artifact: str = typer.Argument(
        ..., help="Artifact directory (policy.tflite, manifest.json, manifest.sig)."
    ),
    fleet: str = typer.Option(..., "--fleet", help=_FLEET_HELP),
    agents: str | None = typer.Option(None, "--agents", help=_AGENTS_HELP),
    canary: int = typer.Option(
        1, "--canary", help="Robots deployed first; the rest only if all of them pass."
    ),
    episodes: int = typer.Option(3, "--episodes", help="Canary episodes each agent runs before switching."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first canary episode."),
    min_return: float | None = typer.Option(
        None, "--min-return", help="Canary fails below this mean return."
    ),
    max_miss_rate: float | None = typer.Option(
        None, "--max-miss-rate", help="Canary fails above this deadline-miss rate (0-1)."
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", min=1, help="Cap on each canary episode's steps."
    ),
    retries: int = typer.Option(1, "--retries", help="Retries per robot after a link failure."),
    key: str | None = typer.Option(
        None, "--key", help="Ed25519 private key: sign the manifest now instead of sending manifest.sig."
    ),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the per-robot results as JSON."),
    no_refit: bool = typer.Option(False, "--no-refit", help=_NO_REFIT_HELP),
    allow_downgrade: bool = typer.Option(
        False,
        "--allow-downgrade",
        help="Accept an artifact older than the newest a robot runs (measuring earlier candidates, "
        "or going back on purpose); the operator needs the rollback role.",
    ),
) -> None:
    """Push a signed artifact to the fleet: canaries first, then the rest if every canary passed.

    Robots refuse artifacts older than the newest they have promoted (signed sequence); sign at
    deploy time with --key to make this one the newest, or pass --allow-downgrade."""
    result = _guard(
        lambda: _deploy(
            artifact,
            fleet,
            agents,
            canary,
            episodes,
            seed,
            min_return,
            max_miss_rate,
            max_steps,
            retries,
            key,
            store,
            as_json,
            not no_refit,
            allow_downgrade,
        )
    )
    if not result.ok:
        bad = [
            f"{r.name} {r.status}" + (f" ({r.reason})" if r.reason else "") for r in result.robots if not r.ok
        ]
        _fail(f"deploy of {artifact} did not reach every robot: {'; '.join(bad)}")


def _deploy(
    artifact: str,
    fleet: str,
    agents: str | None,
    canary: int,
    episodes: int,
    seed: int,
    min_return: float | None,
    max_miss_rate: float | None,
    max_steps: int | None,
    retries: int,
    key: str | None,
    store_url: str | None,
    as_json: bool,
    refit: bool = True,
    allow_downgrade: bool = False,
) -> RolloutResult:
    from robonas.fleet.deploy import rollout
    from robonas.fleet.inventory import load_inventory

    inventory = load_inventory(fleet)
    inventory.select(agents)  # unknown names fail before the store or any link is opened
    store = _open_store(store_url)
    try:
        if as_json:
            result = rollout(
                artifact,
                inventory,
                agents,
                canary,
                episodes,
                seed=seed,
                min_return=min_return,
                max_miss_rate=max_miss_rate,
                max_steps=max_steps,
                store=store,
                retries=retries,
                key=key,
                allow_downgrade=allow_downgrade,
            )
            print(json.dumps(result.to_dict(), indent=2, default=str))
            _recalibrate_after_deploy(store, artifact, inventory, result, refit)
            return result
        result = _deploy_with_progress(
            artifact,
            inventory,
            agents,
            canary,
            episodes,
            seed,
            min_return,
            max_miss_rate,
            max_steps,
            retries,
            key,
            store,
            allow_downgrade,
        )
        _print_rollout(result)
        _recalibrate_after_deploy(store, artifact, inventory, result, refit)
    finally:
        store.close()
    return result


def _study_of(artifact: str) -> str | None:
    from pathlib import Path

    try:
        return json.loads((Path(artifact) / "manifest.json").read_text()).get("study")
    except (OSError, ValueError):
        return None


def _recalibrate_after_deploy(
    store: Store, artifact: str, inventory: Inventory, result: RolloutResult, refit: bool
) -> None:
    """Refit from a rollout only if it brought new evidence: a canary report stored by at least
    one robot. A canary that failed still counts (its timings are real measurements, and a
    deadline-miss failure is exactly what the latency model must learn); a rollout where every
    robot was refused before its canary, lost its link or was skipped brought nothing, so
    nothing is refitted or re-ranked and the line says why."""
    reporting = [r for r in result.robots if r.report_id is not None]
    if not reporting:
        _no_evidence("no robot sent a canary report", [(r.name, _why_no_report(r)) for r in result.robots])
        return
    devices = {e.name: e.device for e in inventory.agents}
    _recalibrate(store, [_study_of(artifact)], [devices[r.name] for r in reporting], refit)


def _why_no_report(r: RobotResult) -> str:
    """What became of a RobotResult that stored no report, in a few words."""
    if r.ok:  # the agent passed it without canary episodes, or the store was not written
        return "deployed, but no canary report"
    return f"{r.status}" + (f" ({r.reason})" if r.reason else "")


def _no_evidence(what: str, robots: list[tuple[str, str]]) -> None:
    """One stderr line: why the models and rankings were left as they are."""
    detail = "; ".join(f"{name}: {why}" for name, why in robots) or "no robots selected"
    _console(stderr=True).print(
        f"recalibrate: nothing refitted or re-ranked: {what} ({detail})", markup=False, soft_wrap=True
    )


def _recalibrate(
    store: Store,
    studies: Iterable[str | None],
    profiles: list[str],
    refit: bool = True,
    robots: Iterable[str] = (),
) -> None:
    """New reports: refit the robots' twins, the latency and gap models where the reports
    allow it, and re-rank (nothing when `refit` is off)."""
    from robonas.errors import StoreError
    from robonas.models.recalibrate import after_reports

    known: list[str] = []
    for name in filter(None, studies):
        try:
            store.get_study(name)
            known.append(name)
        except StoreError:
            pass
    for line in after_reports(store, known, profiles, refit=refit, robots=robots):
        _console(stderr=True).print(f"recalibrate: {line}")


def _deploy_with_progress(
    artifact: str,
    inventory: Inventory,
    agents: str | None,
    canary: int,
    episodes: int,
    seed: int,
    min_return: float | None,
    max_miss_rate: float | None,
    max_steps: int | None,
    retries: int,
    key: str | None,
    store: Store,
    allow_downgrade: bool = False,
) -> RolloutResult:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    from robonas.fleet.deploy import rollout

    columns = (
        TextColumn("{task.description:<14}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
    )
    with Progress(*columns, console=_console(stderr=True), transient=False) as bar:
        tasks: dict[str, TaskID] = {}

        def on_event(ev: RolloutEvent) -> None:
            if ev.agent not in tasks:
                tasks[ev.agent] = bar.add_task(ev.agent, total=None, note="")
            t = tasks[ev.agent]
            if ev.phase == "transfer":
                bar.update(t, completed=ev.bytes_sent, total=ev.total, note="sending")
            elif ev.phase == "canary":
                bar.update(t, note=f"canary: {ev.message}")
            elif ev.phase in ("connect", "retry"):
                bar.update(t, completed=0, note=f"{ev.phase} (attempt {ev.attempt})")
            else:  # done / skipped
                bar.update(t, note=ev.message[:80])
                bar.stop_task(t)

        return rollout(
            artifact,
            inventory,
            agents,
            canary,
            episodes,
            seed=seed,
            min_return=min_return,
            max_miss_rate=max_miss_rate,
            max_steps=max_steps,
            store=store,
            retries=retries,
            key=key,
            progress=on_event,
            allow_downgrade=allow_downgrade,
        )


def _print_rollout(result: RolloutResult) -> None:
    from rich.table import Table

    t = Table(title=f"deploy {result.artifact} (sha256 {result.sha256[:12]}, {result.size} B)")
    for col in (
        "robot",
        "role",
        "status",
        "reason",
        "tries",
        "transfer s",
        "total s",
        "slot",
        "canary mean return",
    ):
        t.add_column(col)
    for r in result.robots:
        d = r.deploy or {}
        canary = d.get("canary") or {}
        returns = [x for x in canary.get("returns") or [] if isinstance(x, (int, float))]
        mean = sum(returns) / len(returns) if returns else None
        t.add_row(
            r.name,
            r.role,
            r.status,
            r.reason if not r.ok else "",
            str(r.attempts),
            _fmt(d.get("transfer_s"), ".2f"),
            _fmt(d.get("total_s"), ".2f"),
            _fmt(d.get("active")),
            _fmt(mean, ".1f"),
        )
    _console().print(t)
    if result.artifact_id is None:
        _console().print(
            "note: the artifact is not indexed in the store (export it with "
            "`robonas export`): deployments were not recorded, reports were."
        )


# ------------------------------------------------------------------------------------ status
def _slot_summary(status: dict[str, Any]) -> dict[str, Any]:
    active = status.get("active")
    slots = status.get("slots") or {}
    summary = slots.get(active) if isinstance(slots, dict) and active else None
    summary = summary if isinstance(summary, dict) else {}
    version = None
    if summary.get("study") is not None or summary.get("trial") is not None:
        # the agent's slot summary names the policy by its study, trial and precision
        version = f"{summary.get('study')}#{summary.get('trial')} {summary.get('precision') or ''}"
    return {
        "active": active,
        "sha256": summary.get("sha256") or status.get("active_sha256"),
        "version": version.strip() if version else None,
        "arch_id": summary.get("arch_id"),
        "verified": summary.get("verified"),
        "previous": status.get("previous"),
        "uptime_s": status.get("uptime_s"),
        "state": _agent_state(status),
    }


def _agent_state(status: dict[str, Any]) -> str:
    """What the robot is doing (who holds it, for what) and which slots hold rejected policies."""
    lease = status.get("lease")
    if isinstance(lease, dict) and lease.get("holder"):
        state = f"{lease.get('what')} by {lease.get('holder')}"
    elif status.get("running"):
        state = "running"
    else:
        state = "idle"
    raw = status.get("slots")
    slots: dict[str, Any] = raw if isinstance(raw, dict) else {}
    rejected = [k for k, v in sorted(slots.items()) if isinstance(v, dict) and v.get("state") == "rejected"]
    return state + (f"; rejected in slot {', '.join(rejected)}" if rejected else "")


@fleet_app.command("status")
def status_command(
    fleet: str = typer.Option(..., "--fleet", help=_FLEET_HELP),
    agents: str | None = typer.Option(None, "--agents", help=_AGENTS_HELP),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    wide: bool = typer.Option(
        False, "--wide", help="Every column (link, version, uptime, p99), for wide terminals."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Each robot: does its agent answer, does the robot itself answer, its active slot and
    policy, and the last stored report of that policy. Errors are printed in full below the table."""
    rows = _guard(lambda: _status(fleet, agents, store))
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        from rich.table import Table

        t = Table(title=f"fleet {fleet}")
        columns = ["robot", "agent", "robot ok", "active", "sha256", "state", "last report", "return"]
        if wide:
            columns[1:1] = ["link"]
            columns += ["version", "uptime s", "p99 ms"]
        for col in columns:
            t.add_column(col, overflow="fold")
        for r in rows:
            last = r.get("last_report") or {}
            check = r.get("robot_check") or {}
            cells = {
                "robot": r["name"],
                "link": r["link"],
                "agent": "yes" if r["reachable"] else "no",
                "robot ok": {True: "yes", False: "no", None: "-"}.get(check.get("ok"), "-"),
                "active": _fmt(r.get("active")),
                "sha256": _fmt((r.get("sha256") or "")[:12] or None),
                "state": _fmt(r.get("state")),
                "last report": f"{last.get('kind')} {_short_time(last.get('time'))}" if last else "-",
                "return": _fmt(last.get("mean_return"), ".1f"),
                "version": _fmt(r.get("version")),
                "uptime s": _fmt(r.get("uptime_s"), ".0f"),
                "p99 ms": _fmt(last.get("p99_ms")),
            }
            t.add_row(*(cells[c] for c in columns))
        c = _console()
        c.print(t)
        for r in rows:  # the causes, whole: a table cell would cut them
            if not r["reachable"]:
                c.print(f"{r['name']}: agent does not answer: {r['error']}", markup=False)
            elif (r.get("robot_check") or {}).get("ok") is False:
                c.print(
                    f"{r['name']}: the agent answers, the robot does not: {r['robot_check']['detail']}",
                    markup=False,
                )
            if r["reachable"] and not r.get("last_report") and r.get("sha256"):
                c.print(f"{r['name']}: no stored report of its active policy yet", markup=False)
    down = [r["name"] for r in rows if not r["reachable"]]
    broken = [r["name"] for r in rows if r["reachable"] and (r.get("robot_check") or {}).get("ok") is False]
    if down or broken:
        parts = [f"unreachable robot(s): {', '.join(down)}"] if down else []
        parts += [f"robot(s) not answering their agent: {', '.join(broken)}"] if broken else []
        _fail("; ".join(parts))


def _short_time(iso: str | None) -> str:
    """'2026-12-01T22:41:05+00:00' -> '12-01 22:41' (UTC): the table's width is for the robots."""
    return "-" if not iso else f"{iso[5:10]} {iso[11:16]}"


def _status(fleet: str, agents: str | None, store_url: str | None) -> list[dict[str, Any]]:
    from robonas.fleet.client import AgentClient, FleetError, fleet_credentials
    from robonas.fleet.inventory import load_inventory
    from robonas.fleet.reports import register_device, summarise_report

    inventory = load_inventory(fleet)
    entries = inventory.select(agents)
    credentials = fleet_credentials(inventory)
    store = _open_store(store_url)
    rows = []
    try:
        for e in entries:
            row: dict[str, Any] = {
                "name": e.name,
                "link": e.link,
                "device": e.device,
                "robot": e.robot,
                "reachable": False,
                "error": "",
            }
            try:
                with AgentClient.for_entry(e, credentials) as c:
                    row["hello"] = c.hello()
                    status = c.status()
                    row.update(_slot_summary(status))
                    row["robot_check"] = status.get("robot_check")
                row["reachable"] = True
                register_device(store, e.name, e.device)
            except FleetError as err:
                row["error"] = str(err)
            # the newest report of the policy the robot runs now (after a rollback, not the
            # rolled-back one's); unreachable: the newest of any
            reports = store.device_reports(device=e.name)
            if row.get("sha256"):
                reports = [r for r in reports if r.payload.get("sha256") == row["sha256"]]
            if reports:
                newest = reports[-1]
                row["last_report"] = {
                    "kind": newest.kind,
                    "id": newest.id,
                    "time": newest.created_at.isoformat(timespec="seconds"),
                    "artifact_id": newest.artifact_id,
                    **summarise_report(newest.payload),
                }
            rows.append(row)
    finally:
        store.close()
    return rows


# ------------------------------------------------------------------------------------ rollback
@fleet_app.command("rollback")
def rollback_command(
    fleet: str = typer.Option(..., "--fleet", help=_FLEET_HELP),
    agent: str = typer.Option(..., "--agent", help="The robot to roll back to its previous slot."),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Switch one robot back to the policy in its other slot."""
    out = _guard(lambda: _rollback(fleet, agent, store))
    if as_json:
        print(json.dumps(out, indent=2, default=str))
    else:
        _console().print(
            f"{agent}: active slot {out['before'].get('active')} -> "
            f"{out['after'].get('active')} (sha256 "
            f"{(out['after'].get('sha256') or '?')[:12]})"
        )


def _rollback(fleet: str, agent: str, store_url: str | None) -> dict[str, Any]:
    from robonas.fleet.client import AgentClient, fleet_credentials
    from robonas.fleet.inventory import load_inventory
    from robonas.fleet.reports import artifact_for_sha, record_deployment, register_device

    inventory = load_inventory(fleet)
    entry = inventory.get(agent)
    with AgentClient.for_entry(entry, fleet_credentials(inventory)) as c:
        c.hello()
        before = _slot_summary(c.status())
        ack = c.rollback()
        after = _slot_summary(c.status())
    store = _open_store(store_url)
    try:
        register_device(store, entry.name, entry.device)
        ref = artifact_for_sha(store, entry.name, after.get("sha256"))
        dep = record_deployment(
            store,
            ref,
            entry.name,
            "rollback",
            {
                "sha256": after.get("sha256"),
                "active": after.get("active"),
                "previous_active": before.get("active"),
                "previous_sha256": before.get("sha256"),
                "ack": ack,
            },
        )
    finally:
        store.close()
    return {"agent": agent, "before": before, "after": after, "ack": ack, "deployment_id": dep}


@fleet_app.command("stop")
def stop_command(
    fleet: str = typer.Option(..., "--fleet", help=_FLEET_HELP),
    agents: str | None = typer.Option(None, "--agents", help=_AGENTS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """STOP each robot: the run in progress ends within one control period and the robot goes to
    its safe state. Any authenticated operator may stop. Exit 1 if a robot could not be told."""
    rows = _guard(lambda: _stop(fleet, agents))
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        for r in rows:
            if r["error"]:
                _console().print(f"{r['agent']}: NOT STOPPED: {r['error']}", markup=False)
            else:
                _console().print(f"{r['agent']}: {'run stopped' if r['stopped'] else 'nothing was running'}")
    if any(r["error"] for r in rows):
        raise typer.Exit(1)


def _stop(fleet: str, agents: str | None) -> list[dict[str, Any]]:
    from robonas.fleet.client import AgentClient, FleetError, fleet_credentials
    from robonas.fleet.inventory import load_inventory

    inventory = load_inventory(fleet)
    credentials = fleet_credentials(inventory)
    rows = []
    for e in inventory.select(agents):
        try:
            with AgentClient.for_entry(e, credentials) as c:
                ack = c.stop("robonas fleet stop")
            rows.append({"agent": e.name, "stopped": bool(ack.get("stopped")), "error": None})
        except FleetError as err:
            rows.append({"agent": e.name, "stopped": False, "error": str(err)})
    return rows


# ------------------------------------------------------------------------------------ run
@fleet_app.command("run")
def run_command(
    fleet: str = typer.Option(..., "--fleet", help=_FLEET_HELP),
    episodes: int = typer.Option(..., "--episodes", min=1, help="Episodes each robot runs."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first episode."),
    agents: str | None = typer.Option(None, "--agents", help=_AGENTS_HELP),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    record: bool = typer.Option(
        False,
        "--record",
        help="Also bring back each robot's step-by-step record of the run (observations, actions, "
        "rewards, clock, latency; its last 5 episodes, at most 2 MiB) and keep it with the stored "
        "report, for identifying the robot's dynamics (robots that sent new records get their "
        "twins refitted afterwards).",
    ),
    no_refit: bool = typer.Option(False, "--no-refit", help=_NO_REFIT_HELP),
) -> None:
    """Run episodes on every robot's active policy and store the fresh reports."""
    rows = _guard(lambda: _run(fleet, episodes, seed, agents, store, record, not no_refit))
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        from rich.table import Table

        t = Table(title=f"fleet run: {episodes} episode(s), seed {seed}")
        for col in (
            "robot",
            "ok",
            "sha256",
            "p50 ms",
            "p99 ms",
            "misses",
            "mean return",
            "wall s",
            "report id",
            *(["record"] if record else []),
        ):
            t.add_column(col)
        for r in rows:
            s = r.get("summary") or {}
            t.add_row(
                r["name"],
                "yes" if r["ok"] else f"no: {r['error'][:60]}",
                _fmt((r.get("report") or {}).get("sha256", "")[:12] or None),
                _fmt(s.get("p50_ms")),
                _fmt(s.get("p99_ms")),
                _fmt(s.get("deadline_misses")),
                _fmt(s.get("mean_return"), ".1f"),
                _fmt(r.get("wall_s"), ".2f"),
                _fmt(r.get("report_id")),
                *([_record_cell(r)] if record else []),
            )
        _console().print(t)
    bad = [r["name"] for r in rows if not r["ok"]]
    if bad:
        _fail(f"run failed on robot(s): {', '.join(bad)}")


def _record_cell(row: dict[str, Any]) -> str:
    rec = row.get("record")
    if not row["ok"]:
        return "-"
    if rec is None:
        return "none (agent too old?)"
    return f"{rec['episodes']} ep, {sum(rec['steps'])} steps"


def _run(
    fleet: str,
    episodes: int,
    seed: int,
    agents: str | None,
    store_url: str | None,
    record: bool = False,
    refit: bool = True,
) -> list[dict[str, Any]]:
    import time

    from device_agents.trajectory import summary as record_summary
    from robonas.fleet.client import AgentClient, FleetError, fleet_credentials
    from robonas.fleet.inventory import load_inventory
    from robonas.fleet.reports import (
        artifact_for_sha,
        record_report,
        register_device,
        summarise_report,
    )

    inventory = load_inventory(fleet)
    entries = inventory.select(agents)
    credentials = fleet_credentials(inventory)
    store = _open_store(store_url)
    rows = []
    try:
        for e in entries:
            row: dict[str, Any] = {"name": e.name, "ok": False, "error": ""}
            try:
                with AgentClient.for_entry(e, credentials) as c:
                    c.hello()
                    t0 = time.perf_counter()
                    report = c.run(episodes, seed, record=record)
                    row["wall_s"] = time.perf_counter() - t0
                register_device(store, e.name, e.device)
                ref = artifact_for_sha(store, e.name, report.get("sha256"))
                row["trial_id"] = ref.trial_id
                row["report_id"] = record_report(
                    store,
                    e.name,
                    "run",
                    report,
                    ref,
                    link=e.link,
                    episodes=episodes,
                    seed=seed,
                    wall_s=row["wall_s"],
                )
                row.update(ok=True, report=report, summary=summarise_report(report))
                if record:  # the record itself is in the store; the output says what it holds
                    rec = report.get("record")
                    row["report"] = {k: v for k, v in report.items() if k != "record"}
                    row["record"] = None if rec is None else record_summary(rec)
            except FleetError as err:
                row["error"] = str(err)
            rows.append(row)
        # Only robots that returned a report are new evidence. A report on an artifact the store
        # does not know names no trial, so it refits nothing either; that case stays quiet, as
        # the table already says which reports were stored.
        tied = [(e, r) for e, r in zip(entries, rows, strict=True) if r.get("trial_id") is not None]
        if not any(r["ok"] for r in rows):
            _no_evidence("no robot returned a report", [(r["name"], r["error"]) for r in rows])
        elif tied:
            studies = [store.get_study_by_id(store.get_trial(r["trial_id"]).study_id).name for _, r in tied]
            _recalibrate(store, studies, [e.device for e, _ in tied], refit, robots=[e.name for e, _ in tied])
    finally:
        store.close()
    return rows


# ------------------------------------------------------------------------------------ simulate
@fleet_app.command("simulate")
def simulate_command(
    agents: int = typer.Option(..., "--agents", min=1, help="How many agents: sim-000, sim-001, ..."),
    directory: str = typer.Option(
        ...,
        "--dir",
        help="Folder for their state, keys and fleet.toml; reused (slots, keys) when it exists.",
    ),
    slow: int = typer.Option(
        0,
        "--slow",
        min=0,
        help="Agents that keep real time (serve without --fast): their canaries take as long as "
        "on a robot. Tagged 'slow'.",
    ),
    failing: int = typer.Option(
        0,
        "--failing",
        min=0,
        help="Agents on a cart-pole behind 100 ms of delay, where a policy trained on the nominal "
        "cart-pole fails a canary with a return floor. Tagged 'failing'; the last agents.",
    ),
    profiles: str | None = typer.Option(
        None,
        "--profiles",
        help="Reality profiles the other agents cycle through, comma-separated "
        "(default: cartpole-lab-a,cartpole-worn-b,cartpole-laggy-c).",
    ),
    device: str = typer.Option("x86-host", "--device", help="Device profile the agents report."),
    trust: str | None = typer.Option(
        None,
        "--trust",
        help="Ed25519 public key the agents trust (default: DIR/signing/robonas.pub, made once; "
        "sign with `robonas deploy --key DIR/signing/robonas.key`).",
    ),
    canary_min_return: float | None = typer.Option(
        None,
        "--canary-min-return",
        help="Every agent's own canary floor (serve --canary-min-return), whatever the deployer asks.",
    ),
) -> None:
    """Start a simulated fleet: N local agent processes on loopback TLS, sites lab-a/lab-b, and
    DIR/fleet.toml naming them with site, kind and tags. Runs until Ctrl-C or SIGTERM, then stops
    every agent."""
    _guard(lambda: _simulate(agents, directory, slow, failing, profiles, device, trust, canary_min_return))


def _simulate(
    n: int,
    directory: str,
    slow: int,
    failing: int,
    profiles: str | None,
    device: str,
    trust: str | None,
    canary_min_return: float | None,
) -> None:
    import signal
    import threading
    import time

    from robonas.fleet.simulate import SimulatedFleet

    names = None if profiles is None else [p.strip() for p in profiles.split(",") if p.strip()]
    fleet = SimulatedFleet(
        n, directory, slow, failing, names, device=device, trust=trust, canary_min_return=canary_min_return
    )
    done = threading.Event()
    # SIGTERM (systemd, a test harness, `kill`) ends the wait below the way Ctrl-C does
    previous = signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        print(f"starting {n} agents in {fleet.directory} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        fleet.start()
        for line in fleet.describe():
            print(line)
        print(f"fleet file: {fleet.fleet_path}")
        if fleet.signing_key is not None:
            print(f"signing key: {fleet.signing_key} (the agents trust {fleet.trust})")
        print(f"{n} agents up in {time.monotonic() - t0:.1f} s; Ctrl-C or SIGTERM stops them", flush=True)
        exited: set[str] = set()
        while not done.wait(1.0):
            for a in fleet.agents:  # say once when an agent dies under us, and where its log is
                if a.name not in exited and a.proc is not None and a.proc.poll() is not None:
                    exited.add(a.name)
                    print(
                        f"agent {a.name} exited (code {a.proc.returncode}); see {a.state_dir / 'agent.log'}",
                        file=sys.stderr,
                        flush=True,
                    )
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        fleet.stop()
    print(f"stopped {n} agents", file=sys.stderr, flush=True)


__all__ = ["deploy_command", "fleet_app", "simulate_command"]
