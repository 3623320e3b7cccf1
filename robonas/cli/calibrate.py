"""`robonas calibrate latency|gap` and `robonas rerank`: the CLI of the closed loop.

Imports only typer at module level; the work is imported inside each command.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from robonas.models.recalibrate import RankChange
    from robonas.space import SearchSpace
    from robonas.store import Store

calibrate_app = typer.Typer(
    help="Refit the latency and gap models from what robots measured.", no_args_is_help=True
)
_STORE_HELP = "Store URL (default: $ROBONAS_STORE or sqlite:///runs/robonas.db)."


def space_for(config: str | None, study: str | None, store: Store | str | None) -> SearchSpace:
    """The search space to draw probes from: a study's stored config, or a config file (default:
    the demo's cart-pole space). `store` (a Store, or its URL) is read only for `study`."""
    from robonas.config import load_config, parse_config
    from robonas.search.loop import EnvInfo
    from robonas.space import SearchSpace
    from robonas.store import Store

    if study:
        db = store if isinstance(store, Store) else Store(store)
        try:
            cfg = parse_config(db.get_study(study).config["search"], f"study {study}")
        finally:
            if db is not store:
                db.close()
    elif config:
        cfg = load_config(config)
    else:  # the embedded cart-pole space of the demo
        from robonas.demo import DemoSettings, demo_config

        cfg = demo_config(DemoSettings.for_mode(quick=True))
    env = EnvInfo.probe(cfg.env.id, cfg.env.kwargs)
    return SearchSpace.from_config(cfg.space, env.obs_dim, env.act_dim)


def describe_calibration(m: dict[str, Any]) -> str:
    """The held-out figures of a calibration, each beside its 95% interval, and the prior's."""
    from robonas.bench.latency import percent

    mlo, mhi = m["holdout_mape_ci"]
    slo, shi = m["holdout_within_10pct_ci"]
    noise = m.get("noise") or {}
    return (
        f"held-out MAPE {percent(m['holdout_mape'])} (95% CI {percent(mlo)}-{percent(mhi)}), "
        f"within +-10%: {m['holdout_k_within_10pct']} of {m['n_holdout']} = "
        f"{m['holdout_within_10pct']:.0%} (95% CI {slo:.0%}-{shi:.0%}); uncalibrated prior: "
        f"MAPE {percent(m['prior_holdout_mape'])}, within +-10% {m['prior_within_10pct']:.0%}; "
        f"noise worst {percent(float(noise.get('worst', float('nan'))))} over {m.get('rounds', '?')} rounds"
    )


@calibrate_app.command("latency")
def calibrate_latency(
    fleet: str = typer.Option(..., "--fleet", help="Fleet inventory (launch/fleet.toml)."),
    agent: str = typer.Option(..., "--agent", help="The robot to measure on."),
    n_archs: int = typer.Option(16, "--n-archs", min=1, help="Probe architectures the model is fitted on."),
    holdout: int = typer.Option(
        12, "--holdout", min=1, help="Held-out probe architectures (covering the space) for the figures."
    ),
    runs: int = typer.Option(600, "--runs", min=1, help="Measured steps per probe, over all rounds."),
    rounds: int = typer.Option(
        15, "--rounds", min=1, help="Interleaved rounds the steps are split into (more: less noise)."
    ),
    force: bool = typer.Option(False, "--force", help="Store the model even if the timings are too noisy."),
    study: str | None = typer.Option(None, "--study", help="Draw probes from this study's space."),
    config: str | None = typer.Option(
        None, "--config", help="...or from this config's space (default: the demo's cart-pole space)."
    ),
    rerank: str | None = typer.Option(None, "--rerank", help="Re-rank this study afterwards."),
    seed: int = typer.Option(0, "--seed"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Time two space-covering sets of architectures on a robot (one to fit, one held out),
    fit and store a new latency model.

    Prints the held-out mean absolute percentage error and the share of held-out architectures
    predicted within +-10%, each with its 95% confidence interval, beside the uncalibrated
    prior's. Timings too noisy to resolve +-10% are refused (nothing stored) unless --force;
    noisy ones are stored with a warning.
    """
    from rich.console import Console
    from rich.progress import Progress

    from robonas.models import latency_probe
    from robonas.models.recalibrate import calibrate_latency_on_agent, rescore_study
    from robonas.store import Store

    db = Store(store)
    space = space_for(config, study, db)
    entry, client = latency_probe.open_agent(fleet, agent)
    with client, Progress(transient=True, disable=as_json) as bar:
        compiling = bar.add_task("compiling probes", total=n_archs + holdout)
        timing = bar.add_task(f"BENCH on {entry.name}", total=n_archs + holdout, start=False)

        def compiled(done: int, total: int) -> None:
            bar.update(compiling, completed=done, total=total)

        def timed(done: int, total: int) -> None:
            bar.start_task(timing)
            bar.update(timing, completed=done, total=total)

        _model, version, m = calibrate_latency_on_agent(
            db,
            client,
            entry.name,
            entry.device,
            space,
            n_archs,
            runs,
            seed,
            progress=timed,
            holdout=holdout,
            rounds=rounds,
            force=force,
            compile_progress=compiled,
        )
    err = Console(stderr=True)
    if m.get("noise_warning"):
        err.print(f"warning: {m['noise_warning']}", highlight=False, soft_wrap=True)
    out = {"device": entry.device, "version": version, **{k: v for k, v in m.items() if k != "holdout"}}
    if rerank:
        changes, models = rescore_study(db, rerank)
        out["reranked"] = {
            "study": rerank,
            "models": models,
            "moved": sum(c.rank_before != c.rank_after for c in changes),
        }
    if as_json:
        print(json.dumps(out, indent=2))
        return
    Console().print(
        f"latency model for [bold]{entry.device}[/] version {version}: {describe_calibration(m)}",
        highlight=False,
    )


@calibrate_app.command("gap")
def calibrate_gap_cmd(
    study: str = typer.Option(..., "--study", help="Study whose (trial, robot report) pairs to fit."),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    rerank: bool = typer.Option(True, "--rerank/--no-rerank", help="Re-rank the study afterwards."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Fit the Bayesian sim-to-real gap model from every stored real report; store a version."""
    from rich.console import Console

    from robonas.models.recalibrate import calibrate_gap, rescore_study
    from robonas.store import Store

    db = Store(store)
    _model, version, m = calibrate_gap(db, study)
    out = {
        "study": study,
        "version": version,
        "n": m["n"],
        "mae": m["mae"],
        "mae_share_of_range": m["mae_share_of_range"],
        "coefficients": m["coefficients"],
    }
    if rerank:
        changes, models = rescore_study(db, study)
        out["ranking"] = [c.to_dict() for c in changes]
        out["models"] = models
    if as_json:
        print(json.dumps(out, indent=2))
        return
    Console().print(
        f"gap model for [bold]{study}[/] version {version} from {m['n']} (trial, robot) "
        f"pairs: MAE {m['mae']:.1f} ({m['mae_share_of_range']:.1%} of the return range)"
    )
    for name, (mean, std) in m["coefficients"].items():
        Console().print(f"  {name:16s} {mean:+.4f} +- {std:.4f}")


def rerank_command(
    study: str = typer.Argument(..., help="Study name."),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Re-score a study with the newest latency and gap models and show how the ranking moved."""
    from robonas.models.recalibrate import rescore_study
    from robonas.store import Store

    changes, models = rescore_study(Store(store), study)
    if as_json:
        print(json.dumps({"models": models, "ranking": [c.to_dict() for c in changes]}, indent=2))
        return
    print_rank_changes(changes, models)


def print_rank_changes(changes: Sequence[RankChange], models: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="ranking with " + ", ".join(models.values()))
    for col in ("rank", "was", "trial", "arch", "pred real (was)", "p99 ms (was)", "measured real"):
        t.add_column(col, justify="left" if col == "arch" else "right")
    for c in changes:
        t.add_row(
            str(c.rank_after),
            str(c.rank_before),
            str(c.trial_id),
            c.arch,
            f"{c.predicted_real_after:.1f} ({c.predicted_real_before:.1f})",
            f"{c.p99_after:.4f} ({c.p99_before:.4f})",
            "-" if c.measured_real is None else f"{c.measured_real:.1f}",
        )
    Console(width=160).print(t)
