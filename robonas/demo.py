"""`robonas demo`: the whole loop on one machine, on embedded defaults.

1. a short architecture search on the cart-pole (robonas/data/demo.toml),
2. export of the top feasible candidates to signed int8 TFLite artifacts,
3. two local robot agents, each driving a reality profile (simulated stand-ins for physical
   robots: `cartpole-lab-a`, and `cartpole-laggy-c` with a long actuation delay),
4. deploy with a canary to both, then fresh runs: real inference timings, honest returns,
5. latency calibration on one agent (BENCH of a space-covering probe set),
6. gap calibration from every (trial, robot) report, re-ranking with both new models,
7. a summary of how the ranking moved and why, and the HTML report.

Everything is a real process and a real measurement; only the robots are simulated.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from robonas.errors import RobonasError

ROBOTS = (("lab-a", "sim:cartpole-lab-a"), ("laggy-c", "sim:cartpole-laggy-c"))


@dataclass(frozen=True)
class DemoSettings:
    trials: int
    steps: int
    checkpoints: int
    eval_episodes: int
    export_top: int
    canary_episodes: int
    run_episodes: int
    latency_probes: int
    bench_runs: int

    @classmethod
    def for_mode(cls, quick: bool) -> DemoSettings:
        if quick:
            return cls(trials=3, steps=6000, checkpoints=3, eval_episodes=3, export_top=2,
                       canary_episodes=1, run_episodes=3, latency_probes=6, bench_runs=200)
        return cls(trials=6, steps=20000, checkpoints=5, eval_episodes=5, export_top=3,
                   canary_episodes=2, run_episodes=8, latency_probes=12, bench_runs=500)


@dataclass
class DemoResult:
    workdir: Path
    report: Path | None = None
    wall_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    before: list[dict[str, Any]] = field(default_factory=list)
    after: list[dict[str, Any]] = field(default_factory=list)
    measured: dict[int, dict[str, float]] = field(default_factory=dict)
    exported: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    gap: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["workdir"], d["report"] = str(self.workdir), str(self.report) if self.report else None
        return d


def demo_config(settings: DemoSettings):
    from robonas.config import parse_config

    import tomllib

    text = resources.files("robonas").joinpath("data/demo.toml").read_text()
    data = tomllib.loads(text)
    data["budget"].update(trials=settings.trials, steps_per_trial=settings.steps,
                          checkpoints=settings.checkpoints, eval_episodes=settings.eval_episodes)
    return parse_config(data, "robonas/data/demo.toml")


def _ranking(store, study: str) -> list[dict[str, Any]]:
    from robonas.study_views import ranked_trials

    return ranked_trials(store, study, n=10_000)["rows"]


def run_demo(workdir: Path, quick: bool = False, fresh: bool = True,
             say: Callable[[str], None] = print, progress_hooks: Any = None) -> DemoResult:
    from device_agents.signing import generate_keypair
    from robonas.export import ExportRefused, export_trial
    from robonas.fleet.client import AgentClient
    from robonas.fleet.deploy import rollout
    from robonas.fleet.inventory import load_inventory
    from robonas.fleet.reports import artifact_for_sha, record_report, register_device
    from robonas.local_agents import LocalAgent, write_fleet
    from robonas.recalibrate import calibrate_gap, calibrate_latency_on_agent, rescore_study
    from robonas.report import write_report
    from robonas.search import Search, SearchPlan, default_workers
    from robonas.store import Store

    settings = DemoSettings.for_mode(quick)
    workdir = Path(workdir).resolve()
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result = DemoResult(workdir)
    t_start = time.perf_counter()

    def phase(name: str, t0: float) -> None:
        result.phases[name] = round(time.perf_counter() - t0, 2)

    cfg = demo_config(settings)
    study = cfg.study.name
    store = Store(f"sqlite:///{workdir / 'robonas.db'}")

    # 1. search
    t0 = time.perf_counter()
    say(f"[1/7] search: {settings.trials} trials x {settings.steps} env steps on {cfg.env.id}")
    plan = SearchPlan.build(cfg, study)
    summary = Search(plan, store, min(default_workers(), 2), progress_hooks).run()
    if summary.interrupted:
        raise KeyboardInterrupt
    phase("search", t0)
    result.before = _ranking(store, study)
    if not result.before:
        raise RobonasError("demo: the search produced no complete trial; see `robonas top demo --all`")

    # 2. export the top feasible candidates, signed
    t0 = time.perf_counter()
    key, pub = generate_keypair(workdir / "keys")
    say(f"[2/7] export: top {settings.export_top} candidates to signed int8 TFLite")
    artifacts: dict[int, Path] = {}
    for row in result.before:
        if len(artifacts) >= settings.export_top:
            break
        try:
            exp = export_trial(store, study, row["trial"], key_path=key)
        except ExportRefused as e:
            result.refused[row["trial"]] = str(e)
            say(f"      trial {row['trial']}: export refused: {e}")
            continue
        artifacts[row["trial"]] = exp.path
        parity = exp.manifest.get("parity") or {}
        say(f"      trial {row['trial']} ({row['arch']}): {exp.path.name}, int8 return "
            f"{parity.get('tflite_return', float('nan')):.1f} vs torch {parity.get('torch_return', float('nan')):.1f}")
    result.exported = list(artifacts)
    phase("export", t0)
    if not artifacts:
        raise RobonasError("demo: every export was refused by the parity check")

    # 3. robots
    t0 = time.perf_counter()
    say("[3/7] robots: " + ", ".join(f"{n} ({r})" for n, r in ROBOTS) + " as local agent processes")
    agents = [LocalAgent(n, r, cfg.device.profile, workdir / "agents" / n, pub) for n, r in ROBOTS]
    try:
        for a in agents:
            a.start()
        fleet = write_fleet(workdir / "fleet.toml", agents)
        inventory = load_inventory(fleet)
        phase("agents", t0)

        # 4. deploy + canary + runs, one candidate after another
        t0 = time.perf_counter()
        say(f"[4/7] deploy each artifact (canary {settings.canary_episodes} episodes), then "
            f"{settings.run_episodes} episodes per robot")
        for trial_id, path in artifacts.items():
            res = rollout(path, inventory, canary_count=1, episodes=settings.canary_episodes,
                          store=store)
            for r in res.robots:
                if not r.ok:
                    result.notes.append(f"trial {trial_id} on {r.name}: {r.status} {r.reason}")
            for e in inventory.agents:
                if res.get(e.name).status != "ok":
                    continue
                with AgentClient(e.link, e.timeout_s, name=e.name) as client:
                    report = client.run(settings.run_episodes, seed=100)
                register_device(store, e.name, e.device)
                ref = artifact_for_sha(store, e.name, report.get("sha256"))
                record_report(store, e.name, "run", report, ref, episodes=settings.run_episodes, seed=100)
                result.measured.setdefault(trial_id, {})[e.name] = float(report["mean_return"])
                say(f"      trial {trial_id} on {e.name}: mean return {report['mean_return']:.1f}, "
                    f"step p50/p99 {report['timings_ms']['p50']:.3f}/{report['timings_ms']['p99']:.3f} ms")
        phase("deploy_and_run", t0)

        # 5. latency calibration on the first robot
        t0 = time.perf_counter()
        lab = inventory.agents[0]
        say(f"[5/7] latency calibration: {settings.latency_probes} probe architectures BENCHed on {lab.name}")
        with AgentClient(lab.link, lab.timeout_s, name=lab.name) as client:
            _, version, m = calibrate_latency_on_agent(
                store, client, lab.name, lab.device, plan.space, settings.latency_probes,
                settings.bench_runs)
        result.latency = {"version": version, **{k: v for k, v in m.items() if k != "holdout"}}
        say(f"      held-out MAPE {m['holdout_mape']:.1%} (prior {m['prior_holdout_mape']:.1%}), "
            f"within +-10%: {m['holdout_within_10pct']:.0%}")
        phase("latency_calibration", t0)
    finally:
        for a in agents:
            a.stop()

    # 6. gap calibration and re-ranking
    t0 = time.perf_counter()
    say("[6/7] gap calibration from every (trial, robot) report; re-rank")
    try:
        _, gversion, gm = calibrate_gap(store, study)
        result.gap = {"version": gversion, "n": gm["n"], "mae": gm["mae"],
                      "mae_share_of_range": gm["mae_share_of_range"], "coefficients": gm["coefficients"]}
    except RobonasError as e:
        result.notes.append(str(e))
    changes, models = rescore_study(store, study)
    result.after = _ranking(store, study)
    phase("recalibrate", t0)

    # 7. report
    t0 = time.perf_counter()
    result.report = write_report(store, study, workdir / "report.html")
    phase("report", t0)
    result.wall_s = round(time.perf_counter() - t_start, 1)
    say(f"[7/7] report: {result.report}")
    store.close()
    return result


def explain(result: DemoResult) -> list[str]:
    """One line per exported or moved trial: how its rank moved and what moved it."""
    before = {r["trial"]: r for r in result.before}
    lines = []
    for r in result.after:
        b = before.get(r["trial"])
        if b is None:
            continue
        moved = b["rank"] != r["rank"]
        real = result.measured.get(r["trial"])
        if not moved and real is None:
            continue
        why = []
        if real:
            robots = ", ".join(f"{k} {v:.0f}" for k, v in real.items())
            why.append(f"robots measured {robots} against a simulated asymptote of {b['asymptotic_return']:.0f}")
        dp = (r["p99_ms"] or 0) - (b["p99_ms"] or 0)
        if b["p99_ms"] and abs(dp) / b["p99_ms"] > 0.1:
            why.append(f"p99 latency {b['p99_ms'] * 1000:.0f} -> {r['p99_ms'] * 1000:.0f} us (calibrated)")
        lines.append(
            f"trial {r['trial']} {r['arch']}: rank {b['rank']} -> {r['rank']}, predicted real return "
            f"{b['predicted_real_return']:.0f} -> {r['predicted_real_return']:.0f}"
            + (f"; {'; '.join(why)}" if why else "")
        )
    return lines


def default_workdir() -> Path:
    return Path(os.environ.get("ROBONAS_DEMO_DIR", "runs/demo"))
