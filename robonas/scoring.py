"""Scoring: how a trained candidate is judged, and the one way a study is ranked.

- `score`: a trial's simulation figures -> its latency on the study's device, its sim-to-real
  gap, its predicted real return and the objective. Run when a trial finishes and again whenever
  a robot report recalibrates the latency or gap model, so every trial's metrics name the model
  versions that scored it.
- predicted real return = asymptotic return - gap; the objective is a weighted mean of the
  normalised learning-curve AUC and the normalised predicted real return.
- `within_budget`: the latency budget is a hard constraint on the predicted p99.
- `rank`: a study's complete trials best first, by the objective or its lower confidence bound.
- `pareto_front`: (predicted real return up, p99 latency down), kept for the report.

AUC convention: `auc` arrives already normalised to [0, 1], as `robonas.search.curves.auc_normalised`
computes it (returns mapped by the same range, area divided by the step span); only the predicted
real return is normalised here. An AUC outside [0, 1] is a unit mistake and is refused.

Everything here is a handful of comparisons on at most a few thousand trials, so it is plain
Python: the O(n^2) Pareto filter is clearer than pulling in a multi-objective library for it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from robonas.errors import ConfigError, RobonasError
from robonas.metrics import StrategyView, TrialMetrics
from robonas.models.devices import DeviceProfile
from robonas.models.gap_model import GapFeatures, GapModel, GapPrediction
from robonas.models.latency_model import LatencyModel
from robonas.space import PolicyArch

if TYPE_CHECKING:
    from robonas.models.fleet_residual import Prediction
    from robonas.store import TrialRow

RANKINGS = ("mean", "lcb")


def predicted_real_return(asymptotic_return: float, gap_pred: GapPrediction) -> tuple[float, float]:
    """(mean, std) of the return expected on the robot: simulation's asymptote minus the gap."""
    return asymptotic_return - gap_pred.mean_gap, gap_pred.std_gap


@dataclass(frozen=True)
class ObjectiveWeights:
    """Weights of normalised AUC and normalised predicted real return; need not sum to 1."""

    auc: float = 0.5
    real_return: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"objective weight {f.name!r} must be a finite number, got {value!r}")
            if value < 0:
                raise ConfigError(f"objective weight {f.name!r} must be >= 0, got {value!r}")
        if self.auc == 0 and self.real_return == 0:
            raise ConfigError(
                "objective weights 'auc' and 'real_return' are both 0; at least one must be > 0"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ObjectiveWeights:
        """From a config table such as `[objective] auc = 0.3, real_return = 0.7`."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(config) - set(valid))
        if unknown:
            raise ConfigError(f"unknown objective weight(s) {unknown}; valid keys are {valid}")
        return cls(**dict(config))

    @property
    def total(self) -> float:
        return self.auc + self.real_return


# Room for float round-off in an AUC computed elsewhere; anything beyond it is a unit mistake.
_AUC_TOLERANCE = 1e-9


def _normalise(value: float, lo: float, hi: float) -> float:
    return min(1.0, max(0.0, (value - lo) / (hi - lo)))


def _check_range(return_lo: float, return_hi: float) -> None:
    if not (math.isfinite(return_lo) and math.isfinite(return_hi) and return_hi > return_lo):
        raise ConfigError(
            f"return range must be finite with return_hi > return_lo, got [{return_lo!r}, {return_hi!r}]"
        )


def objective(
    auc: float,
    predicted_real_return: float,
    return_lo: float,
    return_hi: float,
    weights: ObjectiveWeights = ObjectiveWeights(),
) -> float:
    """Weighted mean of the normalised AUC and the predicted real return normalised to [0, 1].

    `auc` is in [0, 1] already (robonas.search.curves.auc_normalised); the return is mapped by
    (r - return_lo) / (return_hi - return_lo) and clipped, since the gap can push it below lo.
    """
    _check_range(return_lo, return_hi)
    for key, value in (("auc", auc), ("predicted_real_return", predicted_real_return)):
        if not math.isfinite(value):
            raise RobonasError(f"objective: {key} must be finite, got {value!r}")
    if not -_AUC_TOLERANCE <= auc <= 1.0 + _AUC_TOLERANCE:
        raise RobonasError(
            f"objective: auc={auc!r} is outside [0, 1]; pass the normalised AUC "
            "(robonas.search.curves.auc_normalised)"
        )
    score = weights.auc * min(1.0, max(0.0, auc))
    score += weights.real_return * _normalise(predicted_real_return, return_lo, return_hi)
    return score / weights.total


def objective_std(
    real_return_std: float, return_lo: float, return_hi: float, weights: ObjectiveWeights = ObjectiveWeights()
) -> float:
    """Standard deviation the gap's uncertainty puts on `objective` (ignoring clipping)."""
    _check_range(return_lo, return_hi)
    return (weights.real_return / weights.total) * real_return_std / (return_hi - return_lo)


def pareto_front(points: Iterable[tuple[Hashable, float, float]]) -> list[Hashable]:
    """Keys of the points no other point dominates, in input order.

    A point is (key, predicted_real_return, p99_ms); higher return and lower latency are better.
    One point dominates another when it is at least as good in both and better in one, so exact
    duplicates do not remove each other.
    """
    pts = list(points)
    for key, ret, lat in pts:
        if not (math.isfinite(ret) and math.isfinite(lat)):
            raise RobonasError(f"pareto_front: point {key!r} has a non-finite value ({ret!r}, {lat!r})")
    front = []
    for key, ret, lat in pts:
        dominated = any(r2 >= ret and l2 <= lat and (r2 > ret or l2 < lat) for _, r2, l2 in pts)
        if not dominated:
            front.append(key)
    return front


def ranking_key(ranking: str) -> str:
    """The metric a study ranks by: the objective's mean, or its lower confidence bound."""
    if ranking not in RANKINGS:
        raise ConfigError(f"ranking {ranking!r} is not one of {', '.join(RANKINGS)}")
    return "objective_lcb" if ranking == "lcb" else "objective"


# How much a candidate's spread across training seeds costs it in the ranking: its figure is the
# mean over seeds minus this many standard errors (std / sqrt(seeds)). One lucky seed then cannot
# carry a candidate past one that is good on every seed.
SEED_SPREAD_Z = 1.0


@dataclass(frozen=True)
class CandidateSeeds:
    """A candidate (one arch_id: network and trainer settings) over the seeds it was trained on."""

    arch_id: str
    # its complete trials, the one to ship first: the best final policy (predicted real return,
    # else asymptotic return), not the fastest learner (the objective's AUC term rewards how a
    # seed learned, which says nothing about which seed's weights are better)
    trials: tuple[TrialRow, ...]
    values: tuple[float, ...]  # their ranking figures, same order

    @property
    def seeds(self) -> int:
        return len(self.trials)

    @property
    def mean(self) -> float:
        return float(sum(self.values) / len(self.values))

    @property
    def std(self) -> float:
        """Sample standard deviation across seeds (0.0 with one seed: no spread measured)."""
        n = len(self.values)
        if n < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (n - 1))

    @property
    def figure(self) -> float:
        """What the ranking sorts by: mean over seeds, less SEED_SPREAD_Z standard errors."""
        return self.mean - SEED_SPREAD_Z * self.std / math.sqrt(self.seeds)


def _final_policy(t: TrialRow, value: float) -> float:
    """How good a seed's final policy is: its predicted real return, else its asymptote, else its
    ranking figure."""
    m = t.metrics
    for figure in (m.predicted_real_return, m.asymptotic_return) if m is not None else ():
        if figure is not None and math.isfinite(figure):
            return float(figure)
    return value


def candidate_seeds(trials: Iterable[TrialRow], ranking: str = "mean") -> dict[str, CandidateSeeds]:
    """Complete, scored trials grouped by candidate, best candidate first (see `rank`)."""
    key = ranking_key(ranking)
    groups: dict[str, list[tuple[float, TrialRow]]] = {}
    for t in trials:
        if t.status != "complete" or t.metrics is None or (v := t.metrics.value(key)) is None:
            continue
        if math.isnan(v):
            raise RobonasError(f"rank: trial {t.id} scores NaN on {key!r}")
        groups.setdefault(t.arch_id, []).append((v, t))
    out = []
    for arch_id, members in groups.items():
        # ties (or no final-policy figure) go to the higher ranking figure, then to ask order
        members.sort(key=lambda vt: (-_final_policy(vt[1], vt[0]), -vt[0], vt[1].seq))
        out.append(CandidateSeeds(arch_id, tuple(t for _, t in members), tuple(v for v, _ in members)))
    out.sort(key=lambda c: (-c.figure, min(t.seq for t in c.trials)))
    return {c.arch_id: c for c in out}


def rank(trials: Iterable[TrialRow], ranking: str = "mean") -> list[TrialRow]:
    """A study's candidates best first, one trial each: its best seed, whose weights are the ones
    to ship. Candidates are ordered by `CandidateSeeds.figure` (the ranking key's mean over the
    seeds a candidate was trained on, less its spread), ties by ask order. The one ranking of a
    study: search summaries, views, re-ranking and the demo use it."""
    return [c.trials[0] for c in candidate_seeds(trials, ranking).values()]


def within_budget(p99_ms: float, budget_ms: float) -> bool:
    """True when a predicted p99 fits the latency budget (the hard constraint uses the tail)."""
    if (
        isinstance(budget_ms, bool)
        or not isinstance(budget_ms, (int, float))
        or not (math.isfinite(budget_ms) and budget_ms > 0)
    ):
        raise ConfigError(f"latency budget_ms must be a finite number > 0, got {budget_ms!r}")
    return p99_ms <= budget_ms


def strategy_view(metrics: TrialMetrics | None, ranking: str) -> StrategyView | None:
    """What a strategy is told about a finished trial (None: it failed or was rejected)."""
    return None if metrics is None else metrics.strategy_view(ranking_key(ranking))


def told_view(metrics: TrialMetrics | None, ranking: str) -> StrategyView | None:
    """What the strategy was told about this trial: the kept figures if it was re-scored since."""
    if metrics is not None and metrics.told is not None:
        return dict(metrics.told)
    return strategy_view(metrics, ranking)


# ----------------------------------------------------------------------------- score a trial


@dataclass(frozen=True)
class FleetPrediction:
    """One trial's prediction from the robots' twins (robonas.models.robot_predictions)."""

    prediction: Prediction  # the fleet objective: mean, std, lo90, hi90, basis
    robots: dict[str, dict[str, Any]]  # per robot, for `robonas top --robot`
    twin_returns: dict[str, dict[str, Any]]  # the cache of twin returns, by twin label
    label: str  # which twins ranked it


@dataclass(frozen=True)
class ScoringContext:
    """Everything besides the trial itself that a score depends on."""

    device: DeviceProfile
    latency_model: LatencyModel
    gap_model: GapModel
    weights: ObjectiveWeights
    control_hz: float
    return_lo: float
    return_hi: float
    lcb_z: float = 1.0

    def model_versions(self) -> dict[str, str]:
        return {
            "latency_model": f"{self.latency_model.name}@{self.latency_model.version}",
            "gap_model": f"{self.gap_model.name}@{self.gap_model.version}",
        }


def latency_metrics(arch: PolicyArch, ctx: ScoringContext) -> TrialMetrics:
    """The latency figures of an architecture on the context's device (no training needed)."""
    pred = ctx.latency_model.predict(arch, ctx.device)
    costs = arch.cost_summary()
    return TrialMetrics(
        p50_ms=pred.p50_ms,
        p99_ms=pred.p99_ms,
        params=costs["params"],
        macs=costs["macs"],
        bytes=costs["bytes"],
        device=ctx.device.name,
    )


def with_measurements(
    prior_mean: float, prior_std: float, returns: Sequence[float], return_range: float
) -> tuple[float, float]:
    """Combine the model's predicted real return with the trial's own real episodes.

    A Gaussian update: the model's prediction is the prior, the measured episodes the data
    (their spread as the noise, floored at 1% of the return range so a few identical episodes
    do not claim certainty). Once a robot has run a candidate, what it measured outweighs what
    the regression says about candidates like it; the regression still ranks the others.
    """
    x = np.asarray(returns, dtype=float)
    noise = max(float(x.std(ddof=1)) if x.size > 1 else 0.0, 0.01 * return_range)
    prior_var = max(prior_std, 0.01 * return_range) ** 2
    precision = 1.0 / prior_var + x.size / noise**2
    mean = (prior_mean / prior_var + x.sum() / noise**2) / precision
    return float(mean), float(math.sqrt(1.0 / precision))


def gap_features(
    arch: PolicyArch, sim: TrialMetrics, ctx: ScoringContext, latency: TrialMetrics | None = None
) -> GapFeatures:
    """What the gap model sees of a trained trial, with latency by the context's model
    (`latency`: its `latency_metrics`, when the caller has them already)."""
    if sim.asymptotic_return is None:
        raise RobonasError("score: the trial has no asymptotic return to score")
    asym = float(sim.asymptotic_return)
    lat = latency or latency_metrics(arch, ctx)
    return GapFeatures(
        asymptotic_return=asym,
        robustness_return=asym if sim.robustness_return is None else float(sim.robustness_return),
        p99_ms=float(lat.p99_ms or 0.0),
        control_period_ms=1000.0 / ctx.control_hz,
        params=int(lat.params or 0),
        return_lo=ctx.return_lo,
        return_hi=ctx.return_hi,
    )


# What scoring recomputes; everything else of a trial's metrics (its simulation figures and
# what the strategy was told) is carried over.
_SCORED = {f.name for f in fields(TrialMetrics)} - {
    "auc", "asymptotic_return", "asymptotic_std", "robustness_return", "random_return",
    "env_steps", "wall_s", "steps_per_s", "told", "extra", "twin_returns",
}  # fmt: skip


def score(
    arch: PolicyArch,
    sim: TrialMetrics,
    ctx: ScoringContext,
    measured_returns: Sequence[float] | None = None,
    fleet: FleetPrediction | None = None,
) -> TrialMetrics:
    """Metrics of a trained trial: its simulation figures plus latency, gap and objective.

    `measured_returns`: the trial's real episodes from robots, if any; they update the
    predicted real return (see `with_measurements`).
    `fleet`: the trial's prediction from the robots' twins (robonas.models.robot_predictions);
    when given it, not the gap model, is the predicted real return.
    """
    if sim.asymptotic_return is None or sim.auc is None:
        raise RobonasError("score: the trial has no asymptotic return or AUC to score")
    cleared: dict[str, Any] = dict.fromkeys(_SCORED)
    base = replace(sim, **cleared)
    lat = latency_metrics(arch, ctx)
    versions = ctx.model_versions()
    features = gap_features(arch, sim, ctx, lat)
    gap = ctx.gap_model.predict(features)
    real_mean, real_std = predicted_real_return(features.asymptotic_return, gap)
    # a 90% interval of a normal, unless the fleet's mixture gives its own
    lo90, hi90, basis = real_mean - 1.645 * real_std, real_mean + 1.645 * real_std, "gap-model"
    extra: dict[str, Any] = {}
    if fleet is not None:
        real_mean, real_std = fleet.prediction.mean, fleet.prediction.std
        lo90, hi90, basis = fleet.prediction.lo90, fleet.prediction.hi90, fleet.prediction.basis
        extra = {"robots": fleet.robots, "twin_returns": fleet.twin_returns, "fleet_model": fleet.label}
    measured: dict[str, Any] = {}
    if measured_returns:
        measured = {
            "model_real_return": real_mean,
            "model_real_std": real_std,
            "measured_real_return": float(np.mean(measured_returns)),
            "measured_episodes": len(measured_returns),
        }
        shift_std = real_std
        real_mean, real_std = with_measurements(
            real_mean, real_std, measured_returns, ctx.return_hi - ctx.return_lo
        )
        # the interval shrinks with the std about the updated mean
        ratio = real_std / shift_std if shift_std > 0 else 0.0
        lo90, hi90 = real_mean - (real_mean - lo90) * ratio, real_mean + (hi90 - real_mean) * ratio
        lo90, hi90 = min(lo90, real_mean), max(hi90, real_mean)
    obj = objective(float(sim.auc), real_mean, ctx.return_lo, ctx.return_hi, ctx.weights)
    obj_std = objective_std(real_std, ctx.return_lo, ctx.return_hi, ctx.weights)
    return replace(
        base,
        p50_ms=lat.p50_ms,
        p99_ms=lat.p99_ms,
        params=lat.params,
        macs=lat.macs,
        bytes=lat.bytes,
        device=lat.device,
        latency_share=features.latency_share,
        gap_mean=gap.mean_gap,
        gap_std=gap.std_gap,
        predicted_real_return=real_mean,
        predicted_real_std=real_std,
        objective=obj,
        objective_std=obj_std,
        objective_lcb=obj - ctx.lcb_z * obj_std,
        predicted_real_lo90=lo90,
        predicted_real_hi90=hi90,
        prediction_basis=basis,
        latency_model=versions["latency_model"],
        gap_model=versions["gap_model"],
        **measured,
        **extra,
    ).with_finite()
