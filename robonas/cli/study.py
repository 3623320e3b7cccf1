"""The researcher's commands on one study: search, status, top, report, export.

Registered on the root app by `robonas.cli.app`, in the order `robonas --help` lists them.
"""

from __future__ import annotations

import json
import sys

import typer

from robonas.cli.common import STORE_HELP, console, open_store, search_progress


def export(
    study: str = typer.Argument(..., help="Study name."),
    best: bool = typer.Option(
        False,
        "--best",
        help="Export the best-ranked complete trial whose p99 fits the latency budget "
        "(by the newest, possibly robot-calibrated, latency model).",
    ),
    trial: int | None = typer.Option(None, "--trial", help="Export this trial id."),
    fp32: bool = typer.Option(False, "--fp32", help="Float32 model instead of full int8."),
    key: str | None = typer.Option(
        None, "--key", help="Private key to sign with (default: $ROBONAS_SIGNING_KEY)."
    ),
    out: str | None = typer.Option(
        None, "--out", help="Artifact directory (default: under the run directory)."
    ),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Compile a trained trial to a TFLite artifact (int8 by default) with a parity check.

    The artifact is policy.tflite + manifest.json (+ manifest.sig when signed). The export is
    refused, with the figures, when the TFLite model loses more return in simulation than the
    config's \\[export].max_return_drop allows.
    """
    import os

    from robonas.errors import ConfigError
    from robonas.export.trial_export import export_trial

    if best == (trial is not None):
        raise ConfigError("export: give exactly one of --best or --trial ID")
    key = key or os.environ.get("ROBONAS_SIGNING_KEY")
    result = export_trial(open_store(store), study, trial, fp32=fp32, key_path=key, out_dir=out)
    if as_json:
        print(json.dumps(result.manifest, indent=2, sort_keys=True))
    else:
        print(result.path)


def search(
    config: str = typer.Argument(..., help="Search config, e.g. launch/cartpole.toml."),
    study: str | None = typer.Option(
        None, "--study", help="Study name (default: \\[study].name or the file name)."
    ),
    workers: int | None = typer.Option(
        None, "--workers", help="Parallel trial processes (default: \\[executor].workers or the core count)."
    ),
    executor: str | None = typer.Option(
        None,
        "--executor",
        # rich reads [..] as markup: escaped brackets print as written
        help="Where trials run: local (worker processes here) or ray (tasks on the Ray cluster of "
        "RAY_ADDRESS or the config's executor.address, else a local Ray; pip install "
        "'robonas\\[ray]'). Default: the config's executor.kind.",
    ),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    artifacts: str | None = typer.Option(
        None,
        "--artifacts",
        help="Directory for trial weights and exports, readable by every worker (default: "
        "ROBONAS_ARTIFACTS, the config's artifacts.dir, the study's own, else beside a SQLite store; "
        "required with a shared PostgreSQL store).",
    ),
    trials: int | None = typer.Option(None, "--trials", help="Override the number of trained trials."),
    steps: int | None = typer.Option(None, "--steps", help="Override env steps per trial."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run (or resume) an architecture search. Ctrl-C stops cleanly; the same command resumes.

    Several processes (here or on other machines sharing the store) may run the same study at
    once: each claims trials, asks are made one at a time, and a killed process's trials are
    run again by the others."""
    from robonas.config import load_config
    from robonas.search.loop import Search, SearchPlan, default_workers, study_name_for

    cfg = load_config(config).with_overrides(trials=trials, steps=steps, workers=workers, executor=executor)
    name = study_name_for(config, cfg, study)
    plan = SearchPlan.build(cfg, name)  # every check runs before the store is touched
    n_workers = cfg.executor.workers or default_workers()
    db = open_store(store)
    progress, hooks = search_progress(as_json)
    with progress:
        summary = Search(plan, db, n_workers, hooks, artifact_dir=artifacts).run()
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        best = (
            "-"
            if summary.best_objective is None
            else f"{summary.best_objective:.3f} ± {summary.best_spread or 0.0:.3f} over "
            f"{summary.best_seeds} seed{'s' if summary.best_seeds != 1 else ''} (trial {summary.best_trial})"
        )
        state = "interrupted; run the same command to resume" if summary.interrupted else "done"
        console().print(
            f"study [bold]{summary.study}[/]: {state}. complete {summary.complete}, pruned {summary.pruned}, "
            f"failed {summary.failed}, rejected {summary.rejected}, seed-check trials {summary.seed_trials}; "
            f"best objective {best}; {summary.wall_s:.1f} s, {summary.steps_per_s:,.0f} env steps/s"
        )
    if summary.interrupted:
        raise typer.Exit(130)
    if summary.complete + summary.pruned == 0:
        from robonas.study_views import study_status

        reasons = list(study_status(db, name).failures.values())
        why = f"; the last failure: {reasons[-1]}" if reasons else ""
        print(
            f"robonas: error: no trial of study {name!r} completed ({summary.failed} failed, "
            f"{summary.rejected} rejected){why}",
            file=sys.stderr,
        )
        raise typer.Exit(1)


def status(
    study: str = typer.Argument(..., help="Study name."),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Counts of trials by status, best objective, env steps, last update."""
    from robonas.study_views import study_status

    info = study_status(open_store(store), study)
    if as_json:
        print(json.dumps(info.to_dict(), indent=2, default=str))
        return
    c = console()
    c.print(f"study [bold]{info.study}[/] ({info.status}), env {info.env}, device {info.device}")
    c.print("  " + ", ".join(f"{k} {v}" for k, v in info.counts.items()))
    c.print(
        f"  best objective {info.best_objective} over {info.best_seeds} seed(s), "
        f"env steps {info.env_steps:,}, updated {info.updated_at}"
    )
    for holder, n in info.running_by.items():
        c.print(f"  running {n} trial(s) held by {holder}", markup=False)
    if info.lapsed:
        c.print(f"  {info.lapsed} claim(s) lapsed: their process stopped; a search run takes them over")
    for trial_id, reason in info.failures.items():
        c.print(f"  trial {trial_id} failed: {reason}", markup=False)


def top(
    study: str = typer.Argument(..., help="Study name."),
    n: int | None = typer.Option(None, "--n", min=1, help="Rows to show (default: every complete trial)."),
    robot: str | None = typer.Option(
        None, "--robot", help="Rank by the predicted real return on this robot (needs identified twins)."
    ),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON: every prediction with its std and 90% interval, per robot too."
    ),
    all_trials: bool = typer.Option(False, "--all", help="Also list failed and rejected trials."),
    seeds: bool = typer.Option(
        False,
        "--seeds",
        help="List every seed of a candidate, each under its candidate's rank (default: its best seed).",
    ),
) -> None:
    """Ranked trials: arch, AUC, asymptotic and predicted real return with its 90% interval, p99 latency, params.

    "pred real" is the return expected on the robots: the simulated asymptote minus the modelled sim-to-real gap, or, once robots have identified twins, the candidate's return in the twins corrected by the residual across robots (the mean or worst over the fleet, [objective] fleet). The title names the model versions that scored them; a trial whose p99 by the newest latency model is over the study's budget shows "over budget" as its status."""  # noqa: E501  (typer prints a docstring's line breaks as they are)
    from robonas.study_views import ranked_trials

    table = ranked_trials(
        open_store(store), study, n=n, include_unfinished=all_trials, robot=robot, every_seed=seeds
    )
    if as_json:
        print(json.dumps(table.to_dict(), indent=2, default=str))
        return
    from rich.table import Table

    t = Table(
        title=f"{study}: ranked by {table.ranked_by} "
        f"({', '.join(f'{k} {v}' for k, v in table.models.items())})"
    )
    cols = (
        "rank",
        "trial",
        "arch",
        "seeds",
        "objective",
        "auc",
        "asym",
        "pred real",
        "90% interval",
        "p99 ms",
        "params",
        "pareto",
        "status",
    )
    for col in cols:
        t.add_column(col, justify="left" if col in ("arch", "status") else "right")

    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for row in table.rows:
        t.add_row(
            f(row.rank, "d"),
            str(row.trial),
            row.arch,
            str(row.seeds),
            "-"
            if row.seed_mean is None
            else f"{row.seed_mean:.3f}" + (f" ± {row.seed_std:.3f}" if row.seeds > 1 else ""),
            f(row.auc, ".3f"),
            f(row.asymptotic_return, ".1f"),
            f(row.predicted_real_return, ".1f"),
            "-"
            if row.predicted_real_lo90 is None or row.predicted_real_hi90 is None
            else f"{row.predicted_real_lo90:.0f} .. {row.predicted_real_hi90:.0f}",
            f(row.p99_ms, ".3f"),
            f(row.params, ",d"),
            "*" if row.pareto else "",
            row.status if row.within_budget is not False else "over budget",
        )
    c = console()
    c.print(t)
    from robonas.study_views import study_status

    failures = study_status(open_store(store), study).failures
    for trial_id, reason in failures.items():  # why the missing ones are missing
        c.print(f"trial {trial_id} failed: {reason}", markup=False, highlight=False)


def report(
    study: str = typer.Argument(..., help="Study name."),
    out: str = typer.Option(..., "--out", help="Output HTML file (self-contained, images inline)."),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Write an HTML report: learning curves, Pareto front, latency and gap models, deployments."""
    from robonas.report import write_report

    print(write_report(open_store(store), study, out))
