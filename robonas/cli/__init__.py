"""The `robonas` command line: one module per command group, mounted on one typer app.

`app` (the root and the study commands: search, status, top, report, export), `bench`,
`keys`, `demo`, `fleet` (deploy, fleet status|run|rollback) and `calibrate` (calibrate
latency|gap, rerank). Each command imports its heavy machinery inside its body, so `--help`
never imports torch.
"""

from __future__ import annotations

from robonas.cli.app import app, main

__all__ = ["app", "main"]
