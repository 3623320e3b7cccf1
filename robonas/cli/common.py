"""What the command modules share: the console, the store option, the search progress bar."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from robonas.search.loop import SearchProgress, SearchSummary
    from robonas.store import Store

STORE_HELP = "Store URL (default: $ROBONAS_STORE or sqlite:///runs/robonas.db)."


def console(stderr: bool = False) -> Console:
    from rich.console import Console

    # Tables are wide; when piped (no terminal to measure) do not squeeze them into 80 columns.
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr) if stream.isatty() else Console(width=160, stderr=stderr)


def open_store(url: str | None) -> Store:
    from robonas.store import Store

    return Store(url)


def search_progress(quiet: bool) -> tuple[AbstractContextManager[Any], SearchProgress]:
    """A rich progress bar: trials done/total, best objective, aggregate env steps/s, ETA."""
    import contextlib

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from robonas.search.loop import SearchProgress

    if quiet:  # stdout is for the JSON summary: the trial lines go to stderr
        err = console(stderr=True)
        return contextlib.nullcontext(), SearchProgress(
            on_line=lambda line: err.print(line, markup=False, highlight=False)
        )
    bar = Progress(
        TextColumn("[bold]trials"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("best {task.fields[best]}"),
        TextColumn("{task.fields[sps]} steps/s"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console(),
        transient=False,
        # trials take minutes: estimate the speed over the whole run, not rich's last 30 s (which
        # holds no finished trial, so the ETA would never show)
        speed_estimate_period=24 * 3600,
    )
    state: dict[str, Any] = {}

    def on_start(planned: int, done: int) -> None:
        state["task"] = bar.add_task("search", total=planned, completed=done, best="-", sps="-")

    def on_trial(summary: SearchSummary) -> None:
        best = "-"
        if summary.best_objective is not None:
            best = f"objective {summary.best_objective:.3f}"
            if summary.best_return is not None:
                best = f"return {summary.best_return:.1f} ({best})"
        bar.update(
            state["task"],
            completed=summary.complete + summary.failed + summary.pruned,
            best=best,
            sps=f"{summary.steps_per_s:,.0f}",
        )

    def on_line(line: str) -> None:
        # printed above the bar, and as plain lines when the output is a file or a pipe
        bar.console.print(line, markup=False, highlight=False)

    return bar, SearchProgress(on_start=on_start, on_trial=on_trial, on_line=on_line)
