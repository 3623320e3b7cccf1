"""Scoring a trained candidate: latency, sim-to-real gap, predicted real return, objective.

One function, `score`, turns a trial's simulation figures into the metrics the study ranks by.
It is used when a trial finishes and again whenever the latency or gap model is recalibrated,
so the ranking always says which model versions produced it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from robonas.devices import DeviceProfile
from robonas.gap_model import GapFeatures, GapModel
from robonas.latency_model import LatencyModel
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


def score(arch: PolicyArch, sim_figures: dict[str, Any], ctx: ScoringContext) -> dict[str, Any]:
    """Metrics of a trained trial: its simulation figures plus latency, gap and objective."""
    m = dict(sim_figures)
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
