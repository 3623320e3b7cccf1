"""The `robonas` command line: one module per command group, mounted on one typer app.

`app` (the root and the study commands: search, status, top, report, export), `bench`,
`keys`, `demo`, `fleet` (deploy, fleet status|run|rollback) and `calibrate` (calibrate
latency|gap, rerank). Each command imports its heavy machinery inside its body, so `--help`
never imports torch.

`main` here is the console script's entry. A robot installs the same wheel with only the
`robot` extra, so it gets a `robonas` script too but none of the host's packages: before
importing the typer app, `main` looks for the modules the CLI needs at import time and, when one
is missing, says in one line what to install instead of dying on a ModuleNotFoundError. This
module itself imports only the standard library, so that check runs on a robot; `app` is loaded
on first access.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from robonas.cli.app import app

__all__ = ["app", "main"]

# What `robonas --help` imports before any command runs: typer and rich (the CLI itself) and
# gymnasium (robonas.cli.app.main imports sim.errors, and sim registers its envs with gymnasium).
HOST_MODULES = ("typer", "rich", "gymnasium")
NO_HOST_MESSAGE = (
    "robonas: the host commands need the host extra: pip install 'robonas[host]' "
    "(this install has the robot agent: robonas-agent)"
)


def missing_host_modules() -> list[str]:
    """The modules of HOST_MODULES that this interpreter cannot import."""
    return [name for name in HOST_MODULES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `robonas` console script: the host CLI, or one line and exit 2 on an
    install that lacks the host extra (a robot's)."""
    if sys.version_info < (3, 11):  # noqa: UP036  (a robot's Python: the agent runs on 3.9)
        print(
            f"robonas: the host commands need Python 3.11 or newer, this is {sys.version.split()[0]} "
            "(a robot needs only the agent: robonas-agent)",
            file=sys.stderr,
        )
        sys.exit(2)
    if missing_host_modules():
        print(NO_HOST_MESSAGE, file=sys.stderr)
        sys.exit(2)
    from robonas.cli.app import main as app_main

    app_main(argv)


def __getattr__(name: str) -> Any:
    # `from robonas.cli import app` keeps working without importing typer at package import.
    if name == "app":
        from robonas.cli.app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
