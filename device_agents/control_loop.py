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

The step (issue 18): a policy that offers its own input (`observation_buffer`, a float32 array of
obs_dim x history values, and `act_in_place()`, as `TFLitePolicy` does) gets the stack kept in
that buffer, shifted in place (one memmove) with the new observation written behind it, and is
stepped with no argument: no copy of the stack, no reshapes, no size checks, no new array in the
timed span. Any other policy gets `policy.act(frames)` on the loop's own stack, as before. The
clock is read once before and once after the policy's step (the stacking is the loop's
bookkeeping, as it always was, and stays outside); the action is copied after the clock stops,
because the robot may keep what it is handed and the policy's buffer changes next step.

Safety (issue 14); the robot's safe state is its own (`Robot.halt`, `Robot.safe_action`):
- Every run ends with `robot.halt()`, in a `finally`, whatever ended it: the last episode, a
  `stop` event (a STOP or SIGTERM handled by the agent), a non-finite action, a policy that
  raised, a robot that failed mid-step. A failed halt after a run that otherwise completed is in
  the report (`halted: false`, `halt_error`); after a failure, the failure is what is raised.
- The loop waits on the `stop` event rather than sleeping, so a stop set between ticks is seen at
  once, and one set during a step is seen before the next: the run ends within one period.
- Every action is clipped to the manifest's limits intersected with the robot's own, for int8
  and fp32 models alike (the int8 range of an output is not a limit of the robot); an index
  output is rounded and clipped to [0, n - 1].
- The watchdog per tick: a step whose robot computer time exceeds the deadline (one period
  unless told) does not apply its late action; the fallback does ("hold": the previous action
  the robot received in this episode, the safe action on its first step; "safe": the safe
  action). Inference cannot be pre-empted from Python, so the fallback reaches the robot when
  the late step returns; the late action never does. Misses against the period are counted as
  before (`deadline_misses`), fallbacks apart (`fallback_ticks`).
- A non-finite action is never sent: it is counted and ends the run (a policy producing NaN is
  broken, not late). `watchdog_s` arms the robot's heartbeat (SERIAL_ROBOT.md `K`) before the
  first episode; every step's line feeds it, and the halt at the end disarms it.

Recording (`record=True`): every back end goes through this loop, so a sim twin and a physical
robot behind the serial back end give the same record (`device_agents.trajectory.Episode`): the
observations, the actions as `Robot.step` received them, the rewards, the robot's clock and the
latency handed to the robot, bounded by a `Recorder`. The recorded actions are the ones the
robot received (clipped, or the fallback); an episode a stop cut short is recorded as far as it
went.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from device_agents.errors import DeviceError
from device_agents.robots.base import Robot
from device_agents.trajectory import Recorder

PERCENTILES = (50, 90, 99)
FALLBACKS = ("hold", "safe")  # what a tick whose step missed its deadline applies


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


def _limit_values(
    name: str, values: Sequence[float | None] | None, size: int, unbounded: float
) -> np.ndarray:
    """A manifest's limits as `size` float64 values; None (an unbounded side) becomes `unbounded`."""
    if values is None:
        return np.full(size, unbounded)
    try:
        out = np.array([unbounded if v is None else float(v) for v in values], np.float64)
    except (TypeError, ValueError) as e:
        raise DeviceError(f"{name}: {values!r} is not a list of numbers") from e
    if out.size != size or np.any(np.isnan(out)):
        raise DeviceError(f"{name}: {values!r} must be {size} numbers (null for an unbounded side)")
    return out


def action_bounds(
    robot: Robot,
    action_low: Sequence[float | None] | None = None,
    action_high: Sequence[float | None] | None = None,
    action_output: str = "value",
) -> tuple[np.ndarray, np.ndarray]:
    """The limits the loop clips to: the intersection of the manifest's and the robot's own
    (`Robot.action_limits`), float32 (+-inf where neither bounds a side). For an index output,
    one value: the index range, at least 0 (its top is the manifest's `high`, i.e. n - 1, or the
    robot's). DeviceError when the two do not overlap or a limit has the wrong size."""
    size = 1 if action_output == "index" else robot.action_size
    m_lo = _limit_values("action_low", action_low, size, -np.inf)
    m_hi = _limit_values("action_high", action_high, size, np.inf)
    lo, hi = m_lo, m_hi
    own = robot.action_limits()
    if own is not None:
        r_lo, r_hi = (np.asarray(v, np.float64).ravel() for v in own)
        if r_lo.size != size or r_hi.size != size:
            raise DeviceError(f"robot {robot.name} gives {r_lo.size} action limits, the policy sends {size}")
        lo, hi = np.maximum(lo, r_lo), np.minimum(hi, r_hi)
    if action_output == "index":
        lo = np.maximum(lo, 0.0)
    if np.any(lo > hi):
        raise DeviceError(
            f"the manifest's action limits {m_lo.tolist()}..{m_hi.tolist()} do not overlap "
            f"robot {robot.name}'s {None if own is None else [v.tolist() for v in own]}"
        )
    return lo.astype(np.float32), hi.astype(np.float32)


def _policy_step(policy: Any, size: int) -> tuple[np.ndarray, Callable[[], Any], bool]:
    """(the stack the loop writes, the step that reads it, whether the step's result is the
    policy's own buffer). See "The step" in the module docstring."""
    buffer = getattr(policy, "observation_buffer", None)
    step = getattr(policy, "act_in_place", None)
    if (
        callable(step)
        and isinstance(buffer, np.ndarray)
        and buffer.dtype == np.float32
        and buffer.shape == (size,)
        and buffer.flags.writeable
    ):
        return buffer, step, True
    frames = np.zeros(size, np.float32)
    return frames, lambda: policy.act(frames), False


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
    stop: threading.Event | None = None,
    action_low: Sequence[float | None] | None = None,
    action_high: Sequence[float | None] | None = None,
    deadline_s: float | None = None,
    fallback: str = "hold",
    watchdog_s: float | None = None,
) -> dict[str, Any]:
    """Run `episodes` episodes (seeds seed, seed+1, ...) and report returns and timings.

    `policy.act(obs) -> action` (a TFLitePolicy or anything alike); `control_hz` defaults to the
    robot's rate; `max_steps=None` runs until the robot reports done.

    `record=True` records every step (device_agents.trajectory) in a fresh `Recorder` (the last
    5 episodes, 2 MiB) and adds `"record": encode(...)` to the report; passing a `recorder`
    fills that one instead (its own caps, its earlier episodes kept) and implies `record`.

    Safety (the module docstring says why each is so):
    - `stop`: checked before every step and waited on between ticks; once set, the run ends
      within one control period with `stopped = "stop"`.
    - `action_low`/`action_high`: the manifest's limits (None entries: unbounded), intersected
      with the robot's; every action is clipped to them (`clipped_actions` counts the steps).
    - `deadline_s` (default one period) and `fallback` ("hold" or "safe"): a step whose robot
      computer step time exceeds the deadline applies the fallback instead (`fallback_ticks`).
    - `watchdog_s`: `robot.arm_watchdog(watchdog_s)` before the first episode.
    - A non-finite action ends the run (`stopped = "non-finite action"`); a policy that raises
      ends it with DeviceError("policy error: ..."); a robot error propagates. Whatever ends the
      run, the robot is halted; the report says `halted` (and `halt_error` if the halt failed).
    """
    _positive_int("episodes", episodes, 0)
    _positive_int("history", history)
    if max_steps is not None:
        _positive_int("max_steps", max_steps)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DeviceError(f"seed: {seed!r} is not an integer")
    if action_output not in ("value", "index"):
        raise DeviceError(f"action_output {action_output!r} is not one of value, index")
    if fallback not in FALLBACKS:
        raise DeviceError(f"fallback {fallback!r} is not one of {', '.join(FALLBACKS)}")
    hz = float(control_hz or robot.control_hz)
    if not (math.isfinite(hz) and hz > 0):
        raise DeviceError(f"control_hz {hz!r} is not a positive rate")
    period = 1.0 / hz
    period_ns = int(period * 1e9)
    deadline = period if deadline_s is None else deadline_s
    if (
        isinstance(deadline, bool)
        or not isinstance(deadline, (int, float))
        or not (math.isfinite(deadline) and deadline > 0)
    ):
        raise DeviceError(f"deadline_s {deadline_s!r} is not a positive duration")
    deadline_ns = int(deadline * 1e9)
    if watchdog_s is not None and (
        isinstance(watchdog_s, bool)
        or not isinstance(watchdog_s, (int, float))
        or not (math.isfinite(watchdog_s) and watchdog_s > period)
    ):
        # shorter than a period, the firmware would fall to its safe state between two ticks
        raise DeviceError(
            f"watchdog_s {watchdog_s!r} is not a duration longer than one period ({period:g} s)"
        )
    obs_dim = robot.observation_size
    pad = (
        np.zeros(obs_dim, np.float32) if history_pad is None else np.asarray(history_pad, np.float32).ravel()
    )
    if pad.size != obs_dim:
        raise DeviceError(f"history_pad has {pad.size} values, the robot observes {obs_dim}")
    index = action_output == "index"
    out_size = 1 if index else robot.action_size
    low, high = action_bounds(robot, action_low, action_high, action_output)
    safe = np.asarray(robot.safe_action(), np.float32).ravel()
    if safe.size != robot.action_size:
        raise DeviceError(
            f"robot {robot.name}: safe action has {safe.size} values, it takes {robot.action_size}"
        )
    safe = safe[:out_size].copy()

    returns: list[float] = []
    lengths: list[int] = []
    step_ns: list[int] = []  # the robot computer's step times
    host_ns: list[int] = []  # what this machine measured
    misses = nonfinite = late_ticks = clipped = fallback_ticks = 0
    stopped: str | None = None
    clock = time.perf_counter_ns
    frames, policy_step, in_place = _policy_step(policy, obs_dim * history)
    padded = np.tile(pad, history)
    # views made once: the stack shifts by one observation (older frames first) every step
    newest, older, newer = frames[frames.size - obs_dim :], frames[: -obs_dim or None], frames[obs_dim:]
    if record and recorder is None:
        recorder = Recorder()
    robot.bind_policy(policy)
    t_start = time.monotonic()
    # The robot's clock in the record: time.monotonic() when the robot returned the observation;
    # in fast mode the ticks a real-time run would have had (one period a step; the loop does
    # not sleep, so the wall clock says nothing about the robot's time).
    sim_clock = t_start
    completed = False
    halted = False
    halt_error: str | None = None
    try:
        if watchdog_s is not None:
            robot.arm_watchdog(float(watchdog_s))
        for ep in range(episodes):
            if stop is not None and stop.is_set():
                stopped = "stop"
                break
            obs = robot.reset(seed + ep)
            if recorder is not None:
                recorder.begin(obs, sim_clock if fast else time.monotonic(), robot.action_size, seed + ep)
            frames[...] = padded
            total, steps, done = 0.0, 0, False
            applied: np.ndarray | None = None  # what the robot received last in this episode
            next_tick = time.monotonic()
            while not done and (max_steps is None or steps < max_steps):
                if stop is not None and stop.is_set():
                    stopped = "stop"
                    break
                if history > 1:
                    older[...] = newer  # numpy copes with the overlap (a memmove)
                newest[...] = np.ravel(obs)  # cast to float32 as it is written
                t0 = clock()
                try:
                    raw = policy_step()
                    measured = clock() - t0
                    if in_place:  # the policy's buffer changes next step; the robot may keep this
                        action = np.array(raw, np.float32).ravel()
                    else:
                        action = np.asarray(raw, np.float32).ravel()
                except Exception as e:  # whatever the policy raises, the robot is halted (finally)
                    raise DeviceError(f"policy error: {type(e).__name__}: {e}") from e
                host_ns.append(measured)
                elapsed = round(robot.compute_time(measured / 1e9) * 1e9)
                step_ns.append(elapsed)
                if elapsed > period_ns:
                    misses += 1
                if action.size != out_size and not (index and action.size >= 1):
                    raise DeviceError(
                        f"policy error: {action.size} action values, the robot takes {out_size}"
                    )
                if not np.isfinite(action).all():
                    nonfinite += 1
                    stopped = "non-finite action"
                    break
                if elapsed > deadline_ns:  # too late: the fallback, never the late action
                    fallback_ticks += 1
                    action = (applied if fallback == "hold" and applied is not None else safe).copy()
                else:
                    if index:
                        action = np.rint(action[:1])
                    if np.any(action < low) or np.any(action > high):
                        clipped += 1
                        action = np.clip(action, low, high)
                obs, reward, done = robot.step(action, elapsed / 1e9)
                applied = action
                total += float(reward)
                steps += 1
                if recorder is not None:
                    sim_clock += period
                    recorder.step(action, reward, elapsed / 1e9, obs, sim_clock if fast else time.monotonic())
                if not fast:
                    next_tick += period
                    left = next_tick - time.monotonic()
                    if left > 0:
                        if stop is not None:
                            stop.wait(left)  # a STOP wakes the loop at once, not at the tick
                        else:
                            time.sleep(left)
                    else:
                        late_ticks += 1
                        next_tick = time.monotonic()  # do not try to catch up with a burst
            returns.append(total)
            lengths.append(steps)
            if recorder is not None:
                recorder.end()
            if stopped is not None:
                break
        completed = True
    finally:
        if completed:
            try:
                robot.halt()
                halted = True
            except DeviceError as e:  # the run's figures still count; the report says so
                halt_error = str(e)
        else:  # the error that ended the run is the one to raise, not a failed halt
            with contextlib.suppress(Exception):
                robot.halt()
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
        "clipped_actions": clipped,
        "fallback_ticks": fallback_ticks,
        "fallback": fallback,
        "deadline_ms": deadline * 1e3,
        "watchdog_s": None if watchdog_s is None else float(watchdog_s),
        "stopped": stopped,
        "halted": halted,
        "halt_error": halt_error,
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
