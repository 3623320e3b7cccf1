"""`robonas demo`: the whole loop on one machine, on embedded defaults, in two acts.

Act "host", this machine as the robot computer (robonas/data/demo.toml, device x86-host):
  1. a short architecture search on the cart-pole,
  2. export of the top feasible candidates to signed int8 TFLite artifacts,
  3. two local robot agents, each driving a reality profile (simulated stand-ins for physical
     robots: `cartpole-lab-a`, and `cartpole-laggy-c` with a long actuation delay),
  4. deploy with a canary to both, then fresh runs: real inference timings, honest returns,
  5. latency calibration on one agent (BENCH of a space-covering probe set, this CPU's timings),
  6. gap calibration from every (trial, robot) report, re-ranking with both new models,
  7. the HTML report.
Act "mcu", a robot too slow for its network (launch/cartpole-mcu.toml, device cortex-m7): the
same search, export, deploy and runs against one agent on `cartpole-mcu-slow`, whose computer is
far slower than the cortex-m7 prior. Its run reports refit the latency model and the gap model
(`recalibrate.after_reports`, what `robonas fleet run` does), and the ranking moves: the wide
policies that looked best in simulation wait several control periods for each action. Then the
search goes on for a few trials: the calibrated latency model rejects the wide asks untrained.

Each act ends with how its ranking moved and why (`explain`). Everything is a real process and a
real measurement; only the robots (and the MCU's computer) are simulated.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robonas.errors import RobonasError
from robonas.metrics import TrialMetrics

if TYPE_CHECKING:
    from robonas.config import SearchConfig
    from robonas.fleet.inventory import Inventory
    from robonas.search.loop import SearchPlan
    from robonas.store import Store
    from robonas.study_views import RankedTrial

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ActSpec:
    name: str
    title: str
    robots: tuple[tuple[str, str], ...]  # (agent name, robot spec)


ACTS = (
    ActSpec(
        "host",
        "this machine: two cart-poles, one behind a slow link",
        (("lab-a", "sim:cartpole-lab-a"), ("laggy-c", "sim:cartpole-laggy-c")),
    ),
    ActSpec(
        "mcu", "a microcontroller robot far slower than its device prior", (("mcu", "sim:cartpole-mcu-slow"),)
    ),
)


@dataclass(frozen=True)
class DemoSettings:
    trials: int
    steps: int
    mcu_trials: int
    mcu_steps: int
    mcu_next_trials: int  # trials asked after the MCU robot reported
    checkpoints: int
    eval_episodes: int
    export_top: int
    canary_episodes: int
    run_episodes: int
    latency_probes: int
    bench_runs: int
    latency_holdout: int

    @classmethod
    def for_mode(cls, quick: bool) -> DemoSettings:
        if quick:
            return cls(
                trials=3,
                steps=6000,
                mcu_trials=4,
                mcu_steps=6000,
                mcu_next_trials=2,
                checkpoints=3,
                eval_episodes=3,
                export_top=2,
                canary_episodes=1,
                run_episodes=3,
                latency_probes=6,
                bench_runs=200,
                latency_holdout=6,
            )
        return cls(
            trials=6,
            steps=20000,
            mcu_trials=6,
            mcu_steps=25000,
            mcu_next_trials=4,
            checkpoints=5,
            eval_episodes=5,
            export_top=3,
            canary_episodes=2,
            run_episodes=8,
            latency_probes=12,
            bench_runs=500,
            latency_holdout=12,
        )


@dataclass(frozen=True)
class NextCandidate:
    """A candidate asked after the robots reported, and what became of it."""

    trial: int
    arch: str
    status: str
    reason: str | None
    rank: int | None
    p99_ms: float | None
    latency_model: str | None


@dataclass
class ActResult:
    name: str
    study: str
    robots: list[str]
    before: list[RankedTrial] = field(default_factory=list)
    after: list[RankedTrial] = field(default_factory=list)
    measured: dict[int, dict[str, float]] = field(default_factory=dict)
    exported: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    gap: dict[str, Any] = field(default_factory=dict)
    recalibration: list[str] = field(default_factory=list)
    next: list[NextCandidate] = field(default_factory=list)  # asked after the reports
    notes: list[str] = field(default_factory=list)
    report: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for key in ("before", "after", "next"):
            d[key] = [asdict(x) for x in d[key]]
        d["report"] = str(self.report) if self.report else None
        d["explanation"] = explain(self)
        return d


@dataclass
class DemoResult:
    workdir: Path
    wall_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    acts: dict[str, ActResult] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "wall_s": self.wall_s,
            "phases": self.phases,
            "acts": {k: a.to_dict() for k, a in self.acts.items()},
        }


def _config(
    data: dict[str, Any], origin: str, trials: int, steps: int, settings: DemoSettings
) -> SearchConfig:
    from robonas.config import parse_config

    data["budget"].update(
        trials=trials,
        steps_per_trial=steps,
        checkpoints=settings.checkpoints,
        eval_episodes=settings.eval_episodes,
    )
    # The demo's minutes go to the robot loop, and act 2 needs every trial a distinct network
    # for the robot to time; seed checks are what `robonas search` shows.
    data["seed_check"] = {"top": 0}
    return parse_config(data, origin)


def demo_config(settings: DemoSettings, act: str = "host", extra_trials: int = 0) -> SearchConfig:
    """The act's search config with the mode's budget (plus `extra_trials` for act 2's next
    candidates)."""
    import tomllib

    if act == "host":
        text = resources.files("robonas").joinpath("data/demo.toml").read_text()
        return _config(
            tomllib.loads(text), "robonas/data/demo.toml", settings.trials, settings.steps, settings
        )
    path = REPO / "launch" / "cartpole-mcu.toml"
    return _config(
        tomllib.loads(path.read_text()),
        str(path),
        settings.mcu_trials + extra_trials,
        settings.mcu_steps,
        settings,
    )


def _ranking(store: Store, study: str) -> list[RankedTrial]:
    from robonas.study_views import ranked_trials

    # every trial, not only each candidate's best seed: every one is exported and run
    return ranked_trials(store, study, every_seed=True).rows


class _Demo:
    """The steps both acts share; one instance per demo run."""

    def __init__(
        self,
        workdir: Path,
        settings: DemoSettings,
        say: Callable[[str], None],
        progress_hooks: Any,
        result: DemoResult,
    ):
        from device_agents.signing import generate_keypair
        from robonas.store import Store

        self.workdir, self.settings, self.say, self.hooks = workdir, settings, say, progress_hooks
        self.result = result
        self.store = Store(f"sqlite:///{workdir / 'robonas.db'}")
        self.key, self.pub = generate_keypair(workdir / "keys", overwrite=True)

    def phase(self, name: str, t0: float) -> None:
        self.result.phases[name] = round(time.perf_counter() - t0, 2)

    def search(
        self, cfg: SearchConfig, act: ActResult, step: str, phase: str = "search"
    ) -> tuple[SearchPlan, list[RankedTrial]]:
        """Run (or extend) the act's study; (its plan, its ranking afterwards)."""
        from robonas.search.loop import Search, SearchPlan, default_workers

        t0 = time.perf_counter()
        self.say(
            f"{step} search: {cfg.budget.trials} trials x {cfg.budget.steps_per_trial} env "
            f"steps on {cfg.env.id}, device {cfg.device.profile}"
        )
        plan = SearchPlan.build(cfg, act.study)
        summary = Search(plan, self.store, min(default_workers(), 2), self.hooks).run()
        if summary.interrupted:
            raise KeyboardInterrupt
        self.phase(f"{act.name}.{phase}", t0)
        rows = _ranking(self.store, act.study)
        if not rows:
            raise RobonasError(
                f"demo: the search produced no complete trial; see `robonas top {act.study} --all`"
            )
        return plan, rows

    def export_top(self, act: ActResult, step: str, top: int | None) -> dict[int, Path]:
        """Signed int8 artifacts of the `top` best trials (None: every trial, with an fp32
        artifact where the int8 parity check refuses a half-trained policy)."""
        from robonas.export.trial_export import ExportRefused, export_trial

        t0 = time.perf_counter()
        self.say(
            f"{step} export: "
            + (f"top {top} candidates" if top else "every trial")
            + " to signed int8 TFLite"
        )
        artifacts: dict[int, Path] = {}
        for row in act.before:
            if top is not None and len(artifacts) >= top:
                break
            try:
                exp = export_trial(self.store, act.study, row.trial, key_path=self.key)
            except ExportRefused as e:
                act.refused[row.trial] = str(e)
                self.say(f"      trial {row.trial}: export refused: {e}")
                if top is not None:
                    continue
                exp = export_trial(self.store, act.study, row.trial, key_path=self.key, fp32=True)
                self.say(f"      trial {row.trial}: exported as fp32 instead")
            artifacts[row.trial] = exp.path
            parity = exp.manifest.get("parity") or {}
            self.say(
                f"      trial {row.trial} ({row.arch}): {exp.path.name}, int8 return "
                f"{parity.get('tflite_return', float('nan')):.1f} vs torch "
                f"{parity.get('torch_return', float('nan')):.1f}"
            )
        act.exported = list(artifacts)
        self.phase(f"{act.name}.export", t0)
        if not artifacts:
            raise RobonasError("demo: every export was refused by the parity check")
        return artifacts

    def deploy_and_run(
        self, inventory: Inventory, artifacts: dict[int, Path], act: ActResult, step: str
    ) -> None:
        from robonas.fleet.client import AgentClient, fleet_credentials
        from robonas.fleet.deploy import rollout
        from robonas.fleet.reports import artifact_for_sha, record_report, register_device

        s = self.settings
        t0 = time.perf_counter()
        self.say(
            f"{step} deploy each artifact (canary {s.canary_episodes} episodes), then "
            f"{s.run_episodes} episodes per robot"
        )
        for trial_id, path in artifacts.items():
            res = rollout(path, inventory, canary_count=1, episodes=s.canary_episodes, store=self.store)
            for r in res.robots:
                if not r.ok:
                    act.notes.append(f"trial {trial_id} on {r.name}: {r.status} {r.reason}")
            for e in inventory.agents:
                if res.get(e.name).status != "ok":
                    continue
                with AgentClient.for_entry(e, fleet_credentials(inventory)) as client:
                    report = client.run(s.run_episodes, seed=100)
                register_device(self.store, e.name, e.device)
                ref = artifact_for_sha(self.store, e.name, report.get("sha256"))
                record_report(self.store, e.name, "run", report, ref, episodes=s.run_episodes, seed=100)
                act.measured.setdefault(trial_id, {})[e.name] = float(report["mean_return"])
                self.say(
                    f"      trial {trial_id} on {e.name}: mean return {report['mean_return']:.1f}, "
                    f"step p50/p99 {report['timings_ms']['p50']:.3f}/"
                    f"{report['timings_ms']['p99']:.3f} ms"
                )
        self.phase(f"{act.name}.deploy_and_run", t0)

    @contextmanager
    def robots(self, spec: ActSpec, device: str, step: str) -> Iterator[Any]:
        """The act's robots as local agent processes; yields their fleet inventory."""
        from robonas.fleet.inventory import load_inventory
        from robonas.fleet.local_agents import LocalAgent, write_fleet

        t0 = time.perf_counter()
        self.say(
            f"{step} robots: "
            + ", ".join(f"{n} ({r}, device {device})" for n, r in spec.robots)
            + " as local agent processes"
        )
        # The demo's robots are lab benches that measure every candidate, over-budget ones
        # included (act 2 learns the MCU's latency from its misses): their canaries do not refuse
        # a model for missing deadlines, which a field robot's default (10%) would.
        bench = ["--canary-max-miss-rate", "1.0"]
        agents = [
            LocalAgent(n, r, device, self.workdir / "agents" / n, self.pub, extra_args=bench)
            for n, r in spec.robots
        ]
        try:
            for a in agents:
                a.start()
            inventory = load_inventory(write_fleet(self.workdir / f"fleet-{spec.name}.toml", agents))
            self.phase(f"{spec.name}.agents", t0)
            yield inventory
        finally:
            for a in agents:
                a.stop()

    def report(self, act: ActResult, filename: str) -> None:
        from robonas.report import write_report

        t0 = time.perf_counter()
        act.report = write_report(self.store, act.study, self.workdir / filename)
        self.phase(f"{act.name}.report", t0)


def _host_act(demo: _Demo, spec: ActSpec) -> ActResult:
    """Act 1: this machine's robots; latency calibrated with BENCH probes on the first one."""
    from robonas.fleet.client import AgentClient, fleet_credentials
    from robonas.models.recalibrate import calibrate_gap, calibrate_latency_on_agent, rescore_study

    s, say = demo.settings, demo.say
    cfg = demo_config(s, "host")
    act = ActResult(spec.name, cfg.study.name or spec.name, [n for n, _ in spec.robots])
    say(f"act 1 of 2, {spec.title}")
    plan, act.before = demo.search(cfg, act, "[1/7]")
    artifacts = demo.export_top(act, "[2/7]", demo.settings.export_top)

    with demo.robots(spec, cfg.device.profile, "[3/7]") as inventory:
        demo.deploy_and_run(inventory, artifacts, act, "[4/7]")

        t0 = time.perf_counter()
        lab = inventory.agents[0]
        say(
            f"[5/7] latency calibration: {s.latency_probes} + {s.latency_holdout} held-out probe "
            f"architectures BENCHed together on {lab.name}"
        )
        with AgentClient.for_entry(lab, fleet_credentials(inventory)) as client:
            # force: the demo shows the calibration whatever this machine's load; a noisy
            # measurement is stored with its warning, printed below
            _, version, m = calibrate_latency_on_agent(
                demo.store,
                client,
                lab.name,
                lab.device,
                plan.space,
                s.latency_probes,
                s.bench_runs,
                holdout=s.latency_holdout,
                force=True,
            )
        if m.get("noise_warning"):
            say(f"      warning: {m['noise_warning']}")
        act.latency = {"version": version, **{k: v for k, v in m.items() if k != "holdout"}}
        say(
            f"      held-out MAPE {m['holdout_mape']:.1%} (prior {m['prior_holdout_mape']:.1%}), "
            f"within +-10%: {m['holdout_within_10pct']:.0%}"
        )
        demo.phase(f"{spec.name}.latency_calibration", t0)

    t0 = time.perf_counter()
    say("[6/7] gap calibration from every (trial, robot) report; re-rank")
    try:
        _, gversion, gm = calibrate_gap(demo.store, act.study)
        act.gap = {
            "version": gversion,
            "n": gm["n"],
            "mae": gm["mae"],
            "mae_share_of_range": gm["mae_share_of_range"],
            "coefficients": gm["coefficients"],
        }
    except RobonasError as e:
        act.notes.append(str(e))
    rescore_study(demo.store, act.study)
    act.after = _ranking(demo.store, act.study)
    demo.phase(f"{spec.name}.recalibrate", t0)
    demo.report(act, "report.html")
    say(f"[7/7] report: {act.report}")
    return act


def _mcu_act(demo: _Demo, spec: ActSpec) -> ActResult:
    """Act 2: one MCU robot; its run reports refit both models, as `robonas fleet run` does,
    and the next candidates are asked and scored with them."""
    from robonas.models.recalibrate import after_reports

    cfg = demo_config(demo.settings, "mcu")
    act = ActResult(spec.name, cfg.study.name or spec.name, [n for n, _ in spec.robots])
    demo.say(f"act 2 of 2, {spec.title}")
    _, act.before = demo.search(cfg, act, "[1/6]")
    # every trial: the robot has to time both widths before the latency model can tell them apart
    artifacts = demo.export_top(act, "[2/6]", None)
    with demo.robots(spec, cfg.device.profile, "[3/6]") as inventory:
        demo.deploy_and_run(inventory, artifacts, act, "[4/6]")
    t0 = time.perf_counter()
    demo.say("[5/6] refit the latency model from the runs' timings and the gap model; re-rank")
    act.recalibration = after_reports(demo.store, [act.study], [cfg.device.profile])
    for line in act.recalibration:
        demo.say(f"      {line}")
    study_id = demo.store.get_study(act.study).id
    gap = demo.store.latest_model_version("gap", study_id=study_id)
    if gap is not None:
        act.gap = {
            "version": gap.version,
            "n": gap.metrics["n"],
            "mae": gap.metrics["mae"],
            "mae_share_of_range": gap.metrics["mae_share_of_range"],
        }
    latency = demo.store.latest_model_version("latency", device=cfg.device.profile)
    if latency is not None:
        act.latency = {
            "version": latency.version,
            **{k: v for k, v in latency.metrics.items() if k != "holdout"},
        }
    act.after = _ranking(demo.store, act.study)
    demo.phase(f"{spec.name}.recalibrate", t0)

    # The next candidates: asked, checked against the budget and scored with the new models.
    known = {t.id for t in demo.store.trials(study_id)}
    extra = demo.settings.mcu_next_trials
    _, ranked = demo.search(
        demo_config(demo.settings, "mcu", extra),
        act,
        f"[6/6] next candidates ({extra} more, asked and scored with the calibrated models):",
        phase="next_search",
    )
    rank = {r.trial: r.rank for r in ranked}
    for t in demo.store.trials(study_id):
        if t.id not in known:
            m = t.metrics or TrialMetrics()
            act.next.append(
                NextCandidate(
                    trial=t.id,
                    arch=t.arch.describe(),
                    status=t.status,
                    reason=t.error,
                    rank=rank.get(t.id),
                    p99_ms=m.p99_ms,
                    latency_model=m.latency_model,
                )
            )
    for line in next_summary(act):
        demo.say(f"      {line}")
    demo.report(act, f"report-{spec.name}.html")
    demo.say(f"      report: {act.report}")
    return act


def run_demo(
    workdir: Path,
    quick: bool = False,
    fresh: bool = True,
    say: Callable[[str], None] = print,
    progress_hooks: Any = None,
) -> DemoResult:
    settings = DemoSettings.for_mode(quick)
    workdir = Path(workdir).resolve()
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result = DemoResult(workdir)
    t_start = time.perf_counter()
    demo = _Demo(workdir, settings, say, progress_hooks, result)
    try:
        for spec, run in zip(ACTS, (_host_act, _mcu_act), strict=True):
            result.acts[spec.name] = run(demo, spec)
    finally:
        demo.store.close()
    result.wall_s = round(time.perf_counter() - t_start, 1)
    return result


def explain(act: ActResult) -> list[str]:
    """One line per exported or moved trial: how its rank moved and what moved it."""
    before = {r.trial: r for r in act.before}
    lines = []
    for r in act.after:
        b = before.get(r.trial)
        if b is None:
            continue
        moved = b.rank != r.rank
        real = act.measured.get(r.trial)
        if not moved and real is None:
            continue
        why = []
        if real:
            robots = ", ".join(f"{k} {v:.0f}" for k, v in real.items())
            why.append(
                f"robots measured {robots} against a simulated asymptote of {b.asymptotic_return or 0:.0f}"
            )
        dp = (r.p99_ms or 0) - (b.p99_ms or 0)
        if b.p99_ms and abs(dp) / b.p99_ms > 0.1:
            why.append(
                f"p99 latency {_ms(b.p99_ms)} -> {_ms(r.p99_ms or 0)} (calibrated"
                + (", over the budget)" if r.within_budget is False else ")")
            )
        lines.append(
            f"trial {r.trial} {r.arch}: rank {b.rank} -> {r.rank}, predicted real return "
            f"{b.predicted_real_return or 0:.0f} -> {r.predicted_real_return or 0:.0f}"
            + (f"; {'; '.join(why)}" if why else "")
        )
    return lines


def next_summary(act: ActResult) -> list[str]:
    """The candidates asked after the reports: the trained ones one per line, the rejected ones
    counted per architecture (a search may ask the same over-budget network many times)."""
    lines: list[str] = []
    rejected: dict[str, list[NextCandidate]] = {}
    for n in act.next:
        if n.status == "rejected":
            rejected.setdefault(n.arch, []).append(n)
        else:
            lines.append(
                f"trial {n.trial} {n.arch}: {n.status}, p99 {_ms(n.p99_ms or 0)} "
                f"by {n.latency_model}, rank {n.rank}"
            )
    for arch, rows in rejected.items():
        lines.append(f"{arch}: asked {len(rows)} time(s), rejected untrained: {rows[0].reason}")
    return lines


def _ms(v: float) -> str:
    return f"{v * 1000:.0f} us" if v < 1 else f"{v:.1f} ms"


def default_workdir() -> Path:
    return Path(os.environ.get("ROBONAS_DEMO_DIR", "runs/demo"))
