"""Closing the loop: turn robot reports into calibrated models and re-rank a study with them.

- `StudyEvidence.read`: one read of what a refit needs: the study, its complete trials (each
  with its parsed architecture and typed metrics) and the real returns robots reported for them.
- `gap_observations`: every (trial, robot) pair with real returns becomes a `GapObservation`:
  the trial's simulation features against the mean real return.
- `calibrate_gap`: fits `BayesianGapModel` on them and stores a new version for the study.
- `calibrate_latency_on_agent`: a planned latency calibration on one agent: fitting and held-out
  probes (`latency_probe`) timed together, fitted (`measure_and_fit`), refused when the noise
  verdict says so (`noise_check`), stored with their timings (`store_latency_calibration`).
  `fit_latency` fits the timings robots reported on their own, on a random split.
- `rescore_study`: recomputes every complete trial's score with the newest latency model of the
  study's device and the newest gap model of the study (falling back to the analytic and
  heuristic priors), stores the new metrics and returns how the ranking moved. Each trial's
  metrics name the model versions that scored it, so `robonas top` can say what ranked it.

The maths lives in `latency_calibration` and `gap_calibration`; this module only joins store
rows to them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from robonas.errors import RobonasError
from robonas.models.gap_calibration import (
    FEATURES,
    MIN_OBSERVATIONS,
    BayesianGapModel,
    GapObservation,
    load_gap_model,
    save_gap_model,
)
from robonas.models.gap_model import HeuristicGapModel
from robonas.models.latency_calibration import CalibratedLatencyModel, LatencySample, load_latency_model
from robonas.models.latency_model import AnalyticLatencyModel
from robonas.models.latency_probe import (
    DEFAULT_ROUNDS,
    DEFAULT_RUNS,
    Measurement,
    NoiseVerdict,
    ProbeSet,
    Progress,
)
from robonas.scoring import (
    FleetPrediction,
    ObjectiveWeights,
    ScoringContext,
    gap_features,
    rank,
    ranking_key,
    score,
    strategy_view,
)
from robonas.space import PolicyArch, SearchSpace
from robonas.store import ModelVersionRow, Store, StudyRow, TrialRow
from robonas.study_views import study_ranking

if TYPE_CHECKING:
    from robonas.models.robot_predictions import FleetPredictions

log = logging.getLogger(__name__)

# Reports whose step timings are measurements of a deployed trial's latency.
TIMED_REPORT_KINDS = ("run", "canary")


def real_report_kinds(study: StudyRow) -> tuple[str, ...]:
    """Reports whose returns count as real returns: runs; canary episodes only when the study's
    config says so (`[calibration] canary_returns = true`), since a canary is a check, chosen
    to pass or fail quickly, not a measurement."""
    calibration = (study.config.get("search") or {}).get("calibration") or {}
    return ("run", "canary") if calibration.get("canary_returns") else ("run",)


def auto_refit(study: StudyRow) -> bool:
    calibration = (study.config.get("search") or {}).get("calibration") or {}
    return bool(calibration.get("auto_refit", True))


def _resolved(study: StudyRow) -> dict[str, Any]:
    resolved = dict(study.config.get("resolved") or {})
    if "control_hz" not in resolved:
        from robonas.search.loop import EnvInfo

        env = (study.config.get("search") or {})["env"]
        info = EnvInfo.probe(env["id"], env.get("kwargs") or {})
        resolved["control_hz"] = info.control_hz
    return resolved


def scoring_context(store: Store, study: StudyRow, use_calibrated: bool = True) -> ScoringContext:
    """The context a study is scored in now: its device, the newest models, its weights."""
    from robonas.models.devices import load_device

    search = study.config.get("search") or {}
    resolved = _resolved(study)
    device = load_device(search["device"]["profile"])
    latency_model = load_latency_model(store, device.name) if use_calibrated else None
    gap_model = load_gap_model(store, study.id) if use_calibrated else None
    objective = search.get("objective") or {}
    return ScoringContext(
        device=device,
        latency_model=latency_model or AnalyticLatencyModel(),
        gap_model=gap_model or HeuristicGapModel(**(search.get("gap") or {})),
        weights=ObjectiveWeights(
            auc=objective.get("auc", 0.5), real_return=objective.get("real_return", 0.5)
        ),
        control_hz=float(resolved["control_hz"]),
        return_lo=float(resolved["return_lo"]),
        return_hi=float(resolved["return_hi"]),
        lcb_z=float(objective.get("lcb_z", 1.0)),
    )


@dataclass(frozen=True)
class RealResult:
    trial_id: int
    device: str
    returns: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns))


@dataclass(frozen=True)
class StudyEvidence:
    """What a refit of one study reads from the store, read once: the study, its complete
    trials by id, and the real returns per (trial, robot)."""

    study: StudyRow
    trials: dict[int, TrialRow]
    real: list[RealResult]
    # id of the newest report counted: a model fitted on it is up to date until a newer one
    last_report_id: int | None = None

    @classmethod
    def read(cls, store: Store, study_name: str) -> StudyEvidence:
        study = store.get_study(study_name)
        trials = {t.id: t for t in store.trials(study.id, status="complete")}
        pooled: dict[tuple[int, str], list[float]] = {}
        last: int | None = None
        for kind in real_report_kinds(study):
            for r in store.device_reports(kind=kind):
                returns = r.payload.get("returns") or []
                if r.trial_id is not None and r.trial_id in trials and returns:
                    pooled.setdefault((r.trial_id, r.device), []).extend(float(x) for x in returns)
                    last = r.id if last is None else max(last, r.id)
        real = [RealResult(tid, d, v) for (tid, d), v in sorted(pooled.items())]
        return cls(study, trials, real, last)

    def returns_by_trial(self) -> dict[int, list[float]]:
        """Every real episode of each trial, pooled over its robots."""
        out: dict[int, list[float]] = {}
        for rr in self.real:
            out.setdefault(rr.trial_id, []).extend(rr.returns)
        return out


def gap_observations(evidence: StudyEvidence, ctx: ScoringContext) -> list[tuple[RealResult, GapObservation]]:
    out = []
    for rr in evidence.real:
        t = evidence.trials[rr.trial_id]
        assert t.metrics is not None  # complete trials are scored
        features = gap_features(t.arch, t.metrics, ctx)
        out.append((rr, GapObservation(features, rr.mean)))
    return out


def calibrate_gap(
    store: Store, study_name: str, evidence: StudyEvidence | None = None
) -> tuple[BayesianGapModel, int, dict[str, Any]]:
    """Fit the gap model from every stored (trial, real report) pair; store a new version."""
    evidence = evidence or StudyEvidence.read(store, study_name)
    study = evidence.study
    ctx = scoring_context(store, study)
    pairs = gap_observations(evidence, ctx)
    if len(pairs) < MIN_OBSERVATIONS:
        raise RobonasError(
            f"calibrate gap: study {study_name!r} has real reports for {len(pairs)} (trial, robot) "
            f"pair(s); at least {MIN_OBSERVATIONS} are needed (deploy and run more candidates)"
        )
    prior = (
        ctx.gap_model
        if isinstance(ctx.gap_model, HeuristicGapModel)
        else HeuristicGapModel(**((study.config.get("search") or {}).get("gap") or {}))
    )
    model = BayesianGapModel.from_heuristic(prior).fit([obs for _, obs in pairs])
    points, errors = [], []
    for rr, obs in pairs:
        pred = model.predict(obs.features)
        mean = obs.features.asymptotic_return - pred.mean_gap
        points.append(
            {
                "trial_id": rr.trial_id,
                "device": rr.device,
                "real": rr.mean,
                "predicted": mean,
                "lo": mean - 2 * pred.std_gap,
                "hi": mean + 2 * pred.std_gap,
                "episodes": len(rr.returns),
            }
        )
        errors.append(abs(mean - rr.mean))
    metrics = {
        "n": len(pairs),
        "mae": float(np.mean(errors)),
        "mae_share_of_range": float(np.mean(errors)) / (ctx.return_hi - ctx.return_lo),
        "points": points,
        "coefficients": {name: model.coefficient(name) for name in FEATURES},
        "last_report_id": evidence.last_report_id,
    }
    version = save_gap_model(store, study.id, model, metrics)
    return model, version, metrics


@dataclass(frozen=True)
class RankChange:
    trial_id: int
    arch: str
    rank_before: int
    rank_after: int
    objective_before: float
    objective_after: float
    predicted_real_before: float
    predicted_real_after: float
    p99_before: float
    p99_after: float
    measured_real: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _fleet_predictions(store: Store, evidence: StudyEvidence) -> FleetPredictions | None:
    """The study's predictions from its robots' twins, or None (no twins of its env, no measured
    pair yet, or a trial whose weights are gone: then the gap model ranks the whole study, rather
    than two kinds of prediction side by side)."""
    from robonas.models.robot_predictions import predict_fleet

    how = ((evidence.study.config.get("search") or {}).get("objective") or {}).get("fleet", "mean")
    try:
        return predict_fleet(store, evidence, how)
    except RobonasError as e:
        log.warning("%s: ranked by the gap model, not the twins: %s", evidence.study.name, e)
        return None


def rescore_study(
    store: Store, study_name: str, evidence: StudyEvidence | None = None
) -> tuple[list[RankChange], dict[str, str]]:
    """Re-score every complete trial with the newest models; returns rank changes, best first."""
    evidence = evidence or StudyEvidence.read(store, study_name)
    study = evidence.study
    ctx = scoring_context(store, study)
    ranking = study_ranking(study)
    key = ranking_key(ranking)
    before = rank(evidence.trials.values(), ranking)
    # by candidate: a candidate's best seed may change with the new scores
    rank_before = {t.arch_id: i + 1 for i, t in enumerate(before)}
    real = evidence.returns_by_trial()
    fleet = _fleet_predictions(store, evidence)
    rescored = []
    # every seed of every candidate, not only the best seeds `rank` returns
    for t in evidence.trials.values():
        if t.status != "complete" or t.metrics is None:
            continue
        prediction = None
        if fleet is not None and t.id in fleet.fleet:
            prediction = FleetPrediction(
                fleet.fleet[t.id], fleet.robots[t.id], fleet.twin_returns[t.id], fleet.label
            )
        m = score(t.arch, t.metrics, ctx, measured_returns=real.get(t.id), fleet=prediction)
        if m.told is None:
            # keep what the strategy was told, so a resumed search replays it as recorded
            m = replace(m, told=strategy_view(t.metrics, ranking))
        store.update_trial_metrics(t.id, m)
        rescored.append(replace(t, metrics=m))
    after = rank(rescored, ranking)
    changes = []
    for i, t in enumerate(after):
        m0, m1 = evidence.trials[t.id].metrics, t.metrics
        assert m0 is not None and m1 is not None
        changes.append(
            RankChange(
                trial_id=t.id,
                arch=t.arch.describe(),
                rank_before=rank_before[t.arch_id],
                rank_after=i + 1,
                objective_before=float(m0.value(key) or 0.0),
                objective_after=float(m1.value(key) or 0.0),
                predicted_real_before=float(m0.predicted_real_return or 0.0),
                predicted_real_after=float(m1.predicted_real_return or 0.0),
                p99_before=float(m0.p99_ms or 0.0),
                p99_after=float(m1.p99_ms or 0.0),
                measured_real=float(np.mean(real[t.id])) if t.id in real else None,
            )
        )
    versions = ctx.model_versions()
    if fleet is not None:
        versions["fleet_model"] = fleet.label
    return changes, versions


# --- latency ------------------------------------------------------------------------------
MIN_LATENCY_SAMPLES = 6
# Timings of one architecture cannot tell a fixed per-invoke cost from a per-MAC one: a fit on
# them extrapolates anywhere (a 2x256-only fit once put a 1x256 at 83 ms instead of 5 ms).
MIN_LATENCY_ARCHS = 2
# Held-out probes of a calibration on an agent: enough to state the +-10% share with an
# interval narrower than a coin toss (12 of 12 within: 76% to 100%, 95% Wilson).
DEFAULT_HOLDOUT_ARCHS = 12


def _too_few_latency(samples: list, device_name: str) -> str | None:
    """Why `samples` cannot calibrate a latency model, or None when they can."""
    if len(samples) < MIN_LATENCY_SAMPLES:
        return (
            f"{len(samples)} timing sample(s) for {device_name}; at least "
            f"{MIN_LATENCY_SAMPLES} are needed (use --n-archs {MIN_LATENCY_SAMPLES} or more)"
        )
    archs = len({s.arch.arch_id for s in samples})
    if archs < MIN_LATENCY_ARCHS:
        return (
            f"{len(samples)} timing samples for {device_name} cover {archs} architecture; at "
            f"least {MIN_LATENCY_ARCHS} different ones are needed to tell fixed from per-MAC "
            "costs (deploy another architecture, or run `robonas calibrate latency`)"
        )
    return None


def robots_of(store: Store, profile: str) -> list[str]:
    """Names of the robots registered with device profile `profile`."""
    return [d.name for d in store.devices() if d.profile == profile]


def latency_samples_from_reports(store: Store, profile: str) -> list:
    """Measured step timings of known architectures on robots of one device profile:
    calibration BENCH reports (which carry the probe's arch) and run/canary reports of
    deployed trials."""
    from robonas.models.latency_calibration import LatencySample

    samples = []
    reports = [r for robot in robots_of(store, profile) for r in store.device_reports(device=robot)]
    arch_of: dict[int, PolicyArch] = {}
    for r in reports:
        p = r.payload
        arch = None
        if r.kind == "bench" and p.get("arch"):
            arch = PolicyArch.from_dict(p["arch"])
            step = (p.get("bench") or {}).get("step_us") or {}
            p50, p99 = step.get("p50"), step.get("p99")
            p50, p99 = (None if p50 is None else p50 / 1000.0), (None if p99 is None else p99 / 1000.0)
        elif r.kind in TIMED_REPORT_KINDS and r.trial_id is not None:
            if r.trial_id not in arch_of:
                arch_of[r.trial_id] = store.get_trial(r.trial_id).arch
            arch = arch_of[r.trial_id]
            timings = p.get("timings_ms") or {}
            p50, p99 = timings.get("p50"), timings.get("p99")
        if arch is not None and p50 and p99:
            samples.append(LatencySample(arch, float(p50), max(float(p99), float(p50))))
    return samples


def newest_report_id(store: Store, profile: str) -> int | None:
    """Id of the newest report from any robot of device profile `profile`."""
    ids = [r.id for robot in robots_of(store, profile) for r in store.device_reports(device=robot)]
    return max(ids, default=None)


def evaluate_latency_fit(
    device_name: str, train: list[LatencySample], held: list[LatencySample]
) -> tuple[CalibratedLatencyModel, dict[str, Any]]:
    """Fit on `train` (callers check there are enough: `_too_few_latency`); figures on `held`
    with their 95% intervals, beside the uncalibrated prior's. Nothing is stored."""
    from robonas.models.devices import load_device
    from robonas.models.latency_calibration import fit_roofline, holdout_accuracy

    if not held:
        raise RobonasError("calibrate latency: no held-out timings to measure the fit's accuracy on")
    device = load_device(device_name)
    model = fit_roofline(train, device)
    acc = holdout_accuracy(model, held)
    prior = holdout_accuracy(AnalyticLatencyModel(), held, device=device)
    rows = []
    for s in held:
        predicted = model.predict(s.arch, device).p50_ms
        rows.append(
            {
                "arch_id": s.arch.arch_id,
                "arch": s.arch.describe(),
                "measured_ms": s.p50_ms,
                "predicted_ms": predicted,
                "prior_ms": AnalyticLatencyModel().predict(s.arch, device).p50_ms,
                "within_10pct": abs(predicted - s.p50_ms) <= 0.10 * s.p50_ms,
            }
        )
    metrics = {
        "n_train": len(train),
        "n_holdout": len(held),
        "holdout_mape": acc["mape"],
        "holdout_mape_ci": [acc["mape_lo"], acc["mape_hi"]],
        "holdout_within_10pct": acc["within_10pct"],
        "holdout_k_within_10pct": int(acc["k_within_10pct"]),
        "holdout_within_10pct_ci": [acc["within_10pct_lo"], acc["within_10pct_hi"]],
        "prior_holdout_mape": prior["mape"],
        "prior_within_10pct": prior["within_10pct"],
        "holdout": rows,
    }
    return model, metrics


def fit_latency(
    store: Store,
    device_name: str,
    samples: list,
    holdout: float = 0.25,
    seed: int = 0,
    last_report_id: int | None = None,
) -> tuple[Any, int, dict[str, Any]]:
    """Fit on a seeded random split of `samples` (timings that came without a plan: run and
    canary reports), report held-out accuracy (and the uncalibrated prior's), store it."""
    from robonas.models.latency_calibration import save_latency_model, split_holdout

    why = _too_few_latency(samples, device_name)
    if why:
        raise RobonasError(f"calibrate latency: {why}")
    train, held = split_holdout(samples, holdout, seed)
    model, metrics = evaluate_latency_fit(device_name, train, held)
    metrics["last_report_id"] = last_report_id
    version = save_latency_model(store, model.prior.name, model, metrics)
    return model, version, metrics


@dataclass(frozen=True)
class LatencyCalibrationRun:
    """One calibration, measured and fitted, not yet stored."""

    model: CalibratedLatencyModel
    metrics: dict[str, Any]
    measurement: Measurement
    probes: ProbeSet
    seconds: float


def measure_and_fit(
    client: Any,
    device_name: str,
    probes: ProbeSet,
    runs: int = DEFAULT_RUNS,
    rounds: int = DEFAULT_ROUNDS,
    progress: Progress | None = None,
) -> LatencyCalibrationRun:
    """Time the fitting and held-out probes together (interleaved: drift hits both alike), fit
    on the first, measure accuracy on the second. Nothing is stored."""
    from robonas.models.latency_probe import measure

    t0 = time.perf_counter()
    measurement = measure(client, probes.all, runs, progress, rounds)
    samples = measurement.samples
    n_fit = len(probes.fit)
    model, metrics = evaluate_latency_fit(device_name, samples[:n_fit], samples[n_fit:])
    for row, timing in zip(metrics["holdout"], measurement.timings[n_fit:], strict=True):
        row["noise"] = timing.noise
    metrics.update(
        noise=measurement.verdict.to_dict(),
        protocol=measurement.protocol,
        rounds=measurement.rounds,
        per_round=measurement.per_round,
    )
    return LatencyCalibrationRun(model, metrics, measurement, probes, time.perf_counter() - t0)


def noise_check(verdict: NoiseVerdict, rounds: int, force: bool = False) -> str | None:
    """None for quiet timings, a warning line for noisy ones (and for refused ones with
    `force`); raises `NoisyMeasurement` (one line: the figures and what to do) for refused ones."""
    from robonas.models.latency_probe import NoisyMeasurement

    message = " ".join(verdict.message.split())  # one line, whatever the agent sent
    if verdict.refuse:
        if force:
            return f"stored despite the noise (--force): {message}"
        raise NoisyMeasurement(
            f"calibrate latency: timings too noisy to calibrate on, nothing stored: {message} "
            f"(worst noise {verdict.worst:.1%} over {rounds} rounds). Close other work on the "
            f"robot's computer, or measure more rounds (--rounds {2 * rounds}); --force stores it anyway"
        )
    return None if verdict.ok else message


def store_latency_calibration(store: Store, robot: str, device_name: str, run: LatencyCalibrationRun) -> int:
    """Store the probes' timings as the robot's bench reports and the model as the next latency
    version of `device_name`; returns the version."""
    from robonas.models.latency_calibration import save_latency_model

    store.add_device(robot, device_name)
    n_fit = len(run.probes.fit)
    for i, t in enumerate(run.measurement.timings):
        store.add_device_report(
            robot,
            "bench",
            {
                "arch": t.arch.to_dict(),
                "arch_id": t.arch.arch_id,
                "bench": {"step_us": {"p50": t.p50_ms * 1000.0, "p99": t.p99_ms * 1000.0}},
                "noise": t.noise,
                "rounds": t.rounds,
                "held_out": i >= n_fit,
            },
        )
    # the fit has seen these timings: a refit from reports waits for newer ones
    metrics = {**run.metrics, "last_report_id": newest_report_id(store, device_name)}
    return save_latency_model(store, run.model.prior.name, run.model, metrics)


def calibrate_latency_on_agent(
    store: Store,
    client: Any,
    robot: str,
    device_name: str,
    space: SearchSpace,
    n_archs: int,
    runs: int = DEFAULT_RUNS,
    seed: int = 0,
    progress: Progress | None = None,
    *,
    holdout: int = DEFAULT_HOLDOUT_ARCHS,
    rounds: int = DEFAULT_ROUNDS,
    force: bool = False,
    probes: ProbeSet | None = None,
    compile_progress: Progress | None = None,
) -> tuple[CalibratedLatencyModel, int, dict[str, Any]]:
    """Compile `n_archs` fitting and `holdout` held-out probes (each set covering the space),
    time them on the agent (`runs` steps each in `rounds` interleaved rounds), fit, and only
    then store, unless the noise verdict refuses the timings (`NoisyMeasurement`; `force`
    stores them anyway). `metrics["noise_warning"]` is the warning to show, or None. `probes`
    reuses compiled probes (their own sets; `n_archs`, `holdout` and `seed` are then unused)."""
    from robonas.models.latency_probe import compile_probe_set

    if n_archs < MIN_LATENCY_SAMPLES:
        raise RobonasError(f"--n-archs {n_archs}: at least {MIN_LATENCY_SAMPLES} fitting probes are needed")
    if holdout < 1:
        raise RobonasError(f"--holdout {holdout}: at least 1 held-out probe is needed (12 or more say much)")
    client.hello()  # an unreachable agent fails here, before any work
    probes = probes or compile_probe_set(space, n_archs, holdout, seed, compile_progress)
    run = measure_and_fit(client, device_name, probes, runs, rounds, progress)  # raises before any store
    warning = noise_check(run.measurement.verdict, run.measurement.rounds, force)
    run.metrics["noise_warning"] = warning
    version = store_latency_calibration(store, robot, device_name, run)
    return run.model, version, run.metrics


# --- the loop -----------------------------------------------------------------------------
def _up_to_date(row: ModelVersionRow | None, newest: int | None) -> bool:
    """A stored fit has seen every report up to `newest` (fits older than this record are not)."""
    if row is None or newest is None:
        return row is not None and newest is None
    seen = row.metrics.get("last_report_id")
    return isinstance(seen, int) and seen >= newest


def after_reports(
    store: Store,
    study_names: list[str],
    profiles: list[str],
    refit: bool = True,
    robots: Iterable[str] = (),
) -> list[str]:
    """Refit what new reports allow and re-rank the studies; returns one line per step.

    A model is refitted only when reports newer than the ones it was fitted on have arrived,
    and a study is re-ranked only when something it is scored with changed. `robots` that sent
    new records get their twins refitted first. `refit=False` (or a study's `[calibration]
    auto_refit = false`) leaves every model and ranking as it is.
    """
    if not refit:
        return [
            "automatic refitting is off: models and rankings unchanged (run `robonas calibrate` to refit)"
        ]
    from robonas.models.twins import identify_new

    lines = identify_new(store, robots)
    refitted_devices: set[str] = set()
    for device in sorted(set(profiles)):
        newest = newest_report_id(store, device)
        latest = store.latest_model_version("latency", device=device)
        if _up_to_date(latest, newest) and latest is not None:
            lines.append(f"latency model for {device}: up to date (version {latest.version}, no new reports)")
            continue
        try:
            samples = latency_samples_from_reports(store, device)
        except RobonasError as e:
            lines.append(f"latency model for {device}: not refitted: {e}")
            continue
        why = _too_few_latency(samples, device)
        if why is None:
            _, version, m = fit_latency(store, device, samples, last_report_id=newest)
            refitted_devices.add(device)
            lines.append(
                f"latency model for {device}: version {version} from {len(samples)} timings, "
                f"held-out MAPE {m['holdout_mape']:.1%}"
            )
        else:
            lines.append(f"latency model for {device}: not refitted: {why}")
    for name in sorted(set(study_names)):
        study = store.get_study(name)
        if "search" not in study.config:
            lines.append(f"{name}: no search config stored; not re-ranked")
            continue
        if not auto_refit(study):
            lines.append(f"{name}: [calibration] auto_refit is off; not refitted or re-ranked")
            continue
        evidence = StudyEvidence.read(store, name)
        latest_gap = store.latest_model_version("gap", study_id=study.id)
        study_device = ((study.config.get("search") or {}).get("device") or {}).get("profile")
        if _up_to_date(latest_gap, evidence.last_report_id) and study_device not in refitted_devices:
            seen = "none" if latest_gap is None else latest_gap.version
            lines.append(f"{name}: no new real returns (gap model version {seen}); not re-ranked")
            continue
        try:
            _, version, m = calibrate_gap(store, name, evidence)
            lines.append(
                f"gap model for {name}: version {version} from {m['n']} (trial, robot) pairs, "
                f"MAE {m['mae']:.1f}"
            )
        except RobonasError as e:
            lines.append(str(e))
        try:
            changes, models = rescore_study(store, name, evidence)
        except (RobonasError, KeyError) as e:
            lines.append(f"{name}: not re-ranked: {e!r}")
            continue
        moved = sum(c.rank_before != c.rank_after for c in changes)
        lines.append(
            f"re-ranked {name} with {', '.join(models.values())}: {moved} of {len(changes)} trials moved"
        )
    return lines
