"""The fixed-rate control loop: observation -> history stack -> policy -> action -> robot.

Standard library clocks and numpy only. Ticks are scheduled on `time.monotonic()` and the loop
sleeps until the next one (it never spins); inference is timed with `time.perf_counter_ns`.
The robot turns that measurement into its own computer's step time (`Robot.compute_time`: the
identity on a physical robot, which runs the agent itself; an emulated slower computer on a sim
twin); that is the latency the robot is handed, the `timings_ms` reported and what deadlines are
judged on, while `host_timings_ms` keeps the raw measurement on the machine running the agent.
An action whose step took longer than one period is a deadline miss. In `fast` mode the
sleeps are skipped (a simulated robot then runs faster than real time) but the measured
inference time is still handed to the robot as latency, so returns stay honest.

History: frames are stacked oldest first; after a reset the stack is filled with the manifest's
`observation.history_pad` (the raw value that normalises to SB3's zero padding; zeros if the
manifest has none), then the first observation is pushed, exactly as `robonas.export.trial_export.rollouts`.
A non-finite action is counted and replaced by zeros before it reaches the robot.

Recording (`record=True`): every back end goes through this loop, so a sim twin and a physical
robot behind the serial back end give the same record (`device_agents.trajectory.Episode`): the
observations, the actions as `Robot.step` received them, the rewards, the robot's clock and the
latency handed to the robot, bounded by a `Recorder`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from device_agents.errors import DeviceError
from device_agents.robots.base import Robot
from device_agents.trajectory import Recorder

PERCENTILES = (50, 90, 99)


def policy_settings(manifest: dict | None) -> dict[str, Any]:
    """The manifest fields the loop needs: control_hz, history, history_pad, action output."""
    m = manifest or {}
    obs_raw, act_raw = m.get("observation"), m.get("action")
    obs: dict[str, Any] = obs_raw if isinstance(obs_raw, dict) else {}
    act: dict[str, Any] = act_raw if isinstance(act_raw, dict) else {}
    history = m.get("history", obs.get("history", 1))
    hz = m.get("control_hz")
    return {
        "control_hz": float(hz) if isinstance(hz, (int, float)) and hz > 0 else None,
        "history": int(history) if isinstance(history, int) and history >= 1 else 1,
        "history_pad": obs.get("history_pad"),
        "action_output": act.get("output", "value"),
    }


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DeviceError(f"{name}: {value!r} is not an integer >= {minimum}")
    return value


def _timings_ms(ns: Sequence[int]) -> dict[str, float]:
    if not ns:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    ms = np.asarray(ns, np.float64) / 1e6
    out = {f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(ms, PERCENTILES))}
    out.update(max=float(ms.max()), mean=float(ms.mean()))
    return out


def _runtime(policy: Any) -> tuple[str, str]:
    name = getattr(policy, "runtime_name", None)
    if isinstance(name, str):
        return name, str(getattr(policy, "runtime_version", "unknown"))
    from device_agents.runtime import runtime_name, runtime_version

    try:
        return runtime_name(), runtime_version()
    except DeviceError:
        return "none", "unknown"


def run_episodes(
    policy: Any,
    robot: Robot,
    episodes: int,
    seed: int,
    max_steps: int | None = None,
    history: int = 1,
    fast: bool = False,
    *,
    control_hz: float | None = None,
    history_pad: Sequence[float] | None = None,
    action_output: str = "value",
    slot: str | None = None,
    sha256: str | None = None,
    record: bool = False,
    recorder: Recorder | None = None,
) -> dict[str, Any]:
    """Run `episodes` episodes (seeds seed, seed+1, ...) and report returns and timings.

    `policy.act(obs) -> action` (a TFLitePolicy or anything alike); `control_hz` defaults to the
    robot's rate; `max_steps=None` runs until the robot reports done.

    `record=True` records every step (device_agents.trajectory) in a fresh `Recorder` (the last
    5 episodes, 2 MiB) and adds `"record": encode(...)` to the report; passing a `recorder`
    fills that one instead (its own caps, its earlier episodes kept) and implies `record`.
    """
    _positive_int("episodes", episodes, 0)
    _positive_int("history", history)
    if max_steps is not None:
        _positive_int("max_steps", max_steps)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DeviceError(f"seed: {seed!r} is not an integer")
    if action_output not in ("value", "index"):
        raise DeviceError(f"action_output {action_output!r} is not one of value, index")
    hz = float(control_hz or robot.control_hz)
    if not (math.isfinite(hz) and hz > 0):
        raise DeviceError(f"control_hz {hz!r} is not a positive rate")
    period = 1.0 / hz
    period_ns = int(period * 1e9)
    obs_dim = robot.observation_size
    pad = (
        np.zeros(obs_dim, np.float32) if history_pad is None else np.asarray(history_pad, np.float32).ravel()
    )
    if pad.size != obs_dim:
        raise DeviceError(f"history_pad has {pad.size} values, the robot observes {obs_dim}")

    returns: list[float] = []
    lengths: list[int] = []
    step_ns: list[int] = []  # the robot computer's step times
    host_ns: list[int] = []  # what this machine measured
    misses = nonfinite = late_ticks = 0
    clock = time.perf_counter_ns
    frames = np.zeros(obs_dim * history, np.float32)
    zero_action = np.zeros(robot.action_size, np.float32)
    if record and recorder is None:
        recorder = Recorder()
    robot.bind_policy(policy)
    t_start = time.monotonic()
    # The robot's clock in the record: time.monotonic() when the robot returned the observation;
    # in fast mode the ticks a real-time run would have had (one period a step; the loop does
    # not sleep, so the wall clock says nothing about the robot's time).
    sim_clock = t_start
    for ep in range(episodes):
        obs = robot.reset(seed + ep)
        if recorder is not None:
            recorder.begin(obs, sim_clock if fast else time.monotonic(), robot.action_size, seed + ep)
        frames[:] = np.tile(pad, history)
        total, steps, done = 0.0, 0, False
        next_tick = time.monotonic()
        while not done and (max_steps is None or steps < max_steps):
            frames[:-obs_dim] = frames[obs_dim:]
            frames[-obs_dim:] = np.asarray(obs, np.float32).ravel()
            t0 = clock()
            action = policy.act(frames)
            measured = clock() - t0
            host_ns.append(measured)
            elapsed = round(robot.compute_time(measured / 1e9) * 1e9)
            step_ns.append(elapsed)
            if elapsed > period_ns:
                misses += 1
            action = np.asarray(action, np.float32).ravel()
            if not np.all(np.isfinite(action)):
                nonfinite += 1
                action = zero_action
            elif action_output == "index":
                action = np.rint(action[:1])
            obs, reward, done = robot.step(action, elapsed / 1e9)
            total += float(reward)
            steps += 1
            if recorder is not None:
                sim_clock += period
                recorder.step(action, reward, elapsed / 1e9, obs, sim_clock if fast else time.monotonic())
            if not fast:
                next_tick += period
                left = next_tick - time.monotonic()
                if left > 0:
                    time.sleep(left)
                else:
                    late_ticks += 1
                    next_tick = time.monotonic()  # do not try to catch up with a burst
        returns.append(total)
        lengths.append(steps)
        if recorder is not None:
            recorder.end()
    n = len(step_ns)
    name, version = _runtime(policy)
    report = {
        "episodes": episodes,
        "seed": seed,
        "returns": returns,
        "lengths": lengths,
        "mean_return": float(np.mean(returns)) if returns else None,
        "steps": n,
        "timings_ms": _timings_ms(step_ns),
        "host_timings_ms": _timings_ms(host_ns),
        "deadline_misses": misses,
        "miss_rate": misses / n if n else 0.0,
        "late_ticks": late_ticks,
        "nonfinite_actions": nonfinite,
        "control_hz": hz,
        "fast": bool(fast),
        "wall_s": time.monotonic() - t_start,
        "runtime": name,
        "runtime_version": version,
        "slot": slot,
        "sha256": sha256,
        "robot": getattr(robot, "name", type(robot).__name__),
        # what a simulated robot adds about itself (e.g. the latency the twin applied)
        "robot_extras": robot.report_extras() if hasattr(robot, "report_extras") else {},
    }
    if recorder is not None:
        report["record"] = recorder.encode()
    return report
