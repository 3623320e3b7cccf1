"""`robonas bench env|model|search`: speed figures against a baseline measured in the same run."""

from __future__ import annotations

import json

import typer

from robonas.cli.common import console

bench_app = typer.Typer(help="Benchmarks: environments and TFLite models.", no_args_is_help=True)


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
        help="Random search under the config's seed, so every worker count trains the same archs "
        "(default), or the config's own strategy.",
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
    console().print(t)
