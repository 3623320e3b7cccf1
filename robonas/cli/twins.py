"""`robonas identify ROBOT...` and `robonas twins`: robot twins from the robots' own records."""

from __future__ import annotations

import json

import typer

from robonas.cli.common import STORE_HELP, console, open_store


def identify(
    robots: list[str] = typer.Argument(..., help="Robot (agent) names whose recorded runs to identify."),
    episodes: int = typer.Option(5, "--episodes", min=1, help="Newest recorded episodes to use per robot."),
    max_delay: int = typer.Option(
        4,
        "--max-delay",
        min=0,
        help="Largest whole-step action delay tried first (doubled while the best is the largest, up to 16).",
    ),
    env: str | None = typer.Option(
        None, "--env", help="Env id of the records (default: the env the recorded policies were trained on)."
    ),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print each stored twin as JSON."),
) -> None:
    """Fit each robot's twin (dynamics, action delay, actuation latency, sensor noise) to its recorded episodes.

    Replays the records in the simulator and keeps the parameters that predict them best, each with an uncertainty, or says it cannot be identified from these records. Record episodes with `robonas fleet run --record`. Each fit is stored as the robot's next twin version."""  # noqa: E501  (typer prints a docstring's line breaks as they are)
    from robonas.models.twins import describe, identify_robot

    db = open_store(store)
    out = []
    with console().status("identifying") as status:
        for robot in robots:
            status.update(f"identifying {robot} (replaying its records; about a minute)")
            twin = identify_robot(db, robot, max_episodes=episodes, env_id=env, max_delay=max_delay)
            out.append({"robot": robot, "version": twin.version, "twin": twin.fit.to_dict()})
            if not as_json:
                console().print(f"{twin.label}: {describe(twin.fit)}", markup=False, highlight=False)
    if as_json:
        print(json.dumps(out, indent=2))


def twins(
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The newest twin of every identified robot: its delay and parameters with their uncertainty."""
    from robonas.models.twins import describe
    from robonas.models.twins import twins as stored_twins

    found = stored_twins(open_store(store))
    if as_json:
        print(
            json.dumps(
                {r: {"version": t.version, "twin": t.fit.to_dict()} for r, t in found.items()}, indent=2
            )
        )
        return
    if not found:
        console().print(
            "no twins yet: record runs (`robonas fleet run --record`), then `robonas identify ROBOT`"
        )
    for twin in found.values():
        console().print(f"{twin.label}: {describe(twin.fit)}", markup=False, highlight=False)
