"""The latency measurement protocol (device_agents.timing) on synthetic timers.

A synthetic machine counts every step taken on it, whichever probe takes it, so a slowdown that
depends on that count (a drift, a throttling step, a warm-up) hits whatever runs at that moment,
as a real computer's would. Probe durations are the probe's true cost times the machine's
slowdown, a 2% per-step jitter, and (where stated) 2% outliers of 20x.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from device_agents.errors import DeviceError
from device_agents.timing import (
    ProbeTiming,
    measure,
    measure_raw,
    noise_verdict,
    summarize,
    verdict_from_noise,
)

COSTS_NS = {"a": 12_000, "b": 15_000, "c": 21_000, "d": 30_000, "e": 45_000, "f": 80_000}
ROUNDS, PER_ROUND = 15, 40
# What the protocol and the baseline are held to: the +-5% is half the +-10% a calibration is
# judged by, so a measurement error inside it leaves the fit most of its budget.
TOLERANCE = 0.05


class Machine:
    """A computer whose speed is `slow(t)` at its t-th step (1.0 = nominal)."""

    def __init__(
        self,
        slow: Callable[[int], float] = lambda t: 1.0,
        jitter: float = 0.02,
        outliers: float = 0.0,
        outlier_x: float = 20.0,
        seed: int = 1,
    ):
        self.t = 0
        self.slow = slow
        self.rng = np.random.default_rng(seed)
        self.jitter, self.outliers, self.outlier_x = jitter, outliers, outlier_x
        self.factors: list[float] = []  # the slowdown of every step, in order

    def probe(self, cost_ns: float, own: Callable[[int], float] | None = None) -> Callable[[], int]:
        """A probe of true cost `cost_ns`; `own(i)` is an extra slowdown at the probe's i-th step
        (a warm-up of that probe alone)."""
        count = [0]

        def step() -> int:
            f = self.slow(self.t) * (own(count[0]) if own else 1.0)
            self.factors.append(f)
            self.t += 1
            count[0] += 1
            d = cost_ns * f * math.exp(self.jitter * self.rng.standard_normal())
            if self.rng.random() < self.outliers:
                d *= self.outlier_x
            return round(d)

        return step


def _sequential(machine: Machine, warmup: int, steps: int, statistic=np.mean) -> dict[str, float]:
    """The plain way: each probe in turn, a fixed warm-up, then the mean of its steps (us)."""
    out = {}
    for name, cost in COSTS_NS.items():
        step = machine.probe(cost)
        for _ in range(warmup):
            step()
        out[name] = float(statistic([step() for _ in range(steps)])) / 1000.0
    return out


def _errors(estimates: dict[str, float], truth: dict[str, float]) -> tuple[float, float]:
    """(worst relative error of the estimates, worst relative error of their ratios to probe a)."""
    absolute = max(abs(estimates[n] / truth[n] - 1) for n in truth)
    ratios = max(abs((estimates[n] / estimates["a"]) / (truth[n] / truth["a"]) - 1) for n in truth)
    return absolute, ratios


# Both runs last about this many steps: 6 probes x (warm-up + 600 measured).
RUN = len(COSTS_NS) * (ROUNDS * PER_ROUND + 60)

DRIFTS = {
    # the machine slows steadily, 60% over the run (thermal throttling, a neighbour ramping up)
    "linear +60%": lambda t: 1.0 + 0.6 * min(t / RUN, 1.0),
    # the clock drops to 1/1.6 for the last 30% of the run and stays there
    "throttling step": lambda t: 1.6 if t > 0.7 * RUN else 1.0,
}


@pytest.mark.parametrize("drift", list(DRIFTS))
def test_protocol_recovers_costs_and_ratios_where_sequential_means_do_not(drift: str) -> None:
    """Under drift plus 2% outliers of 20x, the protocol's estimates (medians of round medians
    over interleaved rounds) are within 5% of the truth, and so are the ratios between probes
    (what a latency fit learns); the plain means of probes timed one after the other are not.

    The truth is each probe's cost at the machine's typical speed during the measurement (the
    median slowdown over the measured steps): a drift leaves no other absolute truth to find.
    Under the throttling step that is the nominal speed (the throttle covers a minority of the
    rounds); under the linear drift, the speed at mid-run. Both methods are judged against the
    same truth, and the ratios need none."""
    machine = Machine(DRIFTS[drift], outliers=0.02)
    probes = {name: machine.probe(cost) for name, cost in COSTS_NS.items()}
    timings = measure(probes, rounds=ROUNDS, per_round=PER_ROUND)
    warm = sum(t.warmup_steps for t in timings.values())
    typical = float(np.median(machine.factors[warm:]))
    truth = {name: cost * typical / 1000.0 for name, cost in COSTS_NS.items()}
    protocol_abs, protocol_ratio = _errors({n: t.median_us for n, t in timings.items()}, truth)
    assert protocol_abs <= TOLERANCE, (drift, protocol_abs)
    assert protocol_ratio <= TOLERANCE, (drift, protocol_ratio)

    plain = Machine(DRIFTS[drift], outliers=0.02)
    means = _sequential(plain, warmup=50, steps=ROUNDS * PER_ROUND)
    plain_truth = {name: cost * float(np.median(plain.factors)) / 1000.0 for name, cost in COSTS_NS.items()}
    plain_abs, plain_ratio = _errors(means, plain_truth)
    assert plain_abs > TOLERANCE, (drift, plain_abs)
    assert plain_ratio > TOLERANCE, (drift, plain_ratio)
    # robust statistics alone do not save the ratios: sequential medians still carry the drift
    again = Machine(DRIFTS[drift], outliers=0.02)
    medians = _sequential(again, warmup=50, steps=ROUNDS * PER_ROUND, statistic=np.median)
    assert _errors(medians, truth)[1] > TOLERANCE, drift


def test_interleaved_rounds_shuffle_the_order_reproducibly() -> None:
    def run(seed: int) -> list[list[str]]:
        machine = Machine()
        raw = measure_raw(
            {n: machine.probe(c) for n, c in COSTS_NS.items()}, rounds=10, per_round=5, seed=seed
        )
        assert all(sorted(order) == sorted(COSTS_NS) for order in raw.order)
        assert all(len(rows) == 10 and all(len(r) == 5 for r in rows) for rows in raw.rounds_ns.values())
        return raw.order

    orders = run(0)
    assert len({tuple(o) for o in orders}) > 1  # shuffled per round, not one fixed order
    assert run(0) == orders
    assert run(1) != orders


# --- warm-up ----------------------------------------------------------------------------------
N_WARM = 600


@pytest.mark.parametrize(
    "shape, slow_until",
    [
        # 3x falling linearly to 1x at step N_WARM
        ("linear", lambda i: 3.0 - 2.0 * i / N_WARM if i < N_WARM else 1.0),
        # 3x decaying exponentially: within the 5% tolerance after tau ln 40 = 553 steps
        ("exponential", lambda i: 1.0 + 2.0 * math.exp(-i / 150.0)),
    ],
)
def test_warmup_lasts_until_the_timings_settle(shape: str, slow_until: Callable[[int], float]) -> None:
    """Each probe starts 3x slow and reaches its speed after N steps of its own (N = N_WARM for
    the linear fall, the step where the excess falls under the 5% tolerance for the exponential):
    the warm-up is at least N steps, it is reported settled, and the estimate is the settled
    cost. The decay is slow enough that consecutive batches of 20 differ by under 5% most of the
    way (the 3-batch window alone would stop early); the window over the warm-up's second half
    does not."""
    settle_at = N_WARM if shape == "linear" else math.ceil(150.0 * math.log(2.0 / 0.05))
    machine = Machine(outliers=0.02)
    probes = {n: machine.probe(c, own=slow_until) for n, c in list(COSTS_NS.items())[:3]}
    timings = measure(probes, rounds=ROUNDS, per_round=PER_ROUND)
    for name, t in timings.items():
        assert t.settled, name
        assert t.warmup_steps >= settle_at, (name, t.warmup_steps)
        assert t.warmup_steps < 4 * settle_at, (name, t.warmup_steps)  # detected, not run to the cap
        assert abs(t.median_us / (COSTS_NS[name] / 1000.0) - 1) <= TOLERANCE, name


def test_quiet_probes_settle_after_the_first_batches() -> None:
    machine = Machine()
    timings = measure({n: machine.probe(c) for n, c in COSTS_NS.items()})
    assert {t.warmup_steps for t in timings.values()} == {60}  # 3 batches of 20
    assert all(t.settled for t in timings.values())
    assert {t.warmup_steps for t in measure({"a": Machine().probe(1000)}, min_warmup=250).values()} == {260}


def test_a_probe_that_never_settles_spends_max_warmup() -> None:
    """One probe slows without end (1% more every 3 steps): it is reported unsettled after exactly
    max_warmup steps (not a multiple of the batch); a quiet probe beside it warmed as long, and
    settled."""
    machine = Machine()
    drifting = machine.probe(10_000, own=lambda i: 1.0 + i / 300.0)
    probes = {"drifting": drifting, "quiet": machine.probe(10_000)}
    timings = measure(probes, max_warmup=1010, rounds=5, per_round=10)
    assert timings["drifting"].warmup_steps == 1010 and not timings["drifting"].settled
    assert timings["quiet"].warmup_steps == 1010 and timings["quiet"].settled
    assert measure({"q": Machine().probe(1000)}, max_warmup=0)["q"].warmup_steps == 0


# --- statistics -------------------------------------------------------------------------------
def test_p99_is_the_typical_rounds_tail_and_the_summary_is_ordered() -> None:
    """One round spent behind a busy neighbour (every step 100x) owns the pooled p99; the median
    of the per-round p99s is the tail of a typical round. Under a two-level drift the pooled p90
    lies above the typical round's p99, yet the summary stays ordered."""
    rng = np.random.default_rng(0)
    rows = [list(10_000 * np.exp(0.02 * rng.standard_normal(40))) for _ in range(15)]
    rows[7] = [1_000_000] * 40
    t = summarize(rows)
    assert t.pooled_p99_us == pytest.approx(1000.0)
    assert 10.0 < t.p99_us < 11.5
    assert t.max_us == pytest.approx(1000.0)

    two_level = [[10_000] * 40] * 8 + [[16_000] * 40] * 7
    t = summarize(two_level)
    assert t.p90_us == pytest.approx(16.0) and t.p99_us == pytest.approx(10.0)
    s = t.to_dict()
    assert s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"], s
    assert s["p50"] == t.median_us == 10.0 and t.p50_us == pytest.approx(10.0)


def test_noise_is_the_iqr_of_the_round_medians() -> None:
    rows = [[m] * 5 for m in (90, 95, 100, 100, 100, 105, 110, 300, 100)]
    t = summarize(rows, warmup_steps=7, settled=False)
    medians = np.array([90, 95, 100, 100, 100, 105, 110, 300, 100]) / 1000.0
    q25, q75 = np.percentile(medians, [25, 75])
    assert t.median_us == pytest.approx(0.1) and t.spread_us == pytest.approx(q75 - q25)
    assert t.noise == pytest.approx((q75 - q25) / 0.1)
    assert (t.rounds, t.steps, t.warmup_steps, t.settled) == (9, 45, 7, False)
    assert t.round_medians_us == pytest.approx(list(medians))
    assert t.as_json()["round_medians_us"] == t.round_medians_us


# --- the verdict ------------------------------------------------------------------------------
def _timings(machine: Machine, **kw) -> dict[str, ProbeTiming]:
    return measure({n: machine.probe(c) for n, c in list(COSTS_NS.items())[:4]}, max_warmup=400, **kw)


_BUSY = np.random.default_rng(7).random(10_000) < 0.5  # which stretches of 40 steps are busy


def _neighbour(t: int) -> float:
    """A neighbour busy in random stretches of 40 steps: 1.5x slower in about half of them."""
    return 1.5 if _BUSY[(t // 40) % _BUSY.size] else 1.0


@pytest.mark.parametrize(
    "machine",
    [Machine(jitter=1.0), Machine(slow=_neighbour)],
    ids=["lognormal sigma 1", "bursty neighbour"],
)
def test_noise_verdict_refuses_a_noisy_timer(machine: Machine) -> None:
    v = noise_verdict(_timings(machine))
    assert v.refuse and not v.ok
    assert v.worst > 0.10 and v.noisy
    assert "too noisy" in v.message and repr(v.noisy[0]) in v.message


def test_noise_verdict_is_ok_on_a_quiet_timer_even_with_outliers() -> None:
    v = noise_verdict(_timings(Machine(jitter=0.01, outliers=0.02)))
    assert v.ok and not v.refuse and v.noisy == []
    assert v.worst < 0.05 and v.message.startswith("quiet")


def test_noise_verdict_bands() -> None:
    warn = verdict_from_noise({"a": 0.07, "b": 0.01, "c": 0.06})
    assert not warn.ok and not warn.refuse and warn.noisy == ["a", "c"] and warn.worst == 0.07
    assert "'a' 7.0%" in warn.message
    refuse = verdict_from_noise({"a": 0.07, "b": 0.12}, resolve=0.10)
    assert refuse.refuse and refuse.noisy == ["b", "a"] and "'b' 12.0%" in refuse.message
    assert verdict_from_noise({"a": 0.07}, resolve=0.20).ok  # a coarser effect tolerates more
    few = verdict_from_noise({"a": 0.0}, rounds={"a": 2})
    assert not few.ok and not few.refuse and few.noisy == ["a"] and "too few rounds" in few.message
    assert verdict_from_noise({"a": math.nan}).refuse  # unknown noise is never trusted
    assert verdict_from_noise({"a": 0.04}).to_dict() == {
        "ok": True,
        "refuse": False,
        "noisy": [],
        "worst": 0.04,
        "message": verdict_from_noise({"a": 0.04}).message,
        "resolve": 0.10,
    }


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"rounds": 0}, "rounds: 0"),
        ({"per_round": -1}, "per_round: -1"),
        ({"max_warmup": 1.5}, "max_warmup: 1.5"),
        ({"settle_tol": 0}, "settle_tol: 0"),
    ],
)
def test_bad_arguments_name_the_value(kw: dict, match: str) -> None:
    with pytest.raises(DeviceError, match=match):
        measure({"a": Machine().probe(1000)}, **kw)
    with pytest.raises(DeviceError, match="no probes"):
        measure({})


def test_the_drift_every_probe_shares_is_not_counted_as_their_noise():
    """Rounds whose machine speed jumps by up to 2x hit every interleaved probe alike: the
    probes' ratios (what a latency fit learns) do not move, so their noise is small, while the
    raw spread of round medians is large; a probe that jitters on its own stays noisy."""
    from device_agents.timing import common_mode_noise

    rng = np.random.default_rng(3)
    speeds = rng.uniform(1.0, 2.0, size=15)  # per round: a neighbour comes and goes
    costs = {"a": 10_000, "b": 20_000, "c": 40_000, "d": 80_000}
    rows = {
        n: [[int(c * s * rng.uniform(0.99, 1.01)) for _ in range(40)] for s in speeds]
        for n, c in costs.items()
    }
    own = rng.uniform(0.7, 1.3, size=15)  # this probe's own, unshared jitter
    rows["jittery"] = [[int(30_000 * s * j) for _ in range(40)] for s, j in zip(speeds, own, strict=True)]
    noise, drift = common_mode_noise(rows)
    plain, _ = common_mode_noise({"a": rows["a"]})  # one probe alone: the plain figure
    assert plain["a"] > 0.2 and drift > 0.2
    assert all(noise[n] < 0.02 for n in costs), noise
    assert noise["jittery"] > 0.1
