"""`robonas bench env|model|search`: speed figures against a baseline measured in the same run;
`robonas bench gap`: how well each predictor of a candidate's real return does on a robot it was not
fitted on (leave one robot out); `robonas bench latency`: how repeatable a latency calibration is."""

from __future__ import annotations

import json
from typing import Any

import typer

from robonas.cli.common import STORE_HELP, console, search_progress

bench_app = typer.Typer(
    help="Benchmarks: environments, TFLite models, searches and sim-to-real predictors.", no_args_is_help=True
)


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
    console().print(table)


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


@bench_app.command("agent-step")
def bench_agent_step_cmd(
    models: list[str] = typer.Argument(
        ..., help="A .tflite policy or an artifact directory (several allowed)."
    ),
    steps: int = typer.Option(5000, "--steps", help="Steps of each span per model."),
    rounds: int = typer.Option(5, "--rounds", help="Interleaved rounds (medians of round p50s)."),
    robot: str = typer.Option("null", "--robot", help='"null" (a robot that costs nothing) or sim:PROFILE.'),
    history: int | None = typer.Option(None, "--history", help="Frames stacked (default: the model's)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The agent's control-loop step against the bare interpreter invoke, same run: invoke,
    bench step (quantise + invoke + dequantise), act, and the loop step p50, with the ratios
    over the invoke (target: loop step at most 1.5x the invoke)."""
    from robonas.bench.agent_step import bench_agent_step, format_agent_step

    results = [bench_agent_step(m, steps, robot=robot, history=history, rounds=rounds) for m in models]
    if as_json:
        print(json.dumps(results, indent=2, default=str))
    else:
        for r in results:
            print(format_agent_step(r))


@bench_app.command("search")
def bench_search_cmd(
    config: str = typer.Argument("launch/cartpole.toml", help="Search config."),
    workers: str = typer.Option(
        "1,2", "--workers", help="Comma-separated worker counts (trials at once), measured in this order."
    ),
    executors: str = typer.Option(
        "local",
        "--executors",
        help="Comma-separated trial executors, local and/or ray, each at every worker count; the "
        "first executor at the first worker count is the baseline of every ratio.",
    ),
    trials: int | None = typer.Option(None, "--trials", help="Override trained trials."),
    steps: int | None = typer.Option(None, "--steps", help="Override env steps per trial."),
    same_archs: bool = typer.Option(
        True,
        "--same-archs/--config-strategy",
        help="Random search under the config's seed, so every row trains the same archs "
        "(default), or the config's own strategy.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Wall time, trials per hour and aggregate env steps/s of a whole search at several worker
    counts on each executor, every run in a fresh temporary store, with ratios against the first
    run. A Ray run's wall time includes starting and stopping its local Ray; "1st trial s" is the
    time to the first finished trial. Failed trials go to stderr and count in no rate."""
    from rich.console import Console

    from robonas.bench.search_workers import bench_search
    from robonas.errors import ConfigError

    try:
        counts = [int(w) for w in workers.split(",") if w.strip()]
    except ValueError as e:
        raise ConfigError(f"--workers: {workers!r} is not a comma-separated list of integers") from e
    if not counts or min(counts) < 1:
        raise ConfigError(f"--workers: {workers!r} needs positive integers")
    kinds = [k.strip() for k in executors.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("local", "ray")]
    if not kinds or bad:
        raise ConfigError(f"--executors: {executors!r} is not a comma-separated list of local, ray")
    err = Console(stderr=True)
    results = bench_search(
        config, counts, trials, steps, same_archs, kinds, log=lambda line: err.print(line, highlight=False)
    )
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return
    from rich.table import Table

    base = results[0]
    t = Table(
        title=f"search {config}; ratios against {base.executor} with {base.workers} worker(s); "
        "trials = trained (complete + pruned + seed check)"
    )
    for col in (
        "executor",
        "workers",
        "trials",
        "failed",
        "wall s",
        "1st trial s",
        "env steps",
        "steps/s",
        "trials/h",
        "best objective",
        "speed-up (wall)",
        "trials/h ratio",
        "steps/s ratio",
    ):
        t.add_column(col, justify="left" if col == "executor" else "right")
    for r in results:
        t.add_row(
            r.executor,
            str(r.workers),
            str(r.trained),
            str(r.failed),
            f"{r.wall_s:.1f}",
            _figure(r.first_trial_s, ".1f"),
            f"{r.env_steps:,}",
            f"{r.steps_per_s:,.0f}",
            f"{r.trials_per_h:,.0f}",
            _figure(r.best_objective, ".3f"),
            f"{r.speedup:.2f}x",
            f"{r.trials_per_h_ratio:.2f}x",
            f"{r.steps_per_s_ratio:.2f}x",
        )
    console().print(t)


def _figure(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


@bench_app.command("gap")
def bench_gap_cmd(
    study: str | None = typer.Option(
        None, "--study", help="Use this study's complete trials (default: run a small search first)."
    ),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP + " With --study."),
    config: str = typer.Option(
        "launch/cartpole.toml", "--config", help="Search config of the search run without --study."
    ),
    trials: int = typer.Option(12, "--trials", min=2, help="Trained trials of that search."),
    steps: int | None = typer.Option(
        None, "--steps", min=1, help="Env steps per trial (default: the config's)."
    ),
    workers: int = typer.Option(2, "--workers", min=1, help="Training processes of that search."),
    profiles: str | None = typer.Option(
        None,
        "--profiles",
        help="Comma-separated reality profiles (default: the env's, except MAC-rate computers).",
    ),
    episodes: int = typer.Option(10, "--episodes", min=1, help="Measured episodes per candidate and robot."),
    twin_episodes: int = typer.Option(10, "--twin-episodes", min=1, help="Episodes per candidate in a twin."),
    records: int = typer.Option(5, "--records", min=1, help="Recorded episodes per robot for its twin."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of every episode."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Leave-one-robot-out over the reality profiles of the candidates' env: for each of five
    predictors of a candidate's return on a robot (the simulated return, the randomised-robustness
    return, the heuristic gap model, the Bayesian gap model, the twin-based prediction), its mean
    absolute error as a share of the return range, 90% interval coverage and Spearman correlation.
    Progress goes to stderr."""
    from rich.console import Console
    from rich.table import Table

    from robonas.bench.gap import bench_gap
    from robonas.errors import ConfigError

    if store is not None and study is None:
        raise ConfigError(
            "--store names the store of --study; without --study the benchmark runs its own search"
        )
    err = Console(stderr=True)
    names = [p.strip() for p in profiles.split(",") if p.strip()] if profiles else None
    result = bench_gap(
        study=study,
        store_url=store,
        config_path=config,
        trials=trials,
        steps=steps,
        workers=workers,
        profiles=names,
        episodes=episodes,
        twin_episodes=twin_episodes,
        records=records,
        seed=seed,
        log=lambda line: err.print(line, highlight=False),
        search_progress=None if study is not None else search_progress(as_json),
    )
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    source = f"study {result.study}" if study is not None else f"a {trials}-trial search of {config}"
    t = Table(
        title=f"leave-one-robot-out, {len(result.candidates)} candidates from {source}, "
        f"{len(result.profiles)} robots of {result.env_id}, {result.episodes} measured episodes each"
    )
    for col in ("predictor", "MAE % of range", "90% coverage", "Spearman", "Spearman per robot"):
        t.add_column(col, justify="left" if col == "predictor" else "right")
    for row in result.rows():
        t.add_row(
            row["predictor"],
            f"{100 * row['mae_share']:.1f}%",
            f"{100 * row['coverage90']:.0f}%",
            _figure(row["spearman"], ".2f"),
            _figure(row["spearman_within"], ".2f"),
        )
    out = console()
    out.print(t)
    out.print(
        "intervals: sim return +/- 1.645 x its stored std; robustness return: none stored (the point); "
        "Spearman per robot: mean over robots of the rank correlation across candidates"
    )
    r = Table(title=f"per robot: its twin from records of {result.recorder}; MAE % of range per predictor")
    r.add_column("robot")
    for col in ("records", "delay (true)", "id s", *(s.predictor for s in result.scores)):
        r.add_column(col, justify="right")
    for info in result.robots:
        name = info["robot"]
        delay = (
            f"{info['delay']} ({info['true_delay']})" if info["identified"] else f"- ({info['true_delay']})"
        )
        seconds = f"{info['seconds']:.1f}" if info["identified"] else "-"
        maes = [f"{100 * s.mae_share_by_robot[name]:.1f}%" for s in result.scores]
        r.add_row(name, str(info["records"]), delay, seconds, *maes)
    out.print(r)
    for info in result.robots:
        if not info["identified"]:
            out.print(f"{info['robot']}: no twin ({info['error']}); fleet-level prediction used")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    out.print(f"wall time {result.wall_s:.0f} s ({stages})")


def _noise_flag(noise: dict[str, Any]) -> str:
    return "" if noise["ok"] else (" refused" if noise["refuse"] else " warn")


@bench_app.command("latency")
def bench_latency_cmd(
    fleet: str = typer.Option(..., "--fleet", help="Fleet inventory (launch/fleet.toml)."),
    agent: str = typer.Option(..., "--agent", help="The robot to measure on."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Calibrations in a row."),
    n_archs: int = typer.Option(16, "--n-archs", min=1, help="Probe architectures each fit is fitted on."),
    holdout: int = typer.Option(12, "--holdout", min=1, help="Held-out probe architectures."),
    runs: int = typer.Option(600, "--runs", min=1, help="Measured steps per probe, over all rounds."),
    rounds: int = typer.Option(15, "--rounds", min=1, help="Interleaved rounds the steps are split into."),
    seed: int = typer.Option(0, "--seed", help="Seed of the probe selection and weights."),
    study: str | None = typer.Option(None, "--study", help="Draw probes from this study's space."),
    config: str | None = typer.Option(
        None, "--config", help="...or from this config's space (default: the demo's cart-pole space)."
    ),
    store: str | None = typer.Option(
        None,
        "--store",
        help="Store each repeat's model and timings in this store (default: nothing is stored; "
        "--study alone reads $ROBONAS_STORE or sqlite:///runs/robonas.db).",
    ),
    force: bool = typer.Option(False, "--force", help="With --store: store refused (noisy) repeats too."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Run the whole latency calibration several times in a row on one robot (probes selected and
    compiled once) and print each repeat's held-out MAPE and share within +-10% with their 95%
    intervals, the noise, and the spread across repeats. Progress goes to stderr."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from robonas.bench.latency import TARGET_WITHIN_10PCT, bench_latency, percent
    from robonas.cli.calibrate import space_for
    from robonas.models import latency_probe
    from robonas.store import Store

    space = space_for(config, study, store)
    db = Store(store) if store is not None else None
    err = Console(stderr=True)
    entry, client = latency_probe.open_agent(fleet, agent)
    try:
        with client, Progress(console=err, transient=True) as bar:
            compiling = bar.add_task("compiling probes (once)", total=n_archs + holdout)
            timing = bar.add_task(f"BENCH on {entry.name}", total=1, start=False)

            def compiled(done: int, total: int) -> None:
                bar.update(compiling, completed=done, total=total)

            def timed(repeat: int, done: int, total: int) -> None:
                bar.start_task(timing)
                bar.update(
                    timing, completed=done, total=total, description=f"BENCH on {entry.name}, repeat {repeat}"
                )

            result = bench_latency(
                client,
                entry.name,
                entry.device,
                space,
                repeats=repeats,
                n_archs=n_archs,
                holdout=holdout,
                runs=runs,
                rounds=rounds,
                seed=seed,
                store=db,
                force=force,
                compile_progress=compiled,
                progress=timed,
                log=lambda line: err.print(line, highlight=False, soft_wrap=True),
            )
    finally:
        if db is not None:
            db.close()
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    t = Table(
        title=f"latency calibration x{len(result.repeats)} on {result.agent} ({result.device}): "
        f"{result.n_fit} fitting + {result.n_holdout} held-out probes, {result.runs} steps each "
        f"in {result.rounds} rounds; probes compiled once in {result.compile_s:.0f} s"
    )
    columns = ("repeat", "MAPE", "MAPE 95% CI", "within +-10%", "share 95% CI", "prior MAPE", "noise worst")
    for col in (*columns, "s", "stored"):
        t.add_column(col, justify="right")
    for r in result.repeats:
        stored = "-" if r.version is None else f"v{r.version}"
        t.add_row(
            str(r.repeat),
            percent(r.mape),
            f"{percent(r.mape_ci[0])}-{percent(r.mape_ci[1])}",
            f"{r.k_within_10pct}/{r.n_holdout} = {r.within_10pct:.0%}",
            f"{r.within_10pct_ci[0]:.0%}-{r.within_10pct_ci[1]:.0%}",
            percent(r.prior_mape),
            percent(r.noise["worst"])
            + ("" if r.noise["ok"] else (" refused" if r.noise["refuse"] else " warn")),
            f"{r.seconds:.1f}",
            stored,
        )
    out = console()
    out.print(t)
    s = result.spread()
    out.print(
        f"spread across {len(result.repeats)} repeats: MAPE {percent(s['mape_min'])} to "
        f"{percent(s['mape_max'])}, within +-10% {s['within_10pct_min']:.0%} to {s['within_10pct_max']:.0%} "
        f"(target: every repeat >= {TARGET_WITHIN_10PCT:.0%}: "
        f"{'met' if result.meets_target() else 'not met'})",
        highlight=False,
    )
    for r in result.repeats:
        if not r.noise["ok"]:
            out.print(f"repeat {r.repeat}: {r.noise['message']}", highlight=False, soft_wrap=True)
        if r.not_stored:
            out.print(f"repeat {r.repeat}: not stored: {r.not_stored}", highlight=False)
