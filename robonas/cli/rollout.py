"""`robonas rollout start|status|pause|resume|abort`: phased rollouts to a fleet
(robonas.fleet.rollouts). Typer for arguments, rich for the tables; bad input is one line on
stderr and exit 2 with nothing sent, as everywhere in the CLI."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import typer

from robonas.cli.common import STORE_HELP, console, open_store

if TYPE_CHECKING:
    from robonas.fleet.deploy import RolloutEvent
    from robonas.store import RolloutRow, Store

rollout_app = typer.Typer(
    help="Roll an artifact out to a fleet in phases, with health gates; resumable.", no_args_is_help=True
)
_FLEET_HELP = "Fleet inventory TOML (one \\[\\[agent]] per robot, with optional site, kind, hw_rev, tags)."


def _progress(as_json: bool) -> Any:
    """One line per robot as it finishes (also when the output is not a terminal)."""
    if as_json:
        return None
    c = console()

    def on_event(ev: RolloutEvent) -> None:
        if ev.phase == "done":
            c.print(f"  {ev.agent}: {ev.message}", markup=False)

    return on_event


def _inventory(path: str) -> Any:
    from robonas.fleet.inventory import load_inventory

    return load_inventory(path)


def _run_and_show(db: Store, rollout_id: int, fleet: str, as_json: bool) -> None:
    from robonas.fleet.rollouts import run_rollout

    row = run_rollout(db, rollout_id, _inventory(fleet), progress=_progress(as_json))
    _show(db, row, as_json)
    if row.status not in ("complete",):
        raise typer.Exit(1 if row.status in ("aborted", "incomplete") else 0)


# Built-in defaults of `rollout start`, under the fleet file's [rollout] table and the options.
DEFAULTS: dict[str, Any] = {
    "phases": "1,10%,rest",
    "concurrency": 4,
    "min_pass_rate": 1.0,
    "max_miss_rate": None,
    "max_return_drop": None,
    "soak_s": 0.0,
    "rollback": True,
    "episodes": 3,
    "min_return": None,
    "retries": 2,
}


@rollout_app.command("start")
def start(
    artifact: str = typer.Argument(..., help="Artifact folder (policy.tflite + manifest.json)."),
    fleet: str = typer.Option(..., "--fleet", help=_FLEET_HELP),
    phases: str | None = typer.Option(
        None,
        "--phases",
        help="Robots per phase: counts, percentages and a final 'rest' (default 1,10%,rest).",
    ),
    concurrency: int | None = typer.Option(
        None, "--concurrency", help="Robots updated at once in a phase (default 4)."
    ),
    group: str | None = typer.Option(
        None,
        "--group",
        help="Only robots matching e.g. site=lab-a, kind=sim/CartPole-v0, tag=outdoor (ANDed by ',').",
    ),
    agents: str | None = typer.Option(None, "--agents", help="Comma-separated robot names (default: all)."),
    min_pass_rate: float | None = typer.Option(
        None, "--min-pass-rate", help="Gate: share of a phase's canaries that must pass (default 1)."
    ),
    max_miss_rate: float | None = typer.Option(
        None, "--max-miss-rate", help="Gate: mean deadline-miss rate allowed."
    ),
    max_return_drop: float | None = typer.Option(
        None,
        "--max-return-drop",
        help="Gate: largest drop of the mean canary return against the current policy (share).",
    ),
    soak: float | None = typer.Option(
        None, "--soak", help="Gate: seconds after a phase that its robots must keep the policy."
    ),
    rollback: bool | None = typer.Option(
        None, "--rollback/--no-rollback", help="Switch a failed phase's updated robots back (default: yes)."
    ),
    episodes: int | None = typer.Option(
        None, "--episodes", help="Canary episodes each robot runs before promoting (default 3)."
    ),
    min_return: float | None = typer.Option(
        None, "--min-return", help="Canary: lowest mean return a robot accepts."
    ),
    retries: int | None = typer.Option(
        None, "--retries", help="Link retries per robot, with backoff (default 2)."
    ),
    key: str | None = typer.Option(None, "--key", help="Sign the manifest now with this private key."),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check and store the rollout; send nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the rollout as JSON."),
) -> None:
    """Create a rollout and run it. Every check (robots, group, kind, phases) is made before
    anything is sent; a lost host resumes with `robonas rollout resume ID`. Options left out
    come from the fleet file's \\[rollout] table, then the defaults shown."""
    from robonas.fleet.client import Canary
    from robonas.fleet.rollouts import Gates, start_rollout

    inventory = _inventory(fleet)
    given: dict[str, Any] = {
        "phases": phases,
        "concurrency": concurrency,
        "min_pass_rate": min_pass_rate,
        "max_miss_rate": max_miss_rate,
        "max_return_drop": max_return_drop,
        "soak_s": soak,
        "rollback": rollback,
        "episodes": episodes,
        "min_return": min_return,
        "retries": retries,
    }
    o: dict[str, Any] = {
        k: v if v is not None else inventory.rollout.get(k, DEFAULTS[k]) for k, v in given.items()
    }
    db = open_store(store)
    row = start_rollout(
        db,
        artifact,
        inventory,
        fleet,
        phases=o["phases"],
        concurrency=o["concurrency"],
        group=group,
        agents=agents,
        gates=Gates(o["min_pass_rate"], o["max_miss_rate"], o["max_return_drop"], o["soak_s"]),
        rollback=o["rollback"],
        canary=Canary(episodes=o["episodes"], min_return=o["min_return"]),
        retries=o["retries"],
        key=key,
    )
    if not as_json:
        console().print(
            f"rollout {row.id}: {len(db.rollout_robots(row.id))} robots in phases {row.plan['phases']}"
        )
    if dry_run:
        _show(db, row, as_json)
        return
    _run_and_show(db, row.id, fleet, as_json)


@rollout_app.command("resume")
def resume(
    rollout_id: int = typer.Argument(..., help="Rollout id (robonas rollout status)."),
    fleet: str | None = typer.Option(
        None, "--fleet", help="Fleet file (default: the one the rollout started with)."
    ),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Go on with a paused, interrupted or incomplete rollout; robots that already run the
    artifact are not sent it again."""
    db = open_store(store)
    row = db.get_rollout(rollout_id)
    _run_and_show(db, rollout_id, fleet or row.fleet, as_json)


@rollout_app.command("status")
def status(
    rollout_id: int | None = typer.Argument(None, help="Rollout id (default: list every rollout)."),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A rollout's robots, phases and gate results (or the list of rollouts)."""
    db = open_store(store)
    if rollout_id is None:
        rows = db.rollouts()
        if as_json:
            print(
                json.dumps([{"id": r.id, "status": r.status, "artifact": r.artifact} for r in rows], indent=2)
            )
            return
        for r in rows:
            console().print(
                f"{r.id}  {r.status:<10}  {r.artifact}  ({r.updated_at:%Y-%m-%d %H:%M})", markup=False
            )
        return
    _show(db, db.get_rollout(rollout_id), as_json)


def _control(rollout_id: int, store: str | None, to: str) -> None:
    from robonas.fleet.rollouts import set_control

    row = set_control(open_store(store), rollout_id, to)
    console().print(f"rollout {row.id}: {row.status}")


@rollout_app.command("pause")
def pause(
    rollout_id: int = typer.Argument(...), store: str | None = typer.Option(None, "--store", help=STORE_HELP)
) -> None:
    """Stop a running rollout before its next robot (robots in transfer finish)."""
    _control(rollout_id, store, "paused")


@rollout_app.command("abort")
def abort(
    rollout_id: int = typer.Argument(...), store: str | None = typer.Option(None, "--store", help=STORE_HELP)
) -> None:
    """Stop a rollout for good (updated robots keep the new policy; `robonas fleet rollback`
    switches one back)."""
    _control(rollout_id, store, "aborted")


def _show(db: Store, row: RolloutRow, as_json: bool) -> None:
    robots = db.rollout_robots(row.id)
    if as_json:
        out = {
            "id": row.id,
            "status": row.status,
            "artifact": row.artifact,
            "sha256": row.sha256,
            "phases": row.plan.get("phases"),
            "report": row.report,
            "robots": [
                {"name": r.name, "phase": r.phase + 1, "state": r.state, "attempts": r.attempts, **r.detail}
                for r in robots
            ],
        }
        print(json.dumps(out, indent=2, default=str))
        return
    from rich.table import Table

    c = console()
    counts: dict[str, int] = {}
    for r in robots:
        counts[r.state] = counts.get(r.state, 0) + 1
    c.print(
        f"rollout {row.id} [bold]{row.status}[/]: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    )
    table = Table("phase", "robots", "updated", "failed", "offline", "gate")
    for phase in range(len(row.plan.get("phases", []))):
        members = [r for r in robots if r.phase == phase]
        verdict = (row.report.get("gates") or {}).get(str(phase))
        gate = (
            "-"
            if verdict is None
            else ("waiting" if verdict.get("waiting") else "pass" if verdict["ok"] else "FAIL")
        )
        table.add_row(
            str(phase + 1),
            str(len(members)),
            str(sum(r.state == "updated" for r in members)),
            str(sum(r.state == "failed" for r in members)),
            str(sum(r.state == "offline" for r in members)),
            gate,
        )
    c.print(table)
    for phase, verdict in sorted((row.report.get("gates") or {}).items()):
        for f in verdict.get("failures", []):
            c.print(
                f"phase {int(phase) + 1} failed gate {f['gate']}: {f['value']:.3g} against {f['limit']:.3g}; "
                f"robots {', '.join(f['robots']) or '-'}",
                markup=False,
            )
        if "rolled_back" in verdict:
            c.print(
                f"rolled back {len(verdict['rolled_back'])} robot(s) in {verdict['rollback_s']:.2f} s",
                markup=False,
            )
        for note in verdict.get("notes", []):
            c.print(f"phase {int(phase) + 1}: {note}", markup=False)
    for r in robots:
        if r.state in ("failed", "offline"):
            c.print(
                f"  {r.name}: {r.state}: {r.detail.get('reason', '')} {r.detail.get('detail', '')}",
                markup=False,
            )
