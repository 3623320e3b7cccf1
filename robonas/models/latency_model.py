"""Latency models: predicted int8 inference time of a policy's actor on a device.

The interface (`LatencyModel`) is what the strategies use to reject a candidate before any
training, and what the calibrated model (a robust residual fit on agents' reports, in
`robonas.models.latency_calibration`) implements as well. Each model has a `name` and a
`version` so a stored score says which model produced it.

`AnalyticLatencyModel` is a roofline model. A layer can go no faster than its arithmetic allows
(MACs / the device's MAC rate) and no faster than its memory traffic allows (bytes moved / the
device's bandwidth); whichever limit is larger bounds the layer, so a layer with few MACs per byte
(a wide, shallow GEMV, a LayerNorm, an add) is memory-bound and one with many MACs per byte is
compute-bound. Small TFLite graphs also pay a fixed cost per op (dispatch, requantisation set-up)
and per Invoke() (input/output copies, the Python binding), which for the tiny MLPs robonas
searches often outweighs both roofline terms, so they are separate additive terms:

    p50 = per_invoke + sum over layers of (max(macs / compute, bytes / bandwidth) + per_layer)
    p99 = p50 * device.p99_over_p50

Bytes are counted at int8 (`LayerCost.bytes_moved(elem_bytes=1)`); int32 biases and fused
activations make the real graph differ slightly, which the calibrated model absorbs. No library
does this arithmetic for us: it is a few lines, written out so it can be read against the formula.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from robonas.errors import RobonasError
from robonas.models.costs import LayerCost
from robonas.models.devices import DeviceProfile

INT8_BYTES = 1


class HasActorCosts(Protocol):
    """What `predict` needs from an architecture (robonas.space.PolicyArch provides it)."""

    def actor_layer_costs(self) -> list[LayerCost]: ...


@dataclass(frozen=True)
class LatencyPrediction:
    """Predicted median and 99th-percentile inference time, in milliseconds."""

    p50_ms: float
    p99_ms: float

    def __post_init__(self) -> None:
        for key in ("p50_ms", "p99_ms"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise RobonasError(f"LatencyPrediction.{key} must be finite and >= 0, got {value!r}")
        if self.p99_ms < self.p50_ms:
            raise RobonasError(f"LatencyPrediction.p99_ms ({self.p99_ms}) is below p50_ms ({self.p50_ms})")


@dataclass(frozen=True)
class LayerTime:
    """Roofline breakdown of one layer, in seconds; `bound` is "compute" or "memory"."""

    name: str
    compute_s: float
    memory_s: float
    overhead_s: float

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"

    @property
    def total_s(self) -> float:
        return max(self.compute_s, self.memory_s) + self.overhead_s


class LatencyModel(ABC):
    """Predicts inference latency of an architecture's actor on a device profile."""

    name: str = "latency-model"
    version: str = "0"

    def predict(self, arch: HasActorCosts, device: DeviceProfile) -> LatencyPrediction:
        """Latency of `arch`'s actor (batch 1) on `device`."""
        return self.predict_costs(arch.actor_layer_costs(), device)

    @abstractmethod
    def predict_costs(self, costs: Sequence[LayerCost], device: DeviceProfile) -> LatencyPrediction:
        """Latency of a forward pass through `costs`, layer by layer, on `device`."""


class AnalyticLatencyModel(LatencyModel):
    """The roofline prior: device figures only, nothing fitted (see the module docstring)."""

    name = "analytic-roofline"
    version = "1"

    def layer_times(self, costs: Sequence[LayerCost], device: DeviceProfile) -> list[LayerTime]:
        """Per-layer compute, memory and overhead times; the features a calibration refits."""
        per_layer_s = device.per_layer_overhead_us * 1e-6
        return [
            LayerTime(
                name=c.name,
                compute_s=c.macs / device.compute_macs_per_s,
                memory_s=c.bytes_moved(INT8_BYTES) / device.memory_bytes_per_s,
                overhead_s=per_layer_s,
            )
            for c in costs
        ]

    def predict_costs(self, costs: Sequence[LayerCost], device: DeviceProfile) -> LatencyPrediction:
        total_s = device.per_invoke_overhead_us * 1e-6
        total_s += sum(t.total_s for t in self.layer_times(costs, device))
        p50_ms = total_s * 1e3
        return LatencyPrediction(p50_ms=p50_ms, p99_ms=p50_ms * device.p99_over_p50)
