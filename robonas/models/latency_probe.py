"""Hardware-in-the-loop latency measurements: compile probe models, time them on a robot.

`robonas calibrate latency` picks two space-covering sets of architectures (one to fit, one held
out: `latency_calibration.select_probe_sets`), compiles each (untrained weights: latency depends
on shapes, not values) to the same int8 TFLite form an export makes (`compile_probe_set`, once:
a compile costs about 1.5 s, so `robonas bench latency` reuses the probes for every repeat), and
times them all together on an agent (`measure`). The agent's bench measures the whole control
step (quantise + invoke + dequantise), which is what a control deadline sees, so that is what
the model learns. On a sim twin the step is the emulated robot computer's.

How the timing is done (`measure`):
- An agent client with `bench_probes` (the measurement protocol of `device_agents.timing`,
  PROTOCOL.md BENCH): the agent warms up until the timings settle, times every probe in
  interleaved rounds, and reports per probe robust figures with a noise figure, plus a verdict
  on the noise of the whole set (`last_noise_verdict`).
- A client with only `bench_model` (an older host client): the same interleaving done from the
  host, `rounds` BENCH calls per probe of `runs / rounds` steps each, in a shuffled order per
  round, so drift on the robot's computer hits every probe alike; a probe's figure is the
  median of its round medians, its noise the IQR of the round medians over their median, and
  the verdict is `noise_verdict`.

The noise verdict is the protocol's (`device_agents.timing.verdict_from_noise`: a probe's noise,
the IQR of its round medians over their median, above the +-10% the fit must resolve refuses the
measurement, above 5% warns); `noise_verdict` applies it to the host's own rounds, and to an
agent's figures when the agent sends no verdict.

Everything is measured before anything is stored: an agent that stops answering half-way
leaves no partial calibration behind. numpy does the statistics.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from robonas.errors import ConfigError, RobonasError
from robonas.models.latency_calibration import LatencySample, select_probe_sets
from robonas.space import PolicyArch, SearchSpace

if TYPE_CHECKING:
    from robonas.fleet.inventory import AgentEntry, Inventory

# Measured steps per probe, split into interleaved rounds: 15 rounds of 40 steps.
DEFAULT_RUNS = 600
DEFAULT_ROUNDS = 15
# Probes one agent session keeps at once (device_agents.agent.MAX_PROBES): larger sets are
# measured in batches of at most this many.
MAX_PROBES_PER_BENCH = 64

Progress = Callable[[int, int], None]


class BenchClient(Protocol):
    """What `measure` needs of an agent connection (robonas.fleet.client.AgentClient has it).

    A client may also have `bench_probes(models, rounds, per_round) -> list[dict]` and
    `last_noise_verdict`; `measure` uses them when it does.
    """

    def bench_model(self, model: bytes, runs: int) -> dict[str, Any]: ...


class NoisyMeasurement(RobonasError):
    """The timings are too noisy to calibrate on (the noise verdict refused them)."""


@dataclass(frozen=True)
class ProbeModel:
    arch: PolicyArch
    model: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model).hexdigest()


@dataclass(frozen=True)
class ProbeSet:
    """Compiled probes: the fitting set and the held-out set (disjoint, each covering the space)."""

    fit: list[ProbeModel]
    holdout: list[ProbeModel]
    seed: int = 0

    @property
    def all(self) -> list[ProbeModel]:
        return [*self.fit, *self.holdout]


@dataclass(frozen=True)
class NoiseVerdict:
    """Whether timings are quiet enough to calibrate on: ok (quiet), a warning (ok and refuse
    both false: stored, with `message` printed) or a refusal; `worst` is the largest noise
    figure (relative spread of a probe's round medians)."""

    ok: bool
    refuse: bool
    worst: float
    message: str

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> NoiseVerdict:
        try:
            return cls(bool(d["ok"]), bool(d["refuse"]), float(d["worst"]), str(d.get("message") or ""))
        except (KeyError, TypeError, ValueError) as e:
            raise RobonasError(f"noise verdict: cannot read {dict(d)!r}: {e!r}") from e

    @classmethod
    def worst_of(cls, verdicts: Sequence[NoiseVerdict]) -> NoiseVerdict:
        """One verdict for several batches: refused if any is, ok if all are."""
        if not verdicts:
            raise RobonasError("noise verdict of no batches")
        worst = max(verdicts, key=lambda v: (v.refuse, not v.ok, v.worst))
        return cls(all(v.ok for v in verdicts), any(v.refuse for v in verdicts), worst.worst, worst.message)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "refuse": self.refuse, "worst": self.worst, "message": self.message}


@dataclass(frozen=True)
class ProbeTiming:
    """One probe's figures: robust p50 and p99 of the step (ms), its noise and how many rounds."""

    arch: PolicyArch
    p50_ms: float
    p99_ms: float
    noise: float | None
    rounds: int
    settled: bool | None = None

    @property
    def sample(self) -> LatencySample:
        return LatencySample(self.arch, self.p50_ms, max(self.p99_ms, self.p50_ms))


@dataclass(frozen=True)
class Measurement:
    timings: list[ProbeTiming]
    verdict: NoiseVerdict
    protocol: str  # "bench_probes" (the agent interleaves) or "host-rounds" (this host does)
    rounds: int
    per_round: int

    @property
    def samples(self) -> list[LatencySample]:
        return [t.sample for t in self.timings]


# ----------------------------------------------------------------------------- probes


def compile_probe(arch: PolicyArch, seed: int = 0) -> ProbeModel:
    """int8 TFLite of an untrained actor, calibrated on standard-normal inputs (normalised obs)."""
    import torch

    from robonas.export.tflite_convert import to_tflite_int8

    torch.manual_seed(seed)
    actor = arch.build_actor().eval()
    calib = np.random.default_rng(seed).standard_normal((256, arch.input_dim)).astype(np.float32)
    return ProbeModel(arch, to_tflite_int8(actor, np.clip(calib, -5, 5)))


def compile_probe_set(
    space: SearchSpace, n_fit: int, n_holdout: int, seed: int = 0, progress: Progress | None = None
) -> ProbeSet:
    """Select (`select_probe_sets`) and compile the fitting and held-out probes, once."""
    fit_archs, hold_archs = select_probe_sets(space, n_fit, n_holdout, seed)
    archs = [*fit_archs, *hold_archs]
    compiled = []
    for i, arch in enumerate(archs):
        compiled.append(compile_probe(arch, seed))
        if progress:
            progress(i + 1, len(archs))
    return ProbeSet(compiled[: len(fit_archs)], compiled[len(fit_archs) :], seed)


# ----------------------------------------------------------------------------- noise


def noise_verdict(timings: Sequence[ProbeTiming]) -> NoiseVerdict:
    """The protocol's verdict (`device_agents.timing.verdict_from_noise`) on probes' noise figures;
    probes without one (an agent that measured none) are left out."""
    from device_agents.timing import verdict_from_noise

    labels = [t.arch.describe() for t in timings]
    named = {
        (label if labels.count(label) == 1 else f"{label} #{i}"): t
        for i, (label, t) in enumerate(zip(labels, timings, strict=True))
        if t.noise is not None
    }
    v = verdict_from_noise(
        {n: float(t.noise or 0.0) for n, t in named.items()}, {n: t.rounds for n, t in named.items()}
    )
    return NoiseVerdict(v.ok, v.refuse, float(v.worst), v.message)


def _relative_iqr(values: Sequence[float]) -> float:
    q1, med, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float((q3 - q1) / med) if med > 0 else math.inf


# ----------------------------------------------------------------------------- measuring


def _check_runs(runs: int, rounds: int) -> int:
    """Steps per round for `runs` steps in `rounds` rounds (at least one step per round)."""
    for name, value in (("runs", runs), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name}: {value!r} must be an integer >= 1")
    return max(1, math.ceil(runs / rounds))


def measure(
    client: BenchClient,
    probes: Sequence[ProbeModel],
    runs: int = DEFAULT_RUNS,
    progress: Progress | None = None,
    rounds: int = DEFAULT_ROUNDS,
) -> Measurement:
    """Time every probe on the agent in interleaved rounds (module docstring); `runs` measured
    steps per probe in all. Uses the client's `bench_probes` when it has one."""
    per_round = _check_runs(runs, rounds)
    probes = list(probes)
    if not probes:
        raise RobonasError("measure: no probes to time")
    if hasattr(client, "bench_probes"):
        return _measure_on_agent(client, probes, rounds, per_round, progress)
    return _measure_from_host(client, probes, rounds, per_round, progress)


def _measure_on_agent(
    client: Any, probes: list[ProbeModel], rounds: int, per_round: int, progress: Progress | None
) -> Measurement:
    timings: list[ProbeTiming] = []
    verdicts: list[NoiseVerdict] = []
    for start in range(0, len(probes), MAX_PROBES_PER_BENCH):
        batch = probes[start : start + MAX_PROBES_PER_BENCH]
        reports = list(client.bench_probes([p.model for p in batch], rounds=rounds, per_round=per_round))
        if len(reports) != len(batch):
            raise RobonasError(f"bench_probes answered for {len(reports)} of {len(batch)} probes")
        batch_timings = []
        for probe, report in zip(batch, reports, strict=True):
            if report.get("sha256") not in (None, probe.sha256):
                raise RobonasError(
                    f"bench_probes answered for model {report.get('sha256')!r} where "
                    f"{probe.sha256} ({probe.arch.describe()}) was sent"
                )
            batch_timings.append(_timing_of(probe, report, rounds))
        timings += batch_timings
        given = getattr(client, "last_noise_verdict", None)
        verdicts.append(
            _readable(NoiseVerdict.from_mapping(given), batch)
            if isinstance(given, Mapping) and "refuse" in given
            else noise_verdict(batch_timings)
        )
        if progress:
            progress(len(timings), len(probes))
    return Measurement(timings, NoiseVerdict.worst_of(verdicts), "bench_probes", rounds, per_round)


def _readable(verdict: NoiseVerdict, probes: Sequence[ProbeModel]) -> NoiseVerdict:
    """The agent names probes by sha256; a person reads architectures."""
    message = verdict.message
    for p in probes:
        for key in (p.sha256, p.sha256[:16], p.sha256[:12]):
            message = message.replace(key, p.arch.describe())
    return replace(verdict, message=message)


def _timing_of(probe: ProbeModel, report: Mapping[str, Any], rounds: int) -> ProbeTiming:
    """A probe's figures from its `bench_probes` entry: the median of round medians when the
    agent reports one (`median_us`), else the p50 of all its steps."""
    try:
        step = report["step_us"]
        p50_us = float(report.get("median_us") or step["p50"])
        p99_us = float(step["p99"])
    except (KeyError, TypeError, ValueError) as e:
        raise RobonasError(f"bench_probes: no step timings for {probe.arch.describe()}: {e!r}") from e
    noise = report.get("noise")
    return ProbeTiming(
        probe.arch,
        p50_us / 1000.0,
        max(p99_us, p50_us) / 1000.0,
        None if noise is None else float(noise),
        int(report.get("rounds") or rounds),
        None if report.get("settled") is None else bool(report["settled"]),
    )


def _measure_from_host(
    client: BenchClient, probes: list[ProbeModel], rounds: int, per_round: int, progress: Progress | None
) -> Measurement:
    p50 = np.zeros((len(probes), rounds))
    p99 = np.zeros((len(probes), rounds))
    # a fixed seed: the order is shuffled so that no probe always runs just after the same
    # other one, not to be unpredictable
    rng = np.random.default_rng(0)
    for r in range(rounds):
        for i in rng.permutation(len(probes)):
            step = client.bench_model(probes[i].model, runs=per_round)["bench"]["step_us"]
            p50[i, r], p99[i, r] = float(step["p50"]), max(float(step["p99"]), float(step["p50"]))
        if progress:
            progress(r + 1, rounds)
    timings = [
        ProbeTiming(
            probe.arch,
            float(np.median(p50[i])) / 1000.0,
            float(np.median(p99[i])) / 1000.0,
            _relative_iqr(p50[i]),
            rounds,
        )
        for i, probe in enumerate(probes)
    ]
    return Measurement(timings, noise_verdict(timings), "host-rounds", rounds, per_round)


# ----------------------------------------------------------------------------- the agent


def client_for_entry(entry: AgentEntry, inventory: Inventory) -> Any:
    """An authenticated client for one robot of a fleet (tests replace this factory)."""
    from robonas.fleet.client import AgentClient, fleet_credentials

    return AgentClient.for_entry(entry, fleet_credentials(inventory))


def open_agent(fleet: str, agent: str) -> tuple[AgentEntry, Any]:
    """The inventory entry of `agent` in the fleet file `fleet` and a client for it (not yet
    connected; use it in a `with` block)."""
    from robonas.fleet.inventory import load_inventory

    inventory = load_inventory(fleet)
    entry = inventory.get(agent)
    return entry, client_for_entry(entry, inventory)
