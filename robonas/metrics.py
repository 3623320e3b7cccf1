"""A trial's figures as one typed record: `TrialMetrics`.

Training fills the simulation figures, the scorer adds latency, gap and objective, re-scoring
after a robot report adds what the robots measured. The store keeps the record as a JSON object
with these field names as keys (the stored format is unchanged from the dict it replaces); keys
this version does not know are kept in `extra` and written back as they were.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

# What a strategy is told about a finished trial: objective, predicted_real_return, p99_ms.
StrategyView = dict[str, float]


@dataclass(frozen=True)
class TrialMetrics:
    """Figures of one trial; None where a figure does not apply (a rejected trial has only its
    latency figures) or was not finite."""

    # simulation: training and evaluation (robonas.search.training)
    auc: float | None = None
    asymptotic_return: float | None = None
    asymptotic_std: float | None = None
    robustness_return: float | None = None
    random_return: float | None = None
    env_steps: int | None = None
    wall_s: float | None = None
    steps_per_s: float | None = None
    # latency on the study's device, by the latency model named in `latency_model`
    p50_ms: float | None = None
    p99_ms: float | None = None
    params: int | None = None
    macs: int | None = None
    bytes: int | None = None
    device: str | None = None
    # scoring (robonas.scoring.score)
    latency_share: float | None = None
    gap_mean: float | None = None
    gap_std: float | None = None
    predicted_real_return: float | None = None
    predicted_real_std: float | None = None
    objective: float | None = None
    objective_std: float | None = None
    objective_lcb: float | None = None
    latency_model: str | None = None
    gap_model: str | None = None
    # what robots measured, once a deployed artifact of this trial has run
    measured_real_return: float | None = None
    measured_episodes: int | None = None
    model_real_return: float | None = None
    model_real_std: float | None = None
    # the predicted real return's 90% interval and what made it: "gap-model", or "fleet_mean" /
    # "fleet_worst" over the robots' twins (robonas.models.robot_predictions)
    predicted_real_lo90: float | None = None
    predicted_real_hi90: float | None = None
    prediction_basis: str | None = None
    fleet_model: str | None = None
    # per robot: {mean, std, lo90, hi90, basis, twin[, measured, model_mean, model_std]}
    robots: dict[str, dict[str, Any]] | None = None
    # the candidate's returns in each twin, by twin label (a cache: twins are replayed once)
    twin_returns: dict[str, dict[str, Any]] | None = None
    # what the strategy was told when the trial finished; kept through re-scoring so that a
    # resumed search replays the strategy with what it was told then (asks come out as recorded)
    told: StrategyView | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialMetrics:
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("told"), Mapping):
            values["told"] = {k: float(v) for k, v in values["told"].items()}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON object: every figure that is set, then the unknown keys as read."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out = {k: v for k, v in out.items() if v is not None}
        out.update(self.extra)
        return out

    def value(self, name: str) -> float | None:
        """A numeric figure by name (the ranking key of a study: `objective` or `objective_lcb`)."""
        v = getattr(self, name)
        return None if v is None else float(v)

    def with_finite(self) -> TrialMetrics:
        """The same figures with non-finite floats (an unfit curve, say) set to None."""
        bad: dict[str, Any] = {
            f.name: None
            for f in fields(self)
            if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))
        }
        return replace(self, **bad) if bad else self

    def strategy_view(self, ranking_key: str) -> StrategyView | None:
        """What a strategy is told of this trial (None: it has no objective)."""
        objective = self.value(ranking_key)
        if self.objective is None or objective is None:
            return None
        if self.predicted_real_return is None or self.p99_ms is None:
            return None
        return {
            "objective": objective,
            "predicted_real_return": float(self.predicted_real_return),
            "p99_ms": float(self.p99_ms),
        }
