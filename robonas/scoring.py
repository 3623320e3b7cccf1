"""Scoring of trained candidates: predicted real return, the objective, Pareto front, ranking.

DESIGN.md step 5: predicted real return = asymptotic return - gap; the objective is a weighted
mean of normalised learning-curve AUC and normalised predicted real return; the latency budget is
a hard constraint applied elsewhere (`robonas.models.latency_model.budget_check`); the Pareto front over
(predicted real return up, p99 latency down) is kept for the report.

AUC convention: `auc` arrives already normalised to [0, 1], as `robonas.search.curves.auc_normalised`
computes it (returns mapped by the same range, area divided by the step span); only the predicted
real return is normalised here. An AUC outside [0, 1] is a unit mistake and is refused.

Everything here is a handful of comparisons on at most a few thousand trials, so it is plain
Python: the O(n^2) Pareto filter is clearer than pulling in a multi-objective library for it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from robonas.errors import ConfigError, RobonasError
from robonas.models.gap_model import GapPrediction


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
            f"objective: auc={auc!r} is outside [0, 1]; pass the normalised AUC (robonas.search.curves.auc_normalised)"
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


def ranking_key(ranking: str) -> str:
    """The metric a study ranks by: the objective's mean, or its lower confidence bound."""
    return "objective_lcb" if ranking == "lcb" else "objective"


# Trial metrics key: what the strategy was told when the trial finished. Re-scoring with
# calibrated models changes a trial's figures; a resumed search replays the strategy with what it
# was told then, so its asks come out as recorded (new figures reach it through new trials).
TOLD = "told"


def strategy_view(metrics: Mapping[str, Any] | None, ranking: str) -> dict[str, float] | None:
    """What a strategy is told about a finished trial (None: it failed or was rejected)."""
    if metrics is None or metrics.get("objective") is None:
        return None
    return {
        "objective": float(metrics[ranking_key(ranking)]),
        "predicted_real_return": float(metrics["predicted_real_return"]),
        "p99_ms": float(metrics["p99_ms"]),
    }


def told_view(metrics: Mapping[str, Any] | None, ranking: str) -> dict[str, float] | None:
    """What the strategy was told about this trial: the kept figures if it was re-scored since."""
    if metrics is not None and isinstance(metrics.get(TOLD), Mapping):
        return {k: float(v) for k, v in metrics[TOLD].items()}
    return strategy_view(metrics, ranking)


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


def rank(
    rows: Sequence[Mapping[str, Any]], key: str = "objective", lcb: float | None = None
) -> list[Mapping[str, Any]]:
    """Rows sorted best first by `row[key]`; ties keep their input order.

    With `lcb=k`, rows are ranked by the lower confidence bound `row[key] - k * row[key + "_std"]`,
    which prefers candidates whose predicted score is also certain.
    """
    if lcb is not None and (
        isinstance(lcb, bool) or not isinstance(lcb, (int, float)) or not math.isfinite(lcb) or lcb < 0
    ):
        raise ConfigError(f"rank: lcb must be a finite number >= 0 or None, got {lcb!r}")
    std_key = f"{key}_std"

    def score(i_row: tuple[int, Mapping[str, Any]]) -> float:
        i, row = i_row
        if key not in row:
            raise ConfigError(f"rank: row {i} has no field {key!r}; its fields are {sorted(row)}")
        value = float(row[key])
        if lcb is not None:
            if std_key not in row:
                raise ConfigError(f"rank: lcb={lcb} needs field {std_key!r}, row {i} has only {sorted(row)}")
            value -= lcb * float(row[std_key])
        if math.isnan(value):
            raise RobonasError(f"rank: row {i} scores NaN on {key!r}")
        return value

    scored = [(score(item), item[1]) for item in enumerate(rows)]
    # sorted() stays stable with reverse=True, so equal scores keep their input order.
    return [row for _, row in sorted(scored, key=lambda s_row: s_row[0], reverse=True)]
