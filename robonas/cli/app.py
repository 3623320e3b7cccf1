"""The `robonas` command line (typer + rich).

Every command imports its heavy machinery (torch, pybullet, SB3) inside its body, so that
`robonas --help` starts in a fraction of a second. Errors raised on purpose (RobonasError,
SimError, DeviceError) become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

app = typer.Typer(
    help="Search RL policy architectures in simulation, compile the winners for robots, "
    "deploy them, and learn from what the robots report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks: environments and TFLite models.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _mount_fleet() -> None:
    # cli_fleet imports only typer at module level; the work happens inside its commands.
    from robonas.cli.fleet import deploy_command, fleet_app

    app.command("deploy")(deploy_command)
    app.add_typer(fleet_app, name="fleet")

    from robonas.cli.calibrate import calibrate_app, rerank_command

    app.add_typer(calibrate_app, name="calibrate")
    app.command("rerank")(rerank_command)


_mount_fleet()


def _console():
    from rich.console import Console

    # Tables are wide; when piped (no terminal to measure) do not squeeze them into 80 columns.
    return Console() if sys.stdout.isatty() else Console(width=160)


def _check_env_ids(ids: list[str]) -> None:
    import gymnasium

    import sim
    from robonas.errors import RobonasError

    for env_id in ids:
        if env_id not in sim.ENV_IDS and env_id not in gymnasium.registry:
            raise RobonasError(
                f"unknown env id {env_id!r}; valid sim envs: {', '.join(sim.ENV_IDS)} (or any gymnasium id)"
            )


@bench_app.command("env")
def bench_env(
    env_ids: list[str] | None = typer.Argument(
        None, help="Env ids to measure (default: every registered sim/ env)."
    ),
    steps: int = typer.Option(5000, "--steps", min=1, help="Random-action steps per env."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Raw env steps/s with random actions, one process, beside gymnasium's CartPole-v1."""
    import sim
    from robonas.bench.env_steps import REFERENCE_ENV, bench_envs

    ids = list(env_ids) if env_ids else list(sim.ENV_IDS)
    _check_env_ids(ids)
    results = bench_envs(ids, steps)
    if as_json:
        print(json.dumps({"reference": REFERENCE_ENV, "results": [r.to_dict() for r in results]}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"env steps/s, random actions, {steps} steps each")
    for col in ("env", "steps/s", f"ratio to {REFERENCE_ENV}"):
        table.add_column(col, justify="right" if col != "env" else "left")
    for r in results:
        table.add_row(r.env_id, f"{r.steps_per_s:,.0f}", f"{r.ratio_to_reference:.3f}")
    _console().print(table)


@bench_app.command("model")
def bench_model(
    file: str = typer.Argument(..., help="A .tflite policy."),
    runs: int = typer.Option(1000, "--runs", help="Measured steps."),
    warmup: int = typer.Option(50, "--warmup", help="Unmeasured first steps."),
    threads: int = typer.Option(1, "--threads", help="Interpreter threads."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Time a TFLite policy on this machine: the same code as `robonas-agent bench`."""
    from device_agents.cli import main as agent_main

    argv = ["bench", file, "--runs", str(runs), "--warmup", str(warmup), "--threads", str(threads)]
    raise typer.Exit(agent_main(argv + (["--json"] if as_json else [])))


@bench_app.command("search")
def bench_search_cmd(
    config: str = typer.Argument("launch/cartpole.toml", help="Search config."),
    workers: str = typer.Option(
        "1,2", "--workers", help="Comma-separated worker counts; the first is the baseline."
    ),
    trials: int | None = typer.Option(None, "--trials", help="Override trained trials."),
    steps: int | None = typer.Option(None, "--steps", help="Override env steps per trial."),
    same_archs: bool = typer.Option(
        True,
        "--same-archs/--config-strategy",
        help="Random search under the config's seed, so every worker count trains the same archs (default), or the config's own strategy.",
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Wall time and aggregate env steps/s of a whole search at several worker counts."""
    from robonas.bench.search_workers import bench_search
    from robonas.errors import ConfigError

    try:
        counts = [int(w) for w in workers.split(",") if w.strip()]
    except ValueError as e:
        raise ConfigError(f"--workers: {workers!r} is not a comma-separated list of integers") from e
    if not counts or min(counts) < 1:
        raise ConfigError(f"--workers: {workers!r} needs positive integers")
    results = bench_search(config, counts, trials, steps, same_archs)
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return
    from rich.table import Table

    t = Table(title=f"search {config}")
    for col in (
        "workers",
        "trials",
        "failed",
        "wall s",
        "env steps",
        "steps/s",
        "best objective",
        "speed-up",
    ):
        t.add_column(col, justify="right")
    for r in results:
        best = "-" if r.best_objective is None else f"{r.best_objective:.3f}"
        t.add_row(
            str(r.workers),
            str(r.trials),
            str(r.failed),
            f"{r.wall_s:.1f}",
            f"{r.env_steps:,}",
            f"{r.steps_per_s:,.0f}",
            best,
            f"{r.speedup:.2f}x",
        )
    _console().print(t)


_STORE_HELP = "Store URL (default: $ROBONAS_STORE or sqlite:///runs/robonas.db)."

keys_app = typer.Typer(
    help="Ed25519 keys that sign artifacts (robots trust the public key).", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def keys_generate(
    out: str = typer.Option(..., "--out", help="Directory for the key pair."),
    name: str = typer.Option("robonas", "--name", help="File name stem of the pair."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing pair."),
) -> None:
    """Make an Ed25519 key pair: NAME.key (private, mode 0600) and NAME.pub (give it to robots)."""
    from device_agents.signing import generate_keypair, key_id, load_public_key

    private, public = generate_keypair(out, name=name, overwrite=overwrite)
    _console().print(
        f"private key {private}\npublic key  {public} (key id {key_id(load_public_key(public))})"
    )


@app.command()
def export(
    study: str = typer.Argument(..., help="Study name."),
    best: bool = typer.Option(
        False,
        "--best",
        help="Export the best-ranked complete trial whose p99 fits the latency budget (by the newest, possibly robot-calibrated, latency model).",
    ),
    trial: int | None = typer.Option(None, "--trial", help="Export this trial id."),
    fp32: bool = typer.Option(False, "--fp32", help="Float32 model instead of full int8."),
    key: str | None = typer.Option(
        None, "--key", help="Private key to sign with (default: $ROBONAS_SIGNING_KEY)."
    ),
    out: str | None = typer.Option(
        None, "--out", help="Artifact directory (default: under the run directory)."
    ),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Compile a trained trial to a TFLite artifact (int8 by default) with a parity check.

    The artifact is policy.tflite + manifest.json (+ manifest.sig when signed). The export is
    refused, with the figures, when the TFLite model loses more return in simulation than the
    config's [export].max_return_drop allows.
    """
    import os

    from robonas.errors import ConfigError
    from robonas.export.trial_export import export_trial

    if best == (trial is not None):
        raise ConfigError("export: give exactly one of --best or --trial ID")
    key = key or os.environ.get("ROBONAS_SIGNING_KEY")
    result = export_trial(_open_store(store), study, trial, fp32=fp32, key_path=key, out_dir=out)
    if as_json:
        print(json.dumps(result.manifest, indent=2, sort_keys=True))
    else:
        print(result.path)


def _open_store(url: str | None):
    from robonas.store import Store

    return Store(url)


@app.command()
def search(
    config: str = typer.Argument(..., help="Search config, e.g. launch/cartpole.toml."),
    study: str | None = typer.Option(
        None, "--study", help="Study name (default: [study].name or the file name)."
    ),
    workers: int | None = typer.Option(
        None, "--workers", help="Parallel trial processes (default: [executor].workers or the core count)."
    ),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    trials: int | None = typer.Option(None, "--trials", help="Override the number of trained trials."),
    steps: int | None = typer.Option(None, "--steps", help="Override env steps per trial."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run (or resume) an architecture search. Ctrl-C stops cleanly; the same command resumes."""
    from robonas.config import load_config
    from robonas.search.loop import Search, SearchPlan, default_workers, study_name_for

    cfg = load_config(config).with_overrides(trials=trials, steps=steps, workers=workers)
    name = study_name_for(config, cfg, study)
    plan = SearchPlan.build(cfg, name)  # every check runs before the store is touched
    n_workers = cfg.executor.workers or default_workers()
    db = _open_store(store)
    progress, hooks = _search_progress(as_json)
    with progress:
        summary = Search(plan, db, n_workers, hooks).run()
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        best = (
            "-"
            if summary.best_objective is None
            else f"{summary.best_objective:.3f} (trial {summary.best_trial})"
        )
        state = "interrupted; run the same command to resume" if summary.interrupted else "done"
        _console().print(
            f"study [bold]{summary.study}[/]: {state}. complete {summary.complete}, failed {summary.failed}, "
            f"rejected {summary.rejected}; best objective {best}; {summary.wall_s:.1f} s, "
            f"{summary.steps_per_s:,.0f} env steps/s"
        )
    if summary.interrupted:
        raise typer.Exit(130)


def _search_progress(quiet: bool):
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

    from robonas.search.loop import _Progress

    if quiet:
        return contextlib.nullcontext(), _Progress()
    bar = Progress(
        TextColumn("[bold]trials"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("best {task.fields[best]}"),
        TextColumn("{task.fields[sps]} steps/s"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=_console(),
        transient=False,
    )
    state: dict = {}

    def on_start(planned: int, done: int) -> None:
        state["task"] = bar.add_task("search", total=planned, completed=done, best="-", sps="-")

    def on_trial(summary) -> None:
        best = "-" if summary.best_objective is None else f"{summary.best_objective:.3f}"
        bar.update(
            state["task"],
            completed=summary.complete + summary.failed,
            best=best,
            sps=f"{summary.steps_per_s:,.0f}",
        )

    return bar, _Progress(on_start=on_start, on_trial=on_trial)


@app.command()
def status(
    study: str = typer.Argument(..., help="Study name."),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Counts of trials by status, best objective, env steps, last update."""
    from robonas.study_views import study_status

    info = study_status(_open_store(store), study)
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    c = _console()
    c.print(f"study [bold]{info['study']}[/] ({info['status']}), env {info['env']}, device {info['device']}")
    c.print("  " + ", ".join(f"{k} {v}" for k, v in info["counts"].items()))
    c.print(
        f"  best objective {info['best_objective']}, env steps {info['env_steps']:,}, updated {info['updated_at']}"
    )


@app.command()
def top(
    study: str = typer.Argument(..., help="Study name."),
    n: int = typer.Option(10, "--n", min=1, help="Rows to show."),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    as_json: bool = typer.Option(False, "--json"),
    all_trials: bool = typer.Option(False, "--all", help="Also list failed and rejected trials."),
) -> None:
    """Ranked trials: arch, AUC, asymptotic and predicted real return, p99 latency, params.

    The title names the latency and gap model versions that scored them; a trial whose p99 by the newest latency model is over the study's budget shows "over budget" as its status.
    """
    from robonas.study_views import ranked_trials

    table = ranked_trials(_open_store(store), study, n=n, include_unfinished=all_trials)
    if as_json:
        print(json.dumps(table, indent=2, default=str))
        return
    from rich.table import Table

    t = Table(
        title=f"{study}: ranked by {table['ranked_by']} ({', '.join(f'{k} {v}' for k, v in table['models'].items())})"
    )
    cols = ("rank", "trial", "arch", "auc", "asym", "pred real", "p99 ms", "params", "pareto", "status")
    for col in cols:
        t.add_column(col, justify="left" if col in ("arch", "status") else "right")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for row in table["rows"]:
        t.add_row(
            f(row["rank"], "d"),
            str(row["trial"]),
            row["arch"],
            f(row["auc"], ".3f"),
            f(row["asymptotic_return"], ".1f"),
            f(row["predicted_real_return"], ".1f"),
            f(row["p99_ms"], ".3f"),
            f(row["params"], ",d"),
            "*" if row["pareto"] else "",
            row["status"] if row.get("within_budget") is not False else "over budget",
        )
    _console().print(t)


@app.command()
def report(
    study: str = typer.Argument(..., help="Study name."),
    out: str = typer.Option(..., "--out", help="Output HTML file (self-contained, images inline)."),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
) -> None:
    """Write an HTML report: learning curves, Pareto front, latency and gap models, deployments."""
    from robonas.report import write_report

    print(write_report(_open_store(store), study, out))


@app.command()
def demo(
    quick: bool = typer.Option(False, "--quick", help="A shorter run (what the tests use)."),
    workdir: str | None = typer.Option(
        None, "--workdir", help="Where the demo writes (default runs/demo; wiped first)."
    ),
    keep: bool = typer.Option(False, "--keep", help="Resume in an existing workdir instead of wiping it."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """The whole loop on this machine, in two acts: (1) search, export, two local robot agents on reality profiles, deploy with canary, reports, latency (BENCH) and gap calibration, re-ranking, HTML report; (2) the same for a microcontroller robot far slower than its device prior, whose reports refit the models and move the ranking."""
    from robonas.demo import default_workdir, explain, next_summary, run_demo

    console = _console()
    say = (lambda _m: None) if as_json else console.print
    progress, hooks = _search_progress(as_json)
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
        before = {r["trial"]: r for r in act.before}
        for r in act.after:
            b = before[r["trial"]]
            real = act.measured.get(r["trial"])
            t.add_row(
                str(r["trial"]),
                r["arch"],
                str(b["rank"]),
                str(r["rank"]),
                f"{b['predicted_real_return']:.1f}",
                f"{r['predicted_real_return']:.1f}",
                ", ".join(f"{k} {v:.0f}" for k, v in real.items()) if real else "-",
                f"{r['p99_ms']:.3f}" + (" over" if r.get("within_budget") is False else ""),
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


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `robonas` console script."""
    from device_agents.errors import DeviceError
    from robonas.errors import RobonasError

    handled: tuple[type[BaseException], ...] = (RobonasError, DeviceError)
    try:
        from sim.errors import SimError

        handled = handled + (SimError,)
    except ImportError:  # sim is part of the host install; guard anyway for a trimmed install
        pass
    try:
        app(args=argv, standalone_mode=True)
    except handled as e:
        print(f"robonas: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
