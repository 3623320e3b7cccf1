"""Benchmark a policy `.tflite` on this machine, in the manner of LiteRT's `benchmark_model`.

Reports what `benchmark_model` reports (initialisation time, first inference, warm-up average,
then latency percentiles over the measured runs) for two spans: the interpreter's `invoke` alone
and the whole control step (quantise the observation + invoke + dequantise the action), which is
what the control loop pays. Times come from `time.perf_counter_ns`; percentiles from numpy.
Inputs are random but seeded, drawn from the range the model's input quantisation can represent
(or a standard normal clipped to +-3 for a float model: normalised observations).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.errors import DeviceError
from device_agents.runtime import ModelSource, TFLitePolicy, runtime_name, runtime_version

PERCENTILES = (50, 90, 99)
_INPUT_POOL = 256  # distinct observations cycled through, generated before timing starts


def _summary_us(ns: np.ndarray) -> dict[str, float]:
    us = ns.astype(np.float64) / 1000.0
    out = {f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(us, PERCENTILES))}
    out.update(min=float(us.min()), mean=float(us.mean()), max=float(us.max()))
    return out


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


def bench_model(
    model: ModelSource, runs: int = 1000, warmup: int = 50, threads: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Time `runs` steps after `warmup` steps; latencies in microseconds."""
    for name, value, minimum in (("runs", runs, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise DeviceError(f"{name}: {value!r} is not an integer >= {minimum}")
    t0 = time.perf_counter_ns()
    policy = TFLitePolicy(model, threads=threads)
    init_ns = time.perf_counter_ns() - t0

    inputs = sample_inputs(policy, _INPUT_POOL, seed)
    action = np.zeros(int(np.prod(policy.output_shape)), np.float32)
    invoke_ns = np.zeros(runs, np.int64)
    step_ns = np.zeros(runs, np.int64)
    clock = time.perf_counter_ns

    warm_ns = np.zeros(max(warmup, 1), np.int64)
    for i in range(max(warmup, 1)):  # the first inference is timed even with warmup=0
        t0 = clock()
        policy.act(inputs[i % _INPUT_POOL], out=action)
        warm_ns[i] = clock() - t0
    first_ns = int(warm_ns[0])

    for i in range(runs):
        t0 = clock()
        policy.quantize_input(inputs[i % _INPUT_POOL])
        t1 = clock()
        policy.invoke()
        t2 = clock()
        policy.dequantize_output(out=action)
        t3 = clock()
        invoke_ns[i] = t2 - t1
        step_ns[i] = t3 - t0

    return {
        "model": policy.source if not isinstance(model, (str, Path)) else str(model),
        "model_bytes": policy.model_size,
        "runtime": runtime_name(),
        "runtime_version": runtime_version(),
        "threads": threads,
        "runs": runs,
        "warmup": warmup,
        "input_shape": list(policy.input_shape),
        "input_dtype": policy.input_dtype.name,
        "input_quantization": list(policy.input_quantization),
        "output_shape": list(policy.output_shape),
        "output_dtype": policy.output_dtype.name,
        "output_quantization": list(policy.output_quantization),
        "macs": policy.macs,
        "init_us": init_ns / 1000.0,
        "first_us": first_ns / 1000.0,
        "warmup_mean_us": float(warm_ns.mean()) / 1000.0,
        "invoke_us": _summary_us(invoke_ns),
        "step_us": _summary_us(step_ns),
    }
