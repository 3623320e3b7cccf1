"""`robonas bench agent-step`: the agent's control step against the bare interpreter, in one run.

Issue 18 asks for an agent step close to the invoke: on the same model, the control loop's step
p50 at most 1.5x the interpreter's bare `invoke` p50, measured in the same run on the same
machine. This module measures, with one `TFLitePolicy` (one interpreter, one process):

- `invoke`: the interpreter alone (the input written beforehand, outside the clocks);
- `bench_step`: quantise + invoke + dequantise through the policy's public pieces
  (`quantize_input`, `invoke`, `dequantize_output`), the span `robonas-agent bench` calls a step;
- `act`: `policy.act(obs, out=...)`, one call with its checks, in a tight loop;
- `loop_step`: the control loop's own per-step time, the `host_timings_ms` p50 that
  `device_agents.control_loop.run_episodes` reports (fast mode), on a robot: "null", an
  in-process robot whose step costs nothing (the loop with nothing else between two steps), or a
  sim twin spec such as "sim:cartpole-lab-a" (the simulator runs between two steps, as it does
  on an agent, and evicts the caches the step had warmed).

Drift on a shared or throttling computer would bias one span against another, so the spans are
measured in interleaved rounds (each round: invoke, bench step, act, loop), each round gives its
p50 per span, and the figure is the median of the round p50s. Ratios are over the invoke p50.
Only `device_agents` APIs that every version of the runtime has are used, so the same command
measures the code before and after a change. Timings come from `time.perf_counter_ns` (the
control loop's own clock) and percentiles from numpy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.control_loop import policy_settings, run_episodes
from device_agents.robots import Robot, make_robot
from device_agents.runtime import ModelSource, TFLitePolicy, runtime_name, runtime_version

TARGET_RATIO = 1.5  # issue 18: loop step p50 / invoke p50, same run
NULL_ROBOT = "null"
_POOL = 256  # distinct observations cycled through, made before any timing
_NULL_HZ = 50.0  # the null robot's rate; fast mode never sleeps, so it sets only the deadline


class NullRobot(Robot):
    """A robot whose step costs (almost) nothing: it hands back observations from a pool made
    beforehand, reward 0, and never ends an episode (the loop's `max_steps` does)."""

    name = NULL_ROBOT

    def __init__(self, observations: np.ndarray, action_size: int):
        self._pool = np.ascontiguousarray(observations, np.float32)
        self._rows = list(self._pool)  # row views, made once
        self._n, self._act = self._pool.shape[1], int(action_size)
        self._i = 0

    @property
    def observation_size(self) -> int:
        return self._n

    @property
    def action_size(self) -> int:
        return self._act

    @property
    def control_hz(self) -> float:
        return _NULL_HZ

    def reset(self, seed: int | None = None) -> np.ndarray:
        self._i = 0
        return self._rows[0]

    def step(self, action: np.ndarray, latency_s: float = 0.0) -> tuple[np.ndarray, float, bool]:
        self._i += 1
        return self._rows[self._i % len(self._rows)], 0.0, False


def _raw_observations(policy: TFLitePolicy, n: int, size: int, seed: int) -> np.ndarray:
    """`n` plausible raw observations of `size` values: normalised values drawn from a standard
    normal (clipped to +-3) and mapped back through the policy's `input_normalisation` if it has
    one, else values spread over the input quantisation's range (a bare int8 model) or the
    standard normal itself (a bare float model)."""
    rng = np.random.default_rng(seed)
    z = np.clip(rng.standard_normal((n, size)), -3.0, 3.0)
    norm = policy.input_normalisation
    if norm is not None:
        mean = np.asarray(norm["mean"], np.float64)[-size:]
        std = np.asarray(norm["std"], np.float64)[-size:]
        return (mean + std * z).astype(np.float32)
    scale, zero_point = policy.input_quantization
    if scale > 0:
        info = np.iinfo(policy.input_dtype)
        low, high = (info.min - zero_point) * scale, (info.max - zero_point) * scale
        return rng.uniform(low, high, size=(n, size)).astype(np.float32)
    return z.astype(np.float32)


def _p50_us(ns: np.ndarray) -> float:
    return float(np.median(ns)) / 1000.0


def _time_invoke(policy: TFLitePolicy, inputs: np.ndarray, n: int) -> np.ndarray:
    clock, out = time.perf_counter_ns, np.zeros(n, np.int64)
    for i in range(n):
        policy.quantize_input(inputs[i % _POOL])
        t0 = clock()
        policy.invoke()
        out[i] = clock() - t0
    return out


def _time_bench_step(policy: TFLitePolicy, inputs: np.ndarray, action: np.ndarray, n: int) -> np.ndarray:
    clock, out = time.perf_counter_ns, np.zeros(n, np.int64)
    for i in range(n):
        t0 = clock()
        policy.quantize_input(inputs[i % _POOL])
        policy.invoke()
        policy.dequantize_output(out=action)
        out[i] = clock() - t0
    return out


def _time_act(policy: TFLitePolicy, inputs: np.ndarray, action: np.ndarray, n: int) -> np.ndarray:
    clock, out = time.perf_counter_ns, np.zeros(n, np.int64)
    for i in range(n):
        obs = inputs[i % _POOL]
        t0 = clock()
        policy.act(obs, out=action)
        out[i] = clock() - t0
    return out


def bench_agent_step(
    model: ModelSource,
    steps: int = 5000,
    *,
    robot: str = NULL_ROBOT,
    history: int | None = None,
    rounds: int = 5,
    warmup: int = 500,
    threads: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure invoke, bench step, act and the control loop's step p50 (microseconds) on `model`
    (bytes, a `.tflite` path or an artifact directory), `steps` steps of each, in `rounds`
    interleaved rounds after `warmup` steps of each; the ratios over the invoke p50.

    `robot`: "null" (an in-process robot whose step costs nothing) or a robot spec
    ("sim:cartpole-lab-a"; fast mode). `history`: frames stacked per input; by default the
    artifact manifest's, else the model's input size over the robot's observation size (1 on
    the null robot).
    """
    for name, value, minimum in (("steps", steps, 1), ("rounds", rounds, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name}: {value!r} is not an integer >= {minimum}")
    policy = TFLitePolicy(model, threads=threads)
    settings = policy_settings(policy.manifest)
    size = int(policy.input.size)
    if history is None and policy.manifest is not None:
        history = int(settings["history"])
    act_size = int(policy.output.size)
    inputs = _raw_observations(policy, _POOL, size, seed)
    if robot == NULL_ROBOT:
        history = history or 1
        if size % history:
            raise ValueError(f"the model's input of {size} values is not {history} frames")
        bot: Robot = NullRobot(_raw_observations(policy, _POOL, size // history, seed + 1), act_size)
    else:
        bot = make_robot(robot, fast=True)
        history = history or max(1, size // bot.observation_size)
    if bot.observation_size * history != size:
        raise ValueError(
            f"robot {bot.name} observes {bot.observation_size} values x history {history}; "
            f"the model takes {size}"
        )
    action = np.zeros(act_size, np.float32)
    loop_kw: dict[str, Any] = {
        "history": history,
        "fast": True,
        "history_pad": settings["history_pad"],
        "action_output": settings["action_output"],
    }
    mean_length = 1.0  # of the robot's episodes, measured in the warm-up (a sim twin's end early)

    def loop_round(n: int) -> tuple[float, float, int]:
        """(host p50 us, robot-computer p50 us, steps) of one run of about `n` steps."""
        if robot == NULL_ROBOT:
            rep = run_episodes(policy, bot, 1, seed, max_steps=n, **loop_kw)
        else:  # episodes end when the robot says so: as many as `n` steps need, from the mean
            episodes = max(1, math.ceil(n / max(1.0, mean_length)))
            rep = run_episodes(policy, bot, episodes, seed, max_steps=n, **loop_kw)
        return rep["host_timings_ms"]["p50"] * 1e3, rep["timings_ms"]["p50"] * 1e3, int(rep["steps"])

    try:
        # warm-up: every span, and the robot's episode length for the sim twin
        if warmup:
            _time_invoke(policy, inputs, warmup)
            _time_bench_step(policy, inputs, action, warmup)
            _time_act(policy, inputs, action, warmup)
            if robot != NULL_ROBOT:
                rep = run_episodes(policy, bot, 5, seed, max_steps=warmup, **loop_kw)
                mean_length = max(1.0, float(np.mean(rep["lengths"])))
            loop_round(warmup)
        per_round = max(1, steps // rounds)
        spans: dict[str, list[float]] = {k: [] for k in ("invoke", "bench_step", "act", "loop_step")}
        robot_p50: list[float] = []
        loop_steps = 0
        for _ in range(rounds):
            spans["invoke"].append(_p50_us(_time_invoke(policy, inputs, per_round)))
            spans["bench_step"].append(_p50_us(_time_bench_step(policy, inputs, action, per_round)))
            spans["act"].append(_p50_us(_time_act(policy, inputs, action, per_round)))
            host, own, n = loop_round(per_round)
            spans["loop_step"].append(host)
            robot_p50.append(own)
            loop_steps += n
    finally:
        bot.close()
    p50 = {k: float(np.median(v)) for k, v in spans.items()}
    invoke = p50["invoke"]
    ratios = {k: (v / invoke if invoke > 0 else None) for k, v in p50.items() if k != "invoke"}
    return {
        "model": policy.source if not isinstance(model, (str, Path)) else str(model),
        "runtime": runtime_name(),
        "runtime_version": runtime_version(),
        "numpy": np.__version__,
        "threads": threads,
        "input_shape": list(policy.input_shape),
        "input_dtype": policy.input_dtype.name,
        "output_dtype": policy.output_dtype.name,
        "normalised": policy.input_normalisation is not None,
        "macs": policy.macs,
        "robot": bot.name,
        "history": history,
        "steps_per_round": per_round,
        "rounds": rounds,
        "loop_steps": loop_steps,
        "p50_us": p50,
        "round_p50_us": spans,
        "loop_robot_p50_us": float(np.median(robot_p50)),
        "ratios": ratios,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratios["loop_step"] is not None and ratios["loop_step"] <= TARGET_RATIO,
    }


def format_agent_step(result: dict[str, Any]) -> str:
    """A few lines for a terminal: the p50 of each span and its ratio over the invoke."""
    p50, ratios = result["p50_us"], result["ratios"]
    lines = [
        f"{result['model']}: {result['input_dtype']} input {result['input_shape']}, "
        f"{result['macs']} MACs, {result['runtime']} {result['runtime_version']}, numpy {result['numpy']}",
        f"robot {result['robot']}, history {result['history']}, "
        f"{result['rounds']} rounds x {result['steps_per_round']} steps (median of round p50s)",
        f"  {'invoke':<11} p50 {p50['invoke']:8.2f} us",
    ]
    for key, label in (("bench_step", "bench step"), ("act", "act"), ("loop_step", "loop step")):
        ratio = ratios[key]
        lines.append(
            f"  {label:<11} p50 {p50[key]:8.2f} us  {'-' if ratio is None else f'{ratio:.2f}x'} invoke"
        )
    verdict = "meets" if result["meets_target"] else "misses"
    lines.append(f"loop step / invoke {verdict} the target of {result['target_ratio']}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m robonas.bench.agent_step MODEL... [--robot null|sim:PROFILE] [--json]`."""
    parser = argparse.ArgumentParser(
        prog="python -m robonas.bench.agent_step", description=__doc__.split("\n")[0]
    )
    parser.add_argument("models", nargs="+", help="a .tflite file or an artifact directory")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--robot", default=NULL_ROBOT, help='"null" or a robot spec, e.g. sim:cartpole-lab-a')
    parser.add_argument("--history", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = []
    for model in args.models:
        result = bench_agent_step(
            model, args.steps, robot=args.robot, history=args.history, rounds=args.rounds, warmup=args.warmup
        )
        results.append(result)
        if not args.json:
            print(format_agent_step(result), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
