"""The `robonas` command line (typer + rich).

Every command imports its heavy machinery (torch, pybullet, SB3) inside its body, so that
`robonas --help` starts in a fraction of a second. Errors raised on purpose (RobonasError,
SimError, DeviceError) become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    help="Search RL policy architectures in simulation, compile the winners for robots, "
    "deploy them, and learn from what the robots report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from robonas import __version__

        print(f"robonas {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Search RL policy architectures in simulation, compile the winners for robots, deploy them,
    and learn from what the robots report."""


def _mount() -> None:
    # Each command module imports only typer (and rich for output) at module level; the work
    # is imported inside the commands.
    from robonas.cli.bench import bench_app
    from robonas.cli.calibrate import calibrate_app, rerank_command
    from robonas.cli.demo import demo
    from robonas.cli.fleet import deploy_command, fleet_app
    from robonas.cli.keys import keys_app
    from robonas.cli.replay import replay
    from robonas.cli.rollout import rollout_app
    from robonas.cli.study import export, report, search, status, top
    from robonas.cli.twins import identify, twins

    app.command("deploy")(deploy_command)
    app.add_typer(fleet_app, name="fleet")
    app.add_typer(rollout_app, name="rollout")
    app.add_typer(calibrate_app, name="calibrate")
    app.command("rerank")(rerank_command)
    app.add_typer(bench_app, name="bench")
    app.add_typer(keys_app, name="keys")
    for command in (export, search, status, top, report, replay, identify, twins, demo):
        app.command()(command)


_mount()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `robonas` console script."""
    from device_agents.errors import DeviceError
    from robonas.errors import RobonasError
    from sim.errors import SimError

    handled: tuple[type[BaseException], ...] = (RobonasError, DeviceError, SimError)
    try:
        app(args=argv, standalone_mode=True)
    except handled as e:
        print(f"robonas: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
