"""A latency measurement protocol for shared and throttling computers.

Timing a policy step on a robot's computer, or on a laptop that also runs a search, meets three
disturbances that a plain "warm up N times, then average M runs" does not survive:

* a warm-up of unknown length (first calls, caches, a CPU governor raising the clock);
* drift during the measurement (thermal throttling, a neighbour starting or stopping);
* outliers (preemption, interrupts), rare but tens of times the step.

The protocol answers each in turn. It times *probes*: a probe is a callable `step() -> int` that
performs one step and returns that step's duration in nanoseconds (the probe times itself,
usually with `time.perf_counter_ns` around exactly the span that matters; tests return synthetic
durations). `measure` then:

1. **warms up until the timings settle, detected, not counted**: batches of `warmup_batch` steps,
   interleaved across the probes; a probe has settled when the medians of its last
   `settle_batches` groups of warm-up steps lie within +-`settle_tol` of their median. The
   groups are single batches at first (the rule as stated) and grow with the warm-up: they
   split its second half. A fixed short window cannot see a slow decay (a step that falls from
   3x to 1x over 2000 steps changes by under 2% per batch of 20); a window over the second half
   of the warm-up sees any decay that is still going on, and its longer groups average the
   noise down, so a noisy but steady probe settles too. The warm-up ends when every probe has
   settled at the same time, or after `max_warmup` steps per probe (then `settled` is False).
   What no detector that looks only at timings can see is a flat slow phase that ends abruptly
   later; `min_warmup` is the lever for that, and the interleaved rounds below keep such a phase,
   if it ends inside the measurement, to a minority of the rounds.
2. **interleaved rounds**: each round runs every probe `per_round` steps in a freshly shuffled
   (seeded) order, so a drift or a neighbour hits every probe alike instead of whichever probe
   happened to run at that moment. Ratios between probes, which is what a latency fit learns
   from, survive a common drift.
3. **robust statistics**: the estimate is the median of the round medians (outliers move a
   round's median little, a minority of disturbed rounds moves the median of rounds not at all);
   the spread is the interquartile range of the round medians and `noise` = spread / estimate;
   with 3 probes or more, `noise` is taken after removing the drift the probes shared in each
   round (`common_mode_noise`), since that drift leaves their ratios, what a fit learns, alone.
   Percentiles follow the same "typical round" idea (see `summarize`), and the pooled figures
   over all measured steps are kept beside them.

`noise_verdict` compares the noise with the effect the latency fit must resolve (the +-10%
within which a calibration is judged) and says whether the figures can be trusted.

Standard library and numpy only: this runs on the robot (Python 3.9).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from device_agents.errors import DeviceError

Probe = Callable[[], int]

RESOLVE = 0.10  # the +-10% a calibrated latency model is judged by
MIN_NOISE_ROUNDS = 3  # fewer round medians than this carry no spread worth the name


@dataclass
class ProbeTiming:
    """What `measure` found for one probe. Times in microseconds.

    `median_us` is the estimate (median of the round medians), `spread_us` the interquartile
    range of the round medians, `noise` = spread_us / median_us. `p50_us` and `p90_us` are over
    all measured steps pooled; `p99_us` is the median of the per-round p99s (see `summarize`).
    `round_p90_us` is the median of the per-round p90s and `pooled_p99_us` the p99 of all steps
    pooled, for comparison. `steps` = rounds x per_round measured steps; `warmup_steps` were
    spent before them.
    """

    median_us: float
    spread_us: float
    noise: float
    p50_us: float
    p90_us: float
    p99_us: float
    min_us: float
    max_us: float
    mean_us: float
    rounds: int
    steps: int
    warmup_steps: int
    settled: bool
    round_medians_us: list[float] = field(default_factory=list)
    round_p90_us: float = 0.0
    pooled_p99_us: float = 0.0
    # set by Measurement.timings for probes measured together (see common_mode_noise)
    raw_noise: float = math.nan
    drift: float = 0.0

    def to_dict(self) -> dict[str, float]:
        """The summary a bench report carries: {p50, p90, p99, min, max, mean} in microseconds.

        Every percentile here is a typical round's (median over rounds of that round's
        percentile): p50 is the estimate, `median_us`, not the pooled `p50_us`. Medians of
        per-round percentiles are ordered as the percentiles are in every round, so
        min <= p50 <= p90 <= p99 <= max holds even when a drift makes pooled and per-round
        figures disagree. min, max and mean are over all measured steps."""
        return {
            "p50": self.median_us,
            "p90": self.round_p90_us,
            "p99": self.p99_us,
            "min": self.min_us,
            "max": self.max_us,
            "mean": self.mean_us,
        }

    def as_json(self) -> dict[str, Any]:
        """Every field, JSON-ready."""
        return asdict(self)


@dataclass(frozen=True)
class NoiseVerdict:
    """Whether timings are quiet enough to resolve an effect of `resolve` (relative).

    `ok`: every probe's noise is at most resolve/2. `refuse`: some probe's noise is above
    `resolve`. Neither: a warning. `noisy` names the probes above resolve/2 (or measured over too
    few rounds to tell), noisiest first; `worst` is the largest noise.
    """

    ok: bool
    refuse: bool
    noisy: list[str]
    worst: float
    message: str
    resolve: float = RESOLVE

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "refuse": self.refuse,
            "noisy": list(self.noisy),
            "worst": self.worst,
            "message": self.message,
            "resolve": self.resolve,
        }


# --- the protocol ------------------------------------------------------------------------------
def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DeviceError(f"{name}: {value!r} is not an integer >= {minimum}")
    return value


def _settled(durations: Sequence[int], batch_ends: Sequence[int], groups: int, tol: float) -> bool:
    """Do the medians of the last `groups` groups of warm-up steps lie within +-tol of their
    median, with no trend left between the first and the last? The groups split the last
    max(groups, half of all) batches, so they are single batches early on and grow with the
    warm-up (see the module docstring)."""
    n = len(batch_ends)
    if n < groups:
        return False
    take = max(groups, n // 2)
    first = n - take  # index of the first batch in the window
    start = batch_ends[first - 1] if first > 0 else 0
    window = np.asarray(durations[start:], dtype=np.float64)
    medians: list[float] = []
    for batches in np.array_split(np.arange(first, n), groups):  # whole batches per group
        lo = batch_ends[batches[0] - 1] if batches[0] > 0 else 0
        medians.append(float(np.median(window[lo - start : batch_ends[batches[-1]] - start])))
    centre = float(np.median(medians))
    level = all(abs(m - centre) <= tol * centre for m in medians)
    # a decay still under way: the first and last groups differ; carried on for as long again
    # it must stay inside the tolerance, so the difference must be under half of it
    return level and abs(medians[-1] - medians[0]) <= tol / 2 * centre


def summarize(
    round_samples_ns: Sequence[Sequence[int]] | np.ndarray, warmup_steps: int = 0, settled: bool = True
) -> ProbeTiming:
    """The protocol's statistics of one probe from its measured steps, one row per round (ns).

    estimate = median of the round medians; spread = IQR of the round medians (the middle half
    of the rounds: a quarter of the rounds on either side may be disturbed without moving it, and
    with 15 rounds it still rests on 8 of them); noise = spread / estimate.

    p99 is the median of the per-round p99s, not the p99 of all steps pooled: the pooled p99
    belongs to the worst stretch of the run (a neighbour busy for one round puts that round's
    every step in the pooled tail), while a control deadline lives with the tail of a typical
    stretch of running. With 40 steps a round, a round's p99 is close to its maximum, and the
    median over rounds of a round's maximum sits at the step distribution's ~98th percentile
    (1 - ln 2 / 40): near p99, and immune to a minority of bad rounds. The pooled p99 is kept as
    `pooled_p99_us`.
    """
    rows = [np.asarray(r, dtype=np.float64) / 1000.0 for r in round_samples_ns]
    rows = [r for r in rows if r.size]
    if not rows:
        raise DeviceError("summarize: no measured steps")
    medians = np.array([np.median(r) for r in rows])
    p90s = np.array([np.percentile(r, 90) for r in rows])
    p99s = np.array([np.percentile(r, 99) for r in rows])
    pooled = np.concatenate(rows)
    estimate = float(np.median(medians))
    q25, q75 = np.percentile(medians, [25, 75])
    spread = float(q75 - q25)
    p50, p90, p99 = (float(v) for v in np.percentile(pooled, [50, 90, 99]))
    return ProbeTiming(
        median_us=estimate,
        spread_us=spread,
        noise=spread / estimate if estimate > 0 else math.inf,
        p50_us=p50,
        p90_us=p90,
        p99_us=float(np.median(p99s)),
        min_us=float(pooled.min()),
        max_us=float(pooled.max()),
        mean_us=float(pooled.mean()),
        rounds=len(rows),
        steps=int(pooled.size),
        warmup_steps=int(warmup_steps),
        settled=bool(settled),
        round_medians_us=[float(m) for m in medians],
        round_p90_us=float(np.median(p90s)),
        pooled_p99_us=p99,
    )


def common_mode_noise(rounds_ns: Mapping[str, Sequence[Sequence[int]]]) -> tuple[dict[str, float], float]:
    """Noise of each probe against the others, and the drift they shared: (noise by name, drift).

    Interleaving makes a change of the machine's speed between rounds hit every probe alike, and
    a latency fit learns from the probes' *ratios* (and their common level, which the next
    calibration re-measures anyway). So, with 3 probes or more, each round's common level is the
    median over probes of (round median / that probe's overall median); a probe's noise is the
    IQR / median of its round medians divided by the round's level: what is left once the
    shared drift is taken out. `drift` is the IQR / median of the levels. With fewer probes the
    two cannot be told apart: the plain noise (IQR / median of round medians) and drift 0."""
    medians = {
        name: np.asarray([np.median(np.asarray(row, np.float64)) for row in rows], np.float64)
        for name, rows in rounds_ns.items()
    }

    def rel_iqr(x: np.ndarray) -> float:
        q1, mid, q3 = np.percentile(x, (25, 50, 75))
        return float((q3 - q1) / mid) if mid > 0 else math.inf

    lengths = {len(m) for m in medians.values()}
    if len(medians) < 3 or len(lengths) != 1 or min(lengths) < MIN_NOISE_ROUNDS:
        return {name: rel_iqr(m) for name, m in medians.items()}, 0.0
    rel = np.stack([m / np.median(m) for m in medians.values()])  # probes x rounds
    level = np.median(rel, axis=0)
    adjusted = rel / level
    return {name: rel_iqr(adjusted[i]) for i, name in enumerate(medians)}, rel_iqr(level)


@dataclass
class Measurement:
    """Everything `measure_raw` recorded: per probe, the warm-up durations and the measured
    durations one row per round (ns), and whether its warm-up settled."""

    warmup_ns: dict[str, list[int]]
    rounds_ns: dict[str, list[list[int]]]
    settled: dict[str, bool]
    order: list[list[str]]  # probe order of each round, as run

    def timings(self) -> dict[str, ProbeTiming]:
        """One ProbeTiming per probe; with 3 probes or more `noise` is each probe's noise once
        the drift all of them shared is taken out (`common_mode_noise`), `raw_noise` the plain
        figure and `drift` the shared part."""
        noise, drift = common_mode_noise(self.rounds_ns)
        out = {}
        for name, rows in self.rounds_ns.items():
            t = summarize(rows, len(self.warmup_ns[name]), self.settled[name])
            t.raw_noise, t.drift, t.noise = t.noise, drift, noise[name]
            out[name] = t
        return out


def measure_raw(
    probes: Mapping[str, Probe],
    *,
    rounds: int = 15,
    per_round: int = 40,
    warmup_batch: int = 20,
    settle_batches: int = 3,
    settle_tol: float = 0.05,
    max_warmup: int = 4000,
    min_warmup: int = 0,
    seed: int = 0,
) -> Measurement:
    """Run the protocol (see `measure`) and return the raw durations."""
    if not probes:
        raise DeviceError("measure: no probes")
    _positive_int("rounds", rounds)
    _positive_int("per_round", per_round)
    _positive_int("warmup_batch", warmup_batch)
    _positive_int("settle_batches", settle_batches)
    _positive_int("max_warmup", max_warmup, 0)
    _positive_int("min_warmup", min_warmup, 0)
    if not (isinstance(settle_tol, (int, float)) and 0 < settle_tol < 1):
        raise DeviceError(f"settle_tol: {settle_tol!r} is not a fraction between 0 and 1")
    max_warmup = max(max_warmup, min_warmup)
    names = list(probes)
    rng = random.Random(seed)  # the orders are the only randomness: reproducible per seed

    warm: dict[str, list[int]] = {n: [] for n in names}
    ends: dict[str, list[int]] = {n: [] for n in names}
    spent = 0  # warm-up steps per probe: the batches go in lockstep, so the same for all
    order = names[:]
    while spent < max_warmup:
        k = min(warmup_batch, max_warmup - spent)
        rng.shuffle(order)
        for name in order:
            step, out = probes[name], warm[name]
            for _ in range(k):
                out.append(step())
            ends[name].append(len(out))
        spent += k
        if spent >= min_warmup and all(_settled(warm[n], ends[n], settle_batches, settle_tol) for n in names):
            break
    settled = {n: _settled(warm[n], ends[n], settle_batches, settle_tol) for n in names}

    measured: dict[str, list[list[int]]] = {n: [] for n in names}
    orders = []
    for _ in range(rounds):
        rng.shuffle(order)
        orders.append(order[:])
        for name in order:
            step = probes[name]
            measured[name].append([step() for _ in range(per_round)])
    return Measurement(warm, measured, settled, orders)


def measure(
    probes: Mapping[str, Probe],
    *,
    rounds: int = 15,
    per_round: int = 40,
    warmup_batch: int = 20,
    settle_batches: int = 3,
    settle_tol: float = 0.05,
    max_warmup: int = 4000,
    min_warmup: int = 0,
    seed: int = 0,
) -> dict[str, ProbeTiming]:
    """Time every probe with the protocol of this module; one `ProbeTiming` per probe name.

    `max_warmup` and `min_warmup` bound the warm-up steps per probe (max_warmup is raised to
    min_warmup if below it; 0 skips the warm-up, and `settled` is then False). `seed` fixes the
    probe orders.
    """
    return measure_raw(
        probes,
        rounds=rounds,
        per_round=per_round,
        warmup_batch=warmup_batch,
        settle_batches=settle_batches,
        settle_tol=settle_tol,
        max_warmup=max_warmup,
        min_warmup=min_warmup,
        seed=seed,
    ).timings()


# --- the verdict -------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{x * 100:.1f}%" if math.isfinite(x) else "inf"


def verdict_from_noise(
    noise: Mapping[str, float], rounds: Mapping[str, int] | None = None, resolve: float = RESOLVE
) -> NoiseVerdict:
    """The verdict on plain figures: probe name -> noise (and -> rounds, if known).

    Why these thresholds. A calibration is judged by the share of architectures whose latency
    it predicts within +-`resolve` (10%) of the measurement, so the measurement itself must be
    reproducible to well inside that band. The noise is the interquartile range of the round
    medians relative to the estimate: how far the conditions of this computer moved between
    stretches of a few milliseconds within one measurement. It is the only view a single
    measurement has of how far the next one (the next calibration, the robot tomorrow) may land,
    since the disturbances (a neighbour, a clock change) persist longer than a round and do not
    average out over rounds. Noise above `resolve` means the machine moved by more than the
    whole band the model is judged by: its figures would judge the machine, not the model, so
    they are refused. Noise up to resolve/2 leaves at least half of the band to the model's own
    error: trusted. In between, the figures are usable with a warning. A probe measured over
    fewer than 3 rounds has no spread to speak of: a warning, never ok.
    """
    if not noise:
        return NoiseVerdict(False, False, [], 0.0, "no probes measured", resolve)
    half = resolve / 2
    counts = rounds or {}
    few = sorted(n for n in noise if counts.get(n, MIN_NOISE_ROUNDS) < MIN_NOISE_ROUNDS)

    def key(n: str) -> float:
        v = noise[n]
        return v if not math.isnan(v) else math.inf

    ranked = sorted(noise, key=key, reverse=True)
    worst = key(ranked[0])
    loud = [n for n in ranked if key(n) > half]
    too_loud = [n for n in ranked if key(n) > resolve]
    noisy = loud + [n for n in few if n not in loud]
    refuse = bool(too_loud)
    ok = not loud and not few

    def named(names: list[str]) -> str:
        shown = ", ".join(f"{n!r} {_pct(key(n))}" for n in names[:3])
        return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    if refuse:
        message = (
            f"too noisy to resolve {_pct(resolve)}: noise {named(too_loud)} above {_pct(resolve)} "
            f"(noise = IQR of round medians / median); run again on a quieter machine"
        )
    elif loud:
        message = f"noisy: noise {named(loud)} above {_pct(half)} (half the {_pct(resolve)} to resolve)"
    elif few:
        message = f"too few rounds (< {MIN_NOISE_ROUNDS}) to measure the noise of {named(few)}"
    else:
        message = f"quiet: worst noise {named(ranked[:1])} <= {_pct(half)} (half the {_pct(resolve)})"
    return NoiseVerdict(ok, refuse, noisy, worst, message, resolve)


def noise_verdict(timings: Mapping[str, ProbeTiming], resolve: float = RESOLVE) -> NoiseVerdict:
    """Is every probe quiet enough to resolve a relative effect of `resolve`? See
    `verdict_from_noise` for the thresholds (ok at most resolve/2, refuse above resolve)."""
    return verdict_from_noise(
        {n: t.noise for n, t in timings.items()}, {n: t.rounds for n, t in timings.items()}, resolve
    )
