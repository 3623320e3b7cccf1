"""Scoring a trained candidate: latency, sim-to-real gap, predicted real return, objective.

One function, `score`, turns a trial's simulation figures into the metrics the study ranks by.
It is used when a trial finishes and again whenever the latency or gap model is recalibrated,
so the ranking always says which model versions produced it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from robonas.models.devices import DeviceProfile
from robonas.models.gap_model import GapFeatures, GapModel
from robonas.models.latency_model import LatencyModel
from robonas.scoring import ObjectiveWeights, objective, objective_std, predicted_real_return
from robonas.space import PolicyArch


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


def latency_metrics(arch: PolicyArch, ctx: ScoringContext) -> dict[str, Any]:
    pred = ctx.latency_model.predict(arch, ctx.device)
    costs = arch.cost_summary()
    return {
        "p50_ms": pred.p50_ms,
        "p99_ms": pred.p99_ms,
        "params": costs["params"],
        "macs": costs["macs"],
        "bytes": costs["bytes"],
        "device": ctx.device.name,
    }


def with_measurements(
    prior_mean: float, prior_std: float, returns: list[float], return_range: float
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


def score(
    arch: PolicyArch,
    sim_figures: dict[str, Any],
    ctx: ScoringContext,
    measured_returns: list[float] | None = None,
) -> dict[str, Any]:
    """Metrics of a trained trial: its simulation figures plus latency, gap and objective.

    `measured_returns`: the trial's real episodes from robots, if any; they update the
    predicted real return (see `with_measurements`).
    """
    m = dict(sim_figures)
    for key in ("measured_real_return", "measured_episodes", "model_real_return", "model_real_std"):
        m.pop(key, None)
    m.update(latency_metrics(arch, ctx))
    asym = float(m["asymptotic_return"])
    robust = m.get("robustness_return")
    features = GapFeatures(
        asymptotic_return=asym,
        robustness_return=asym if robust is None else float(robust),
        p99_ms=m["p99_ms"],
        control_period_ms=1000.0 / ctx.control_hz,
        params=int(m["params"]),
        return_lo=ctx.return_lo,
        return_hi=ctx.return_hi,
    )
    gap = ctx.gap_model.predict(features)
    real_mean, real_std = predicted_real_return(asym, gap)
    if measured_returns:
        m["model_real_return"], m["model_real_std"] = real_mean, real_std
        m["measured_real_return"] = float(np.mean(measured_returns))
        m["measured_episodes"] = len(measured_returns)
        real_mean, real_std = with_measurements(
            real_mean, real_std, measured_returns, ctx.return_hi - ctx.return_lo
        )
    obj = objective(float(m["auc"]), real_mean, ctx.return_lo, ctx.return_hi, ctx.weights)
    obj_std = objective_std(real_std, ctx.return_lo, ctx.return_hi, ctx.weights)
    m.update(
        {
            "latency_share": features.latency_share,
            "gap_mean": gap.mean_gap,
            "gap_std": gap.std_gap,
            "predicted_real_return": real_mean,
            "predicted_real_std": real_std,
            "objective": obj,
            "objective_std": obj_std,
            "objective_lcb": obj - ctx.lcb_z * obj_std,
            **ctx.model_versions(),
        }
    )
    for key, value in m.items():
        if isinstance(value, float) and not math.isfinite(value):
            m[key] = None
    return m
