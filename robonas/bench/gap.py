"""`robonas bench gap`: how well each predictor of a candidate's return on a robot does on a robot
it has not been fitted on, leave-one-robot-out (LORO) over the shipped reality profiles of one env.

The robots are reality profiles (`sim.reality`) of the candidates' env. By default every profile
of the env except those with a MAC-rate computer (`compute_macs_per_s > 0`, e.g.
cartpole-mcu-slow): everything here runs in process, with no agent and no emulated robot computer,
so a profile whose point is a per-candidate arithmetic delay on its computer would be measured
without it. For sim/CartPole-v0 that leaves cartpole-ideal, -lab-a, -laggy-c, -mcu-d and -worn-b.

Data, gathered once (`collect`):
- measured: each candidate's return on each robot, the mean over `episodes` episodes of
  `sim.reality.make_reality(profile)` with the candidate's deterministic torch actor, in process,
  the episodes run side by side (one policy call per step for all of them);
- records: `records` episodes of ONE policy on each robot, the candidate a user would deploy (the
  study's best), recorded through `device_agents.robots.sim_twin.SimTwin` as the agent records
  them: observation, action, reward and the compute latency the agent hands the robot, here the
  emulated time of a TFLite step of this machine on the profile's computer (`RECORD_STEP_S`,
  jittered, seeded; the mcu-d profile turns it into 13-17 ms). No exploration noise: a robot runs
  deployed policies, and their sensor noise and start states excite the dynamics enough for
  identification on these profiles;
- twins: each robot's twin identified from its own records only
  (`robonas.models.twin_identification.identify`: their observations, actions and latencies, not
  their rewards, so the recording candidate's return on the robot does not leak in); when its
  records are too short (the policy falls early) the robot records `records` more, as the
  identification error asks, up to `MAX_RECORDS_FACTOR` times `records`; a robot still without a
  twin gets the fleet-level prediction below;
- twin returns: each candidate's returns in each twin (`twin_prediction.twin_stats`, episodes
  drawn over the twin's uncertainty, the same draws for every candidate).

Predictors, for every (candidate, left-out robot), each fitted without the left-out robot's
measured returns (`loro`):
1. sim return: the trial's asymptotic return; interval +/- z90 times its stored std;
2. robustness return: the trial's return under the search's randomisation; nothing stored says
   how uncertain it is, so its interval is the point itself (it covers exact hits only);
3. heuristic gap: `HeuristicGapModel` (the study's coefficients): asymptote minus the gap, normal
   interval of the gap's std;
4. Bayesian gap: `BayesianGapModel` centred at the heuristic, fitted as `recalibrate.calibrate_gap`
   fits it on every (candidate, other robot) measured mean; normal interval of its predictive std;
5. twin + residual: the candidate's returns in the left-out robot's twin plus the hierarchical
   residual (`FleetResidual`) fitted on the other robots' (candidate, robot) pairs (their twins'
   returns against their measured returns); its 90% interval for a measured mean of `episodes`
   episodes (`target_se` from the twin's episode spread). A left-out robot without a twin gets
   `predict_fleet` over the other robots' twins.
Figures per predictor over all (candidate, robot): mean absolute error as a share of the study's
return range, the share of measured means inside the 90% interval, Spearman's rank correlation
pooled over all pairs, and the mean over robots of the within-robot Spearman (how well it ranks
the candidates for one robot; a robot where the predictor or the measurements do not vary is left
out of that mean).

Default candidates: a small search in a temporary store (launch/cartpole.toml, 12 trials).
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from robonas.errors import RobonasError
from robonas.models.fleet_residual import FleetResidual, Pair, ReturnStats
from robonas.models.gap_calibration import MIN_OBSERVATIONS, BayesianGapModel, GapObservation
from robonas.models.gap_model import GapFeatures, GapModel, HeuristicGapModel
from robonas.models.twin_identification import DEFAULT_MAX_WINDOWS, TwinDataError, TwinFit

if TYPE_CHECKING:
    from device_agents.trajectory import Episode
    from robonas.export.trial_export import DeployableActor
    from robonas.models.twin_prediction import Controller
    from robonas.search.loop import SearchProgress
    from robonas.store import Store

PREDICTORS = ("sim return", "robustness return", "heuristic gap", "bayesian gap", "twin + residual")
Z90 = 1.6448536269514722  # the standard normal's 95% quantile: a central 90% interval
DEFAULT_CONFIG = "launch/cartpole.toml"
DEFAULT_TRIALS = 12
DEFAULT_WORKERS = 2
DEFAULT_EPISODES = 10
DEFAULT_TWIN_EPISODES = 10
DEFAULT_RECORDS = 5
# When a robot's records are too short to identify a twin (the recording policy falls early), it
# records `records` more, as the identification error asks, up to this many times `records`.
MAX_RECORDS_FACTOR = 4
# A TFLite step of a small MLP on this machine (as tests/robonas/models/test_twin_identification.py
# emulates it), jittered by up to +30% per step: what the agent would hand the robot twin.
RECORD_STEP_S = 13e-6
# Keep the seed streams of the measured episodes and the records apart from each other and from
# the twins' (`twin_prediction` salts its own).
_MEASURE_SALT = 0x6A9
_RECORD_SALT = 0x7EC

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# -- inputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One trained candidate: its policy and what its trial stored in simulation.

    policy: a trained trial's `DeployableActor`, or any `twin_prediction.Controller`.
    features: the simulation figures the gap models see (asymptote, robustness return, p99, ...).
    asymptotic_std: the stored std of the asymptote estimate (the sim predictor's interval).
    """

    name: str
    policy: DeployableActor | Controller
    features: GapFeatures
    asymptotic_std: float = 0.0


@dataclass(frozen=True)
class CandidateSet:
    """Candidates of one env, best first (the first is the policy robots record), and the study's
    context: return range, heuristic gap coefficients, env kwargs."""

    env_id: str
    candidates: list[Candidate]
    return_lo: float
    return_hi: float
    heuristic: HeuristicGapModel = field(default_factory=HeuristicGapModel)
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)
    return_max: float | None = None
    study: str | None = None

    @property
    def bounds(self) -> tuple[float, float] | None:
        """What an episode can pay, for clipping intervals: [min(0, lo), return_max]. The envs with
        twins (the cart-poles) pay non-negative rewards; without return_max, no clipping."""
        if self.return_max is None:
            return None
        return (min(0.0, self.return_lo), max(float(self.return_max), self.return_hi))


def default_profiles(env_id: str) -> list[str]:
    """The env's reality profiles that mean the same in process as on an agent (module docstring)."""
    from sim.reality import get_profile, list_profiles

    out = []
    for name in list_profiles():
        p = get_profile(name)
        if p.env_id == env_id and p.compute_macs_per_s == 0:
            out.append(name)
    return out


def _check_profiles(env_id: str, profiles: Sequence[str]) -> list[str]:
    from sim.errors import SimError
    from sim.reality import get_profile

    names = list(dict.fromkeys(profiles))
    if len(names) < 2:
        raise RobonasError(f"leave-one-robot-out needs at least 2 reality profiles, got {names}")
    for name in names:
        try:
            p = get_profile(name)
        except SimError as e:
            raise RobonasError(str(e)) from e
        if p.env_id != env_id:
            raise RobonasError(f"reality profile {name!r} is a {p.env_id} robot; the candidates are {env_id}")
    return names


# -- running policies -----------------------------------------------------------------------------


def _seeds(seed: int, salt: int, n: int) -> list[int]:
    return [int(s) for s in np.random.SeedSequence([int(seed), salt]).generate_state(n)]


def measured_returns(
    policy: DeployableActor | Controller,
    profile: str,
    episodes: int,
    seed: int,
    env_kwargs: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """The policy's returns on `sim.reality.make_reality(profile)`: `episodes` episodes side by
    side, deterministic policy, seeded by `seed` (the ground truth of the benchmark)."""
    from robonas.models.twin_prediction import batched_returns
    from sim.reality import make_reality

    kwargs = dict(env_kwargs or {})
    seeds = _seeds(seed, _MEASURE_SALT, episodes)
    return batched_returns(policy, [lambda: make_reality(profile, **kwargs) for _ in seeds], seeds)


def record_episodes(
    policy: DeployableActor | Controller,
    profile: str,
    episodes: int,
    seed: int,
    env_kwargs: Mapping[str, Any] | None = None,
    first: int = 0,
) -> list[Episode]:
    """`episodes` records of the deterministic policy on `profile`'s sim twin, as the agent makes
    them (module docstring: the compute latency is the emulated TFLite step on the profile's
    computer); `first`: how many records of this seed came before (more records, new seeds)."""
    from device_agents.robots.sim_twin import SimTwin
    from device_agents.trajectory import Episode
    from robonas.models.twin_prediction import as_controller

    controller = as_controller(policy)
    rng = np.random.default_rng([_seeds(seed, _RECORD_SALT, 1)[0], first])
    twin = SimTwin(profile, **dict(env_kwargs or {}))
    out = []
    try:
        for s in _seeds(seed, _RECORD_SALT + 1, first + episodes)[first:]:
            controller.reset(1)
            obs = [twin.reset(seed=s)]
            actions, rewards, latencies = [], [], []
            done = False
            while not done:
                action = np.asarray(controller(np.asarray(obs[-1], np.float64)[None, :]), np.float32)
                action = action.reshape(-1) if action.ndim > 1 else action[:1]
                latency = twin.compute_time(RECORD_STEP_S * (1.0 + 0.3 * rng.random()))
                o, r, done = twin.step(action, latency)
                obs.append(o)
                actions.append(action)
                rewards.append(r)
                latencies.append(latency)
            n = len(actions)
            out.append(
                Episode(
                    obs=np.array(obs, np.float32),
                    action=np.array(actions, np.float32).reshape(n, -1),
                    reward=np.array(rewards, np.float32),
                    clock_s=np.arange(n, dtype=np.float64) / twin.control_hz,
                    latency_s=np.array(latencies, np.float32),
                    seed=s,
                )
            )
    finally:
        twin.close()
    return out


# -- the data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RobotTwin:
    """What identification made of one robot: its fit, or why there is none."""

    robot: str
    record_returns: list[float]
    fit: TwinFit | None
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        from sim.reality import get_profile

        p = get_profile(self.robot)
        out: dict[str, Any] = {
            "robot": self.robot,
            "true_delay": p.action_delay,
            "records": len(self.record_returns),
            "record_returns": self.record_returns,
            "identified": self.fit is not None,
            "error": self.error,
        }
        if self.fit is not None:
            values = self.fit.profile_values()
            out.update(
                {
                    "delay": self.fit.action_delay.steps,
                    "delay_certain": self.fit.action_delay.certain,
                    "motor_gain": values["motor_gain"],
                    "true_motor_gain": p.motor_gain / p.mass_scale,
                    "actuation_latency_s": values["actuation_latency_s"],
                    "true_actuation_latency_s": p.actuation_latency_s,
                    "not_identifiable": sorted(k for k, v in self.fit.params.items() if not v.identifiable),
                    "seconds": self.fit.seconds,
                }
            )
        return out


@dataclass(frozen=True)
class GapData:
    """Everything the predictors are fitted on and scored against (see `collect`)."""

    candidates: CandidateSet
    robots: list[str]
    measured: dict[tuple[str, str], ReturnStats]  # (candidate, robot) -> measured returns
    twins: dict[str, RobotTwin]
    twin_returns: dict[tuple[str, str], ReturnStats]  # (candidate, robot with a twin) -> twin returns
    episodes: int
    twin_episodes: int
    records: int
    seed: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.candidates.candidates]


def collect(
    cands: CandidateSet,
    profiles: Sequence[str],
    *,
    episodes: int = DEFAULT_EPISODES,
    twin_episodes: int = DEFAULT_TWIN_EPISODES,
    records: int = DEFAULT_RECORDS,
    seed: int = 0,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    log: Log = _quiet,
) -> GapData:
    """Measure every candidate on every robot, record the first candidate on each robot, identify
    each robot's twin from its own records, and run every candidate in every twin."""
    from robonas.models.twin_identification import identify
    from robonas.models.twin_prediction import twin_stats

    for label, value in (("episodes", episodes), ("twin_episodes", twin_episodes), ("records", records)):
        if not (isinstance(value, int) and value >= 1):
            raise RobonasError(f"{label}={value!r} must be a whole number >= 1")
    if not cands.candidates:
        raise RobonasError("the gap benchmark needs at least one candidate")
    names = [c.name for c in cands.candidates]
    if len(set(names)) != len(names):
        raise RobonasError(f"candidate names must be unique, got {names}")
    robots = _check_profiles(cands.env_id, profiles)
    kwargs = dict(cands.env_kwargs)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    measured: dict[tuple[str, str], ReturnStats] = {}
    for i, c in enumerate(cands.candidates):
        for robot in robots:
            returns = measured_returns(c.policy, robot, episodes, seed, kwargs)
            measured[(c.name, robot)] = ReturnStats.from_returns(returns)
        row = ", ".join(f"{r} {measured[(c.name, r)].mean:.0f}" for r in robots)
        log(f"measured {i + 1}/{len(names)} {c.name}: {row}")
    seconds["measure"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    recorder = cands.candidates[0]
    twins: dict[str, RobotTwin] = {}
    for robot in robots:
        eps = record_episodes(recorder.policy, robot, records, seed, kwargs)
        fit: TwinFit | None = None
        error: str | None = None
        while fit is None:
            try:
                fit = identify(cands.env_id, eps, max_windows=max_windows)
                error = None
            except TwinDataError as e:  # too few steps: the robot sends more, up to a limit
                error = str(e)
                if len(eps) >= MAX_RECORDS_FACTOR * records:
                    break
                eps += record_episodes(recorder.policy, robot, records, seed, kwargs, first=len(eps))
        rec_returns = [float(np.sum(e.reward)) for e in eps]
        twins[robot] = RobotTwin(robot, rec_returns, fit, error)
        if fit is None:
            log(f"twin of {robot}: none from {len(eps)} records of {recorder.name}: {error}")
        else:
            d = fit.action_delay
            log(
                f"twin of {robot}: delay {d.steps}{'' if d.certain else ' (uncertain)'}, motor gain "
                f"{fit.params['motor_gain'].best:.3f}, from {len(eps)} records of {recorder.name} "
                f"(returns {', '.join(f'{r:.0f}' for r in rec_returns)}) in {fit.seconds:.1f} s"
            )
    seconds["identify"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    twin_returns: dict[tuple[str, str], ReturnStats] = {}
    for i, c in enumerate(cands.candidates):
        for robot, twin in twins.items():
            if twin.fit is not None:
                twin_returns[(c.name, robot)] = twin_stats(
                    c.policy, twin.fit, twin_episodes, seed, env_kwargs=kwargs
                )
        log(f"twin returns {i + 1}/{len(names)} {c.name}")
    seconds["twin_returns"] = time.perf_counter() - t0
    return GapData(
        candidates=cands,
        robots=robots,
        measured=measured,
        twins=twins,
        twin_returns=twin_returns,
        episodes=episodes,
        twin_episodes=twin_episodes,
        records=records,
        seed=seed,
        seconds=seconds,
    )


# -- leave one robot out --------------------------------------------------------------------------


@dataclass(frozen=True)
class PointPrediction:
    """One predictor's prediction for (candidate, robot) and what the robot measured."""

    predictor: str
    candidate: str
    robot: str
    mean: float
    lo90: float
    hi90: float
    measured: float
    basis: str = ""

    @property
    def covered(self) -> bool:
        return self.lo90 <= self.measured <= self.hi90


@dataclass(frozen=True)
class Fold:
    """Which robots' measured returns the fitted predictors saw when `robot` was left out."""

    robot: str
    bayes_robots: list[str]
    bayes_observations: int
    residual_robots: list[str]
    residual_pairs: int
    twin_basis: str


def _clip(x: float, bounds: tuple[float, float] | None) -> float:
    return x if bounds is None else min(max(x, bounds[0]), bounds[1])


def _normal(mean: float, std: float, bounds: tuple[float, float] | None) -> tuple[float, float, float]:
    return mean, _clip(mean - Z90 * std, bounds), _clip(mean + Z90 * std, bounds)


def _gap_prediction(model: GapModel, f: GapFeatures, bounds: tuple[float, float] | None) -> tuple[float, ...]:
    pred = model.predict(f)
    return _normal(f.asymptotic_return - pred.mean_gap, pred.std_gap, bounds)


def loro(data: GapData) -> tuple[list[PointPrediction], list[Fold]]:
    """Every predictor's prediction for every (candidate, robot), each robot predicted by models
    fitted on the other robots only (module docstring)."""
    cands = data.candidates
    bounds = cands.bounds
    span = cands.return_hi - cands.return_lo
    out: list[PointPrediction] = []
    folds: list[Fold] = []
    for robot in data.robots:
        others = [r for r in data.robots if r != robot]
        observations = [
            GapObservation(c.features, data.measured[(c.name, r)].mean)
            for r in others
            for c in cands.candidates
        ]
        bayes: GapModel = BayesianGapModel.from_heuristic(cands.heuristic)
        if len(observations) >= MIN_OBSERVATIONS:
            bayes = BayesianGapModel.from_heuristic(cands.heuristic).fit(observations)
        pairs = [
            Pair(c.name, r, data.twin_returns[(c.name, r)], data.measured[(c.name, r)])
            for r in others
            if data.twins[r].fit is not None
            for c in cands.candidates
        ]
        residual = FleetResidual.fit(pairs, prior_scale=0.1 * span, bounds=bounds) if pairs else None
        basis = ""
        for c in cands.candidates:
            f = c.features
            truth = data.measured[(c.name, robot)].mean
            sim = _normal(f.asymptotic_return, c.asymptotic_std, bounds)
            rob = (f.robustness_return,) * 3
            heur = _gap_prediction(cands.heuristic, f, bounds)
            bay = _gap_prediction(bayes, f, bounds)
            *twin, basis = _twin_prediction(data, c.name, robot, others, residual)
            bases = ("", "", "", "", basis)
            for name, (m, lo, hi), b in zip(PREDICTORS, (sim, rob, heur, bay, twin), bases, strict=True):
                out.append(PointPrediction(name, c.name, robot, float(m), float(lo), float(hi), truth, b))
        folds.append(
            Fold(
                robot=robot,
                bayes_robots=sorted(others) if len(observations) >= MIN_OBSERVATIONS else [],
                bayes_observations=len(observations) if len(observations) >= MIN_OBSERVATIONS else 0,
                residual_robots=sorted({p.robot for p in pairs}),
                residual_pairs=len(pairs),
                twin_basis=basis,
            )
        )
    return out, folds


def _twin_prediction(
    data: GapData, candidate: str, robot: str, others: Sequence[str], residual: FleetResidual | None
) -> tuple[float, float, float, str]:
    """The twin-based prediction of `candidate` on `robot`: its twin returns plus the residual
    fitted on `others`; the fleet-level one when the robot has no twin; the twin alone (its episode
    spread as the interval) when no other robot has a twin to fit the residual on."""
    twin = data.twin_returns.get((candidate, robot))
    target_se = twin.std / math.sqrt(data.episodes) if twin is not None else 0.0
    if residual is not None:
        if twin is not None:
            p = residual.predict(robot, twin, target_se=target_se)
        else:
            fleet = {
                r: data.twin_returns[(candidate, r)] for r in others if (candidate, r) in data.twin_returns
            }
            p = residual.predict_fleet(fleet)
        return p.mean, p.lo90, p.hi90, p.basis
    if twin is None:
        raise RobonasError(
            f"no robot has a twin (see the identification errors above): the twin-based prediction of "
            f"{candidate} on {robot} has nothing to start from; record with a policy that balances longer"
        )
    bounds = data.candidates.bounds
    m, lo, hi = _normal(twin.mean, math.hypot(twin.std, target_se), bounds)
    return m, lo, hi, "twin_only"


# -- scores ---------------------------------------------------------------------------------------


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho, None when undefined (fewer than 3 points or a constant side)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = float(spearmanr(x, y).statistic)
    return rho if math.isfinite(rho) else None


@dataclass(frozen=True)
class PredictorScore:
    """One predictor's figures over every (candidate, left-out robot)."""

    predictor: str
    n: int
    mae_share: float
    coverage90: float
    spearman: float | None
    spearman_within: float | None
    robots_ranked: int  # robots in spearman_within's mean
    mae_share_by_robot: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_predictions(preds: Sequence[PointPrediction], span: float) -> list[PredictorScore]:
    """Per predictor (in `PREDICTORS` order): MAE / span, 90% coverage, Spearman pooled and within
    robots."""
    scores = []
    for name in PREDICTORS:
        mine = [p for p in preds if p.predictor == name]
        if not mine:
            continue
        err = np.array([abs(p.mean - p.measured) for p in mine]) / span
        robots = list(dict.fromkeys(p.robot for p in mine))
        within = [
            _spearman([p.mean for p in mine if p.robot == r], [p.measured for p in mine if p.robot == r])
            for r in robots
        ]
        ranked = [w for w in within if w is not None]
        scores.append(
            PredictorScore(
                predictor=name,
                n=len(mine),
                mae_share=float(err.mean()),
                coverage90=float(np.mean([p.covered for p in mine])),
                spearman=_spearman([p.mean for p in mine], [p.measured for p in mine]),
                spearman_within=float(np.mean(ranked)) if ranked else None,
                robots_ranked=len(ranked),
                mae_share_by_robot={
                    r: float(np.mean([e for e, p in zip(err, mine, strict=True) if p.robot == r]))
                    for r in robots
                },
            )
        )
    return scores


# -- the result -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GapBench:
    """The benchmark's result: one `PredictorScore` per predictor, and what they came from."""

    env_id: str
    study: str | None
    profiles: list[str]
    candidates: list[str]
    recorder: str
    episodes: int
    twin_episodes: int
    records: int
    seed: int
    return_lo: float
    return_hi: float
    scores: list[PredictorScore]
    robots: list[dict[str, Any]]
    folds: list[Fold]
    predictions: list[PointPrediction]
    wall_s: float
    seconds: dict[str, float]

    def rows(self) -> list[dict[str, Any]]:
        """The table: one row per predictor."""
        return [
            {
                "predictor": s.predictor,
                "mae_share": s.mae_share,
                "coverage90": s.coverage90,
                "spearman": s.spearman,
                "spearman_within": s.spearman_within,
            }
            for s in self.scores
        ]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = self.rows()
        return d


def evaluate(
    data: GapData, wall_s: float | None = None, seconds: Mapping[str, float] | None = None
) -> GapBench:
    """Leave one robot out on `data` and score every predictor."""
    cands = data.candidates
    t0 = time.perf_counter()
    preds, folds = loro(data)
    scores = score_predictions(preds, cands.return_hi - cands.return_lo)
    stage = {**(seconds or {}), **data.seconds, "loro": time.perf_counter() - t0}
    return GapBench(
        env_id=cands.env_id,
        study=cands.study,
        profiles=list(data.robots),
        candidates=data.names,
        recorder=data.names[0],
        episodes=data.episodes,
        twin_episodes=data.twin_episodes,
        records=data.records,
        seed=data.seed,
        return_lo=cands.return_lo,
        return_hi=cands.return_hi,
        scores=scores,
        robots=[data.twins[r].summary() for r in data.robots],
        folds=folds,
        predictions=preds,
        wall_s=sum(stage.values()) if wall_s is None else wall_s,
        seconds=stage,
    )


# -- candidates from a study ----------------------------------------------------------------------


def candidates_from_study(store: Store, study_name: str) -> CandidateSet:
    """A study's complete trials with weights, best first by the study's ranking, as candidates."""
    from robonas.export.trial_export import DeployableActor, trial_weights
    from robonas.models.recalibrate import scoring_context
    from robonas.scoring import gap_features, rank
    from robonas.study_views import study_ranking

    study = store.get_study(study_name)
    search = study.config.get("search") or {}
    if not search:
        raise RobonasError(f"study {study_name!r} has no search config stored")
    ctx = scoring_context(store, study)
    heuristic = HeuristicGapModel(**(search.get("gap") or {}))
    trials = rank(store.trials(study.id, status="complete"), study_ranking(study))
    candidates = []
    for t in trials:
        assert t.metrics is not None  # rank() keeps scored trials only
        meta = trial_weights(store, t)
        actor = DeployableActor.from_files(meta["actor"], meta["obs_norm"], meta["spaces"], t.arch)
        candidates.append(
            Candidate(
                name=f"trial {t.id}",
                policy=actor,
                features=gap_features(t.arch, t.metrics, ctx),
                asymptotic_std=float(t.metrics.asymptotic_std or 0.0),
            )
        )
    if len(candidates) < 2:
        raise RobonasError(
            f"study {study_name!r} has {len(candidates)} complete trial(s) with weights; the gap "
            "benchmark needs at least 2"
        )
    env = search["env"]
    return CandidateSet(
        env_id=str(env["id"]),
        candidates=candidates,
        return_lo=ctx.return_lo,
        return_hi=ctx.return_hi,
        heuristic=heuristic,
        env_kwargs=dict(env.get("kwargs") or {}),
        return_max=None if env.get("return_max") is None else float(env["return_max"]),
        study=study_name,
    )


def bench_gap(
    *,
    study: str | None = None,
    store_url: str | None = None,
    config_path: str = DEFAULT_CONFIG,
    trials: int = DEFAULT_TRIALS,
    steps: int | None = None,
    workers: int = DEFAULT_WORKERS,
    profiles: Sequence[str] | None = None,
    episodes: int = DEFAULT_EPISODES,
    twin_episodes: int = DEFAULT_TWIN_EPISODES,
    records: int = DEFAULT_RECORDS,
    seed: int = 0,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    log: Log = _quiet,
    search_progress: tuple[AbstractContextManager[Any], SearchProgress] | None = None,
) -> GapBench:
    """The whole benchmark: candidates from `study` in `store_url`, or from a search of
    `config_path` (`trials` trials of `steps` steps, `workers` processes) in a temporary store;
    then `collect` and `evaluate` over `profiles` (default: `default_profiles` of the env).
    search_progress: a display to show while the search runs and its hooks (`cli.common.search_progress`).
    """
    import contextlib

    from robonas.store import Store

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    def run(cands: CandidateSet) -> GapBench:
        names = list(profiles) if profiles else default_profiles(cands.env_id)
        log(f"{len(cands.candidates)} candidates of {cands.env_id}; robots: {', '.join(names)}")
        data = collect(
            cands,
            names,
            episodes=episodes,
            twin_episodes=twin_episodes,
            records=records,
            seed=seed,
            max_windows=max_windows,
            log=log,
        )
        return replace(evaluate(data, seconds=seconds), wall_s=time.perf_counter() - t_start)

    if study is not None:
        store = Store(store_url)
        try:
            cands = candidates_from_study(store, study)
        finally:
            store.close()
        return run(cands)

    from robonas.config import SeedCheckSection, load_config
    from robonas.search.loop import Search, SearchPlan

    cfg = load_config(config_path).with_overrides(trials=trials, steps=steps, workers=workers)
    # the benchmark's candidates are distinct trials, each run on every robot: no seed check
    cfg = cfg.model_copy(update={"seed_check": SeedCheckSection(top=0)})
    plan = SearchPlan.build(cfg, "gap-bench")
    with tempfile.TemporaryDirectory(prefix="robonas-bench-gap-") as tmp:
        store = Store(f"sqlite:///{Path(tmp) / 'bench.db'}")
        try:
            log(
                f"search: {cfg.budget.trials} trials of {cfg.budget.steps_per_trial} steps of "
                f"{config_path}, {workers} worker(s), in a temporary store"
            )
            t0 = time.perf_counter()
            display, hooks = search_progress or (contextlib.nullcontext(), None)
            with display:
                summary = Search(plan, store, workers, hooks).run()
            seconds["search"] = time.perf_counter() - t0
            log(
                f"search: {summary.complete} complete, {summary.failed} failed, {summary.rejected} "
                f"rejected in {seconds['search']:.0f} s"
            )
            cands = candidates_from_study(store, "gap-bench")
        finally:
            store.close()
        return run(cands)
