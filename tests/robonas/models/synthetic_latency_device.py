"""A synthetic robot computer for latency calibration tests, and fake agent clients timing on it.

The device's true step time of an architecture is the roofline formula of `TRUE` (a device unlike
the x86-host prior it is calibrated against), times an optional per-architecture quirk (a fixed
log-normal factor per actor, what no roofline expresses). Measuring adds what a shared computer
adds: per-step jitter, a slow drift common to every probe (throttling cycles), rare preemption
outliers, and per-stretch disturbances (a neighbour that slows some rounds of some probes: what
makes round medians disagree, i.e. the protocol's noise figure).

Probes are not compiled: `fake_compile` wraps the architecture's JSON, and the device reads it
back, so tests run in milliseconds. `FakeClient` has `bench_probes` (the agent's interleaved
rounds, with the protocol's noise verdict from `device_agents.timing`); `HostOnlyClient` has only
the older `bench_model`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from device_agents.timing import verdict_from_noise
from robonas.models.devices import load_device
from robonas.models.latency_model import AnalyticLatencyModel
from robonas.models.latency_probe import ProbeModel
from robonas.space import PolicyArch, SearchSpace

PRIOR = load_device("x86-host")
# The real computer: slower compute, cheaper memory, costlier per op and per Invoke than the
# prior says. Linear layers stay compute-bound (1/2e9 s per MAC > 1/6e9 s per byte), so the four
# constants are identifiable.
TRUE = replace(
    PRIOR,
    compute_macs_per_s=2.0e9,
    memory_bytes_per_s=6.0e9,
    per_layer_overhead_us=3.0,
    per_invoke_overhead_us=25.0,
    p99_over_p50=1.6,
)
# Wide enough that MACs matter next to the overheads (about 35 to 130 us per step on TRUE).
SPACE = SearchSpace(
    obs_dim=17, act_dim=6, depths=(1, 2, 3), widths=(16, 32, 64, 128, 256), activations=("relu", "tanh")
)
_PREFIX = b"synthetic-probe:"


def fake_compile(arch: PolicyArch, seed: int = 0) -> ProbeModel:
    """A stand-in for `latency_probe.compile_probe`: the architecture itself, as bytes."""
    return ProbeModel(arch, _PREFIX + arch.to_json().encode())


def arch_of(model: bytes) -> PolicyArch:
    assert model.startswith(_PREFIX), model[:32]
    return PolicyArch.from_dict(json.loads(model[len(_PREFIX) :]))


@dataclass
class SyntheticDevice:
    jitter: float = 0.03  # log-normal sigma of each step
    drift: float = 0.0  # amplitude of a slow common drift (three cycles over a measurement)
    outliers: float = 0.0  # share of steps 3-10x too slow
    disturbance: float = 0.0  # log-normal sigma of a (probe, round) stretch's common factor
    quirk: float = 0.0  # log-normal sigma of a fixed per-actor factor
    seed: int = 0
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def roofline_us(self, arch: PolicyArch) -> float:
        return AnalyticLatencyModel().predict(arch, TRUE).p50_ms * 1000.0

    def true_us(self, arch: PolicyArch) -> float:
        """The step time a perfect measurement would find."""
        if not self.quirk:
            return self.roofline_us(arch)
        digest = hashlib.sha256(f"{self.seed}:{arch.to_json()}".encode()).digest()
        z = float(np.random.default_rng(int.from_bytes(digest[:8], "big")).standard_normal())
        return self.roofline_us(arch) * float(np.exp(self.quirk * z))

    def steps(self, arch: PolicyArch, n: int, t: float) -> np.ndarray:
        """`n` measured steps starting at time fraction `t` of the measurement (drift phase)."""
        base = self.true_us(arch) * float(np.exp(self.disturbance * self.rng.standard_normal()))
        base *= 1.0 + self.drift * float(np.sin(2 * np.pi * 3 * t))
        us = base * np.exp(self.jitter * self.rng.standard_normal(n))
        hit = self.rng.random(n) < self.outliers
        us[hit] *= self.rng.uniform(3, 10, int(hit.sum()))
        return us


def _summary(us: np.ndarray) -> dict[str, float]:
    p50, p90, p99 = np.percentile(us, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "min": float(us.min()),
        "mean": float(us.mean()),
        "max": float(us.max()),
    }


class HostOnlyClient:
    """An agent client as it was before `bench_probes`: one model per BENCH."""

    def __init__(self, device: SyntheticDevice):
        self.device = device
        self.bench_calls: list[tuple[PolicyArch, int]] = []
        self.hellos = 0
        self._t = 0.0

    def __enter__(self) -> HostOnlyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def hello(self) -> dict[str, Any]:
        self.hellos += 1
        return {"agent": "synthetic"}

    def bench_model(self, model: bytes, runs: int = 1000) -> dict[str, Any]:
        arch = arch_of(model)
        self.bench_calls.append((arch, runs))
        self._t += 0.002
        return {"bench": {"step_us": _summary(self.device.steps(arch, runs, self._t % 1.0))}}


class FakeClient(HostOnlyClient):
    """An agent client with the interleaved protocol: every model timed in each round, in a
    shuffled order, the median of round medians and the IQR of round medians reported, and the
    protocol's verdict left in `last_noise_verdict`."""

    def __init__(self, device: SyntheticDevice):
        super().__init__(device)
        self.last_noise_verdict: dict[str, Any] | None = None
        self.probe_calls: list[tuple[int, int, int]] = []  # (models, rounds, per_round)

    def bench_probes(
        self, models: list[bytes], rounds: int = 15, per_round: int = 40
    ) -> list[dict[str, Any]]:
        self.probe_calls.append((len(models), rounds, per_round))
        archs = [arch_of(m) for m in models]
        steps: list[list[np.ndarray]] = [[] for _ in models]
        total = rounds * len(models)
        k = 0
        for _ in range(rounds):
            for i in self.device.rng.permutation(len(models)):
                steps[i].append(self.device.steps(archs[i], per_round, k / total))
                k += 1
        out, noise, rounds_of = [], {}, {}
        for model, arch, per in zip(models, archs, steps, strict=True):
            medians = np.array([np.median(s) for s in per])
            q1, med, q3 = np.percentile(medians, [25, 50, 75])
            pooled = np.concatenate(per)
            step = _summary(pooled)
            step["p99"] = float(np.median([np.percentile(s, 99) for s in per]))
            sha = hashlib.sha256(model).hexdigest()
            noise[sha] = float((q3 - q1) / med)
            rounds_of[sha] = rounds
            out.append(
                {
                    "sha256": sha,
                    "step_us": step,
                    "invoke_us": _summary(pooled * 0.3),
                    "median_us": float(med),
                    "spread_us": float(q3 - q1),
                    "noise": noise[sha],
                    "rounds": rounds,
                    "settled": True,
                    "warmup_steps": 0,
                    "macs": sum(c.macs for c in arch.actor_layer_costs()),
                }
            )
        self.last_noise_verdict = verdict_from_noise(noise, rounds_of).to_dict()
        return out


# Devices used across the tests: quiet (a calm robot computer), noisy enough to warn, and too
# noisy to calibrate on (a neighbour slowing random stretches by tens of percent).
def quiet(seed: int = 0, **kw: Any) -> SyntheticDevice:
    return SyntheticDevice(jitter=0.03, drift=0.02, outliers=0.01, disturbance=0.005, seed=seed, **kw)


def warning(seed: int = 0) -> SyntheticDevice:
    return SyntheticDevice(jitter=0.03, drift=0.0, outliers=0.01, disturbance=0.035, seed=seed)


def too_noisy(seed: int = 0) -> SyntheticDevice:
    return SyntheticDevice(jitter=0.05, drift=0.1, outliers=0.02, disturbance=0.2, seed=seed)
