"""Sim-to-real gap models: how much return a policy is expected to lose on the robot.

`GapModel` is the interface the scorer calls; `HeuristicGapModel` is the default used before any
robot has reported. The calibrated Bayesian regression (`robonas.models.gap_calibration`)
implements the same `predict(features) -> GapPrediction` and is stored as a versioned row.

The heuristic encodes two effects, each with a coefficient given to the constructor:

- Latency. While inference fits inside the control period the action arrives late within the
  tick, a mild degradation; once p99 passes a whole period the agent misses ticks and acts on
  stale observations, which hurts much more. The gap is piecewise linear in
  `latency_share = p99 / control_period`, steeper past 1, and scaled by the return range so the
  coefficients are fractions of "everything the task has to give".
- Robustness. A policy that already lost return in simulation under domain randomisation, sensor
  noise and action delay is expected to lose at least as much on the robot:
  `robustness_drop = max(0, asymptotic - robustness)` enters directly, in return units.

    mean_gap = range * (latency_coef * share + overrun_coef * max(0, share - 1))
               + robustness_coef * robustness_drop
    std_gap  = std_floor * range + std_coef * mean_gap

Plain arithmetic, no library: the point is that it is readable and that its coefficients are
data (constructor arguments, later stored rows), not buried constants.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from robonas.errors import ConfigError


def _finite(owner: str, key: str, value: Any, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{owner}.{key} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{owner}.{key} must be >= {minimum:g}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class GapFeatures:
    """Simulation-side facts about one trained candidate that predict its sim-to-real gap.

    asymptotic_return:  estimated final return in simulation
    robustness_return:  return under domain randomisation, sensor noise and action delay
    p99_ms:             predicted (or measured) p99 inference latency on the target device
    control_period_ms:  the robot's control period (1000 / control rate in Hz)
    params:             actor parameter count (a feature for the calibrated model)
    return_lo, return_hi: the task's return range used for normalisation
    """

    asymptotic_return: float
    robustness_return: float
    p99_ms: float
    control_period_ms: float
    params: int
    return_lo: float
    return_hi: float

    def __post_init__(self) -> None:
        owner = "GapFeatures"
        for key in ("asymptotic_return", "robustness_return", "return_lo", "return_hi"):
            _finite(owner, key, getattr(self, key))
        _finite(owner, "p99_ms", self.p99_ms, minimum=0.0)
        if _finite(owner, "control_period_ms", self.control_period_ms) <= 0:
            raise ConfigError(f"{owner}.control_period_ms must be > 0, got {self.control_period_ms!r}")
        if isinstance(self.params, bool) or not isinstance(self.params, int) or self.params < 0:
            raise ConfigError(f"{owner}.params must be an int >= 0, got {self.params!r}")
        if not self.return_hi > self.return_lo:
            raise ConfigError(
                f"{owner}: return_hi ({self.return_hi!r}) must be greater than return_lo ({self.return_lo!r})"
            )

    @property
    def latency_share(self) -> float:
        """Fraction of the control period the p99 inference takes (> 1: a whole tick missed)."""
        return self.p99_ms / self.control_period_ms

    @property
    def robustness_drop(self) -> float:
        """Return lost in simulation under perturbation, never negative."""
        return max(0.0, self.asymptotic_return - self.robustness_return)

    @property
    def return_range(self) -> float:
        return self.return_hi - self.return_lo


@dataclass(frozen=True)
class GapPrediction:
    """Expected return lost on the robot (>= 0) and its standard deviation, in return units."""

    mean_gap: float
    std_gap: float

    def __post_init__(self) -> None:
        _finite("GapPrediction", "mean_gap", self.mean_gap, minimum=0.0)
        _finite("GapPrediction", "std_gap", self.std_gap, minimum=0.0)


class GapModel(ABC):
    """Predicts the sim-to-real return gap from simulation features."""

    name: str = "gap-model"
    version: str = "0"

    @abstractmethod
    def predict(self, features: GapFeatures) -> GapPrediction:
        """The expected gap for one candidate."""


class HeuristicGapModel(GapModel):
    """The default prior (formula in the module docstring).

    Defaults:
      latency_coef=0.1     p99 equal to one full control period costs 10% of the return range
      overrun_coef=0.5     each further period of overrun costs another 50% (stale actions)
      robustness_coef=1.0  the robot loses what simulation lost under perturbation
      std_floor=0.05       5% of the range of uncertainty even for a perfect-looking candidate
      std_coef=0.5         uncertainty grows with the size of the predicted gap
    They are guesses to rank candidates sensibly before any robot reports; the calibrated model
    replaces them.
    """

    name = "heuristic-gap"
    version = "1"

    def __init__(
        self,
        latency_coef: float = 0.1,
        overrun_coef: float = 0.5,
        robustness_coef: float = 1.0,
        std_floor: float = 0.05,
        std_coef: float = 0.5,
    ) -> None:
        owner = "HeuristicGapModel"
        self.latency_coef = _finite(owner, "latency_coef", latency_coef, minimum=0.0)
        self.overrun_coef = _finite(owner, "overrun_coef", overrun_coef, minimum=0.0)
        self.robustness_coef = _finite(owner, "robustness_coef", robustness_coef, minimum=0.0)
        self.std_floor = _finite(owner, "std_floor", std_floor, minimum=0.0)
        self.std_coef = _finite(owner, "std_coef", std_coef, minimum=0.0)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> HeuristicGapModel:
        """From the search config's `[gap]` table; unknown keys are refused, not ignored."""
        valid = list(inspect.signature(cls.__init__).parameters)[1:]
        unknown = sorted(set(config) - set(valid))
        if unknown:
            raise ConfigError(f"gap: unknown coefficient(s) {unknown}; valid keys are {valid}")
        return cls(**dict(config))

    def params(self) -> dict[str, float]:
        """The coefficients, for storing next to the scores they produced."""
        return {
            "latency_coef": self.latency_coef,
            "overrun_coef": self.overrun_coef,
            "robustness_coef": self.robustness_coef,
            "std_floor": self.std_floor,
            "std_coef": self.std_coef,
        }

    def predict(self, features: GapFeatures) -> GapPrediction:
        share = features.latency_share
        span = features.return_range
        latency_gap = span * (self.latency_coef * share + self.overrun_coef * max(0.0, share - 1.0))
        mean_gap = latency_gap + self.robustness_coef * features.robustness_drop
        std_gap = self.std_floor * span + self.std_coef * mean_gap
        return GapPrediction(mean_gap=mean_gap, std_gap=std_gap)
