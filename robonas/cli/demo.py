"""`robonas demo`: the whole loop on this machine, on embedded defaults, in two acts."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from robonas.cli.common import console as make_console
from robonas.cli.common import search_progress


def demo(
    quick: bool = typer.Option(False, "--quick", help="A shorter run (what the tests use)."),
    workdir: str | None = typer.Option(
        None, "--workdir", help="Where the demo writes (default runs/demo; wiped first)."
    ),
    keep: bool = typer.Option(False, "--keep", help="Resume in an existing workdir instead of wiping it."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """The whole loop on this machine, in two acts, on embedded defaults.

    (1) search, export, two local robot agents on reality profiles, deploy with canary, reports, latency (BENCH) and gap calibration, re-ranking, HTML report; (2) the same for a microcontroller robot far slower than its device prior, whose reports refit the models and move the ranking."""  # noqa: E501  (typer prints a docstring's line breaks as they are)
    from robonas.demo import default_workdir, explain, next_summary, run_demo

    console = make_console()
    say = (lambda _m: None) if as_json else console.print
    progress, hooks = search_progress(as_json)
    with progress:
        result = run_demo(
            Path(workdir) if workdir else default_workdir(),
            quick=quick,
            fresh=not keep,
            say=say,
            progress_hooks=hooks,
        )
    if as_json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return
    from rich.table import Table

    for act in result.acts.values():
        t = Table(title=f"{act.study}: how the ranking moved once {', '.join(act.robots)} reported")
        for col in (
            "trial",
            "arch",
            "rank before",
            "rank after",
            "pred real before",
            "pred real after",
            "measured real",
            "p99 ms after",
        ):
            t.add_column(col, justify="left" if col == "arch" else "right")
        before = {r.trial: r for r in act.before}
        for r in act.after:
            b = before[r.trial]
            real = act.measured.get(r.trial)
            t.add_row(
                str(r.trial),
                r.arch,
                str(b.rank),
                str(r.rank),
                f"{b.predicted_real_return or 0:.1f}",
                f"{r.predicted_real_return or 0:.1f}",
                ", ".join(f"{k} {v:.0f}" for k, v in real.items()) if real else "-",
                f"{r.p99_ms or 0:.3f}" + (" over" if r.within_budget is False else ""),
            )
        console.print(t)
        for line in explain(act):
            console.print(f"  {line}")
        if act.next:
            console.print("  the next candidates, asked after the robots reported:")
        for line in next_summary(act):
            console.print(f"    {line}")
        for note in act.notes:
            console.print(f"  note: {note}")
        console.print(f"  report: {act.report}")
    console.print(f"demo finished in {result.wall_s:.0f} s")
