"""Benchmark policy `.tflite` models on this machine, in the manner of LiteRT's `benchmark_model`.

Reports what `benchmark_model` reports (initialisation time, first inference, warm-up average,
then latency percentiles over the measured runs) for two spans: the interpreter's `invoke` alone
and the whole control step (quantise the observation + invoke + dequantise the action), which is
what the control loop pays. Both spans are timed inside the same steps with
`time.perf_counter_ns`.

The steps are taken by the measurement protocol of `device_agents.timing`: a warm-up that lasts
until the timings settle, interleaved rounds (several models benchmarked together share every
drift of the machine alike), medians of round medians, and a noise figure with a verdict on
whether the figures can resolve the +-10% a latency calibration is judged by. `bench_model`
times one model (the agent's BENCH, `robonas-agent bench FILE`); `bench_models` times several
interleaved (`robonas-agent bench FILE FILE ...`).

Inputs are random but seeded, drawn from the range the model's input quantisation can represent
(or a standard normal clipped to +-3 for a float model: normalised observations).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np

from device_agents.errors import DeviceError
from device_agents.runtime import ModelSource, TFLitePolicy, runtime_name, runtime_version
from device_agents.timing import (
    RESOLVE,
    common_mode_noise,
    measure_raw,
    noise_verdict,
    summarize,
    verdict_from_noise,
)

_INPUT_POOL = 256  # distinct observations cycled through, generated before timing starts
ROUNDS, PER_ROUND = 15, 40  # the protocol's defaults: 600 measured steps
MAX_WARMUP = 4000


def sample_inputs(policy: TFLitePolicy, n: int, seed: int = 0) -> np.ndarray:
    """`n` plausible float observations for `policy`, shape (n, input_size), float32."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(policy.input_shape))
    if policy.input.quantized:
        info = np.iinfo(policy.input_dtype)
        scale, zero_point = policy.input_quantization
        low, high = (info.min - zero_point) * scale, (info.max - zero_point) * scale
        return rng.uniform(low, high, size=(n, size)).astype(np.float32)
    return np.clip(rng.standard_normal((n, size)), -3.0, 3.0).astype(np.float32)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DeviceError(f"{name}: {value!r} is not an integer >= {minimum}")
    return value


def split_runs(runs: int, rounds: int | None = None, per_round: int | None = None) -> tuple[int, int]:
    """(rounds, per_round) for `runs` measured steps, exactly when it can be done well.

    Either may be fixed (the other then covers `runs`, over by less than a round). By default:
    rounds of up to 40 steps and at least 15 rounds (fewer if runs < 15), so the spread of the
    round medians means something; among up to twice that many rounds, the fewest whose steps
    make exactly `runs`, else rounds x per_round just over `runs` (by less than a round).
    `split_runs(1000)` is (25, 40), `split_runs(300)` (15, 20), `split_runs(200)` (20, 10).
    """
    _check_int("runs", runs, 1)
    if rounds is not None and per_round is not None:
        return _check_int("rounds", rounds, 1), _check_int("per_round", per_round, 1)
    if rounds is not None:
        return _check_int("rounds", rounds, 1), math.ceil(runs / rounds)
    if per_round is not None:
        return math.ceil(runs / _check_int("per_round", per_round, 1)), per_round
    least = max(math.ceil(runs / PER_ROUND), min(ROUNDS, runs))
    for n in range(least, min(2 * least, runs) + 1):
        if runs % n == 0:
            return n, runs // n
    per = runs // least  # rounding down keeps `least` rounds or more
    return math.ceil(runs / per), per


class _Loaded:
    """One model ready to time: the policy, its input pool, and the probe that steps it."""

    def __init__(self, model: ModelSource, threads: int, seed: int):
        t0 = time.perf_counter_ns()
        self.policy = TFLitePolicy(model, threads=threads)
        self.init_ns = time.perf_counter_ns() - t0
        self.label = self.policy.source if not isinstance(model, (str, Path)) else str(model)
        self.invoke_ns: list[int] = []
        inputs = list(sample_inputs(self.policy, _INPUT_POOL, seed))
        self.probe = self._probe(inputs)

    def _probe(self, inputs: list[np.ndarray]) -> Callable[[], int]:
        """One control step; returns its duration in ns and records the invoke's inside it."""
        clock = time.perf_counter_ns
        policy = self.policy
        quantize, invoke, dequantize = policy.quantize_input, policy.invoke, policy.dequantize_output
        action = np.zeros(int(np.prod(policy.output_shape)), np.float32)
        record = self.invoke_ns.append
        observations = itertools.cycle(inputs)

        def step() -> int:
            obs = next(observations)
            t0 = clock()
            quantize(obs)
            t1 = clock()
            invoke()
            t2 = clock()
            dequantize(out=action)
            t3 = clock()
            record(t2 - t1)
            return t3 - t0

        return step

    def result(
        self,
        warm_ns: list[int],
        rounds_ns: list[list[int]],
        settled: bool,
        warmup: int,
        resolve: float,
        shared: tuple[float, float] | None = None,
    ) -> dict[str, Any]:
        """`shared`: (this model's noise once the drift shared with the others is removed, that
        drift), for models measured together (`timing.common_mode_noise`)."""
        policy = self.policy
        step = summarize(rounds_ns, len(warm_ns), settled)
        raw_noise = step.noise
        if shared is not None:
            step.noise, step.drift = shared
        step.raw_noise = raw_noise
        # the invoke of every step was recorded in step order: warm-up first, then the rounds
        measured = np.asarray(self.invoke_ns[len(warm_ns) :], np.int64).reshape(step.rounds, -1)
        invoke = summarize(measured, len(warm_ns), settled)
        verdict = noise_verdict({self.label: step}, resolve)
        return {
            "model": self.label,
            "model_bytes": policy.model_size,
            "runtime": runtime_name(),
            "runtime_version": runtime_version(),
            "threads": policy.threads,
            "runs": step.steps,
            "rounds": step.rounds,
            "per_round": step.steps // step.rounds,
            "warmup": warmup,
            "warmup_steps": step.warmup_steps,
            "settled": step.settled,
            "input_shape": list(policy.input_shape),
            "input_dtype": policy.input_dtype.name,
            "input_quantization": list(policy.input_quantization),
            "output_shape": list(policy.output_shape),
            "output_dtype": policy.output_dtype.name,
            "output_quantization": list(policy.output_quantization),
            "macs": policy.macs,
            "init_us": self.init_ns / 1000.0,
            "first_us": warm_ns[0] / 1000.0,
            "warmup_mean_us": float(np.mean(warm_ns)) / 1000.0,
            "invoke_us": invoke.to_dict(),
            "step_us": step.to_dict(),
            "median_us": step.median_us,  # = step_us p50: the estimate a latency fit learns from
            "spread_us": step.spread_us,
            "noise": step.noise,
            "raw_noise": step.raw_noise,
            "drift": step.drift,
            "invoke_noise": invoke.noise,
            "step_pooled_us": {"p50": step.p50_us, "p90": step.p90_us, "p99": step.pooled_p99_us},
            "noise_verdict": verdict.to_dict(),
        }


def _bench(
    models: Mapping[str, ModelSource],
    rounds: int,
    per_round: int,
    threads: int,
    seed: int,
    warmup: int,
    max_warmup: int,
    resolve: float,
) -> dict[str, dict[str, Any]]:
    _check_int("warmup", warmup, 0)
    _check_int("max_warmup", max_warmup, 0)
    if not models:
        raise DeviceError("bench: no models given")
    loaded = {name: _Loaded(model, threads, seed) for name, model in models.items()}
    raw = measure_raw(
        {name: m.probe for name, m in loaded.items()},
        rounds=rounds,
        per_round=per_round,
        min_warmup=max(warmup, 1),  # the first inference is always a (timed) warm-up step
        max_warmup=max(max_warmup, warmup, 1),
        seed=seed,
    )
    noise, drift = common_mode_noise(raw.rounds_ns)
    return {
        name: m.result(
            raw.warmup_ns[name], raw.rounds_ns[name], raw.settled[name], warmup, resolve, (noise[name], drift)
        )
        for name, m in loaded.items()
    }


def bench_model(
    model: ModelSource,
    runs: int = 1000,
    warmup: int = 50,
    threads: int = 1,
    seed: int = 0,
    *,
    max_warmup: int = MAX_WARMUP,
    resolve: float = RESOLVE,
) -> dict[str, Any]:
    """Time about `runs` control steps of one model with the protocol; latencies in us.

    `runs` measured steps are split into rounds (`split_runs`: 25 rounds of 40 for 1000);
    `warmup` is the least number of warm-up steps, which go on until the timings settle, up to
    `max_warmup`. `step_us` and `invoke_us` are {p50, p90, p99, min, mean, max}, p50 being the
    median of the round medians (see `ProbeTiming.to_dict`); `noise` is the step's relative
    spread of round medians and `noise_verdict` says whether it can resolve `resolve`.
    """
    rounds, per_round = split_runs(runs)
    return _bench({"model": model}, rounds, per_round, threads, seed, warmup, max_warmup, resolve)["model"]


def bench_models(
    models: Mapping[str, ModelSource],
    rounds: int = ROUNDS,
    per_round: int = PER_ROUND,
    threads: int = 1,
    seed: int = 0,
    max_warmup: int = MAX_WARMUP,
    *,
    warmup: int = 0,
    resolve: float = RESOLVE,
) -> dict[str, dict[str, Any]]:
    """Load every model, then time them interleaved: name -> the same keys as `bench_model`'s
    result (each with its own `noise_verdict`; `overall_verdict` gives the one for all)."""
    return _bench(models, rounds, per_round, threads, seed, warmup, max_warmup, resolve)


def overall_verdict(results: Mapping[str, Mapping[str, Any]], resolve: float = RESOLVE) -> dict[str, Any]:
    """The noise verdict over several bench results (name -> a `bench_model`-style result):
    {ok, refuse, noisy, worst, message, resolve}, as `device_agents.timing.noise_verdict`."""
    noise = {name: float(r["noise"]) for name, r in results.items()}
    rounds = {name: int(r["rounds"]) for name, r in results.items()}
    return verdict_from_noise(noise, rounds, resolve).to_dict()
