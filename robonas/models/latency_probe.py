"""Hardware-in-the-loop latency measurements: compile probe models, time them on a robot.

`robonas calibrate latency` picks a representative, space-covering set of architectures,
compiles each (untrained weights: latency depends on shapes, not values) to the same int8
TFLite form an export makes, sends each to an agent with BENCH (the model travels inline, the
robot's slots are untouched), and fits the calibrated latency model on the timings. The agent's
bench measures the whole control step (quantise + invoke + dequantise), which is what a control
deadline sees, so that is what the model learns.

Everything is measured before anything is stored: an agent that stops answering half-way
leaves no partial calibration behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from robonas.models.latency_calibration import LatencySample
from robonas.space import PolicyArch


class BenchClient(Protocol):
    """What `measure` needs of an agent connection (robonas.fleet.client.AgentClient has it)."""

    def bench_model(self, model: bytes, runs: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ProbeModel:
    arch: PolicyArch
    model: bytes


def compile_probe(arch: PolicyArch, seed: int = 0) -> ProbeModel:
    """int8 TFLite of an untrained actor, calibrated on standard-normal inputs (normalised obs)."""
    import torch

    from robonas.export.tflite_convert import to_tflite_int8

    torch.manual_seed(seed)
    actor = arch.build_actor().eval()
    calib = np.random.default_rng(seed).standard_normal((256, arch.input_dim)).astype(np.float32)
    return ProbeModel(arch, to_tflite_int8(actor, np.clip(calib, -5, 5)))


def measure(
    client: BenchClient,
    probes: list[ProbeModel],
    runs: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[LatencySample]:
    """BENCH every probe on the agent; p50/p99 of the whole step, in ms."""
    samples = []
    for i, probe in enumerate(probes):
        report = client.bench_model(probe.model, runs=runs)
        step = report["bench"]["step_us"]
        samples.append(
            LatencySample(probe.arch, step["p50"] / 1000.0, max(step["p99"], step["p50"]) / 1000.0)
        )
        if progress:
            progress(i + 1, len(probes))
    return samples
