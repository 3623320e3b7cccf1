"""The control loop: rate honoured, deadline misses counted, latency passed on, NaN caught."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from device_agents.control_loop import policy_settings, run_episodes
from device_agents.errors import DeviceError
from device_agents.robots.base import Robot
from device_agents.trajectory import decode


class CountingRobot(Robot):
    """1-D robot: obs is the step index; reward 1 a step; records what it was given.

    `calls` logs the safety calls in order ("arm <s>", "reset", "halt"); `limits` and `safe` are
    what it declares as its own action limits and safe action."""

    name = "counting"

    def __init__(self, hz: float = 100.0, obs_size: int = 2, episode_len: int = 1000, limits=None, safe=None):
        self.hz, self.n, self.episode_len = hz, obs_size, episode_len
        self.latencies, self.actions, self.step_times, self.seeds = [], [], [], []
        self.limits, self.safe, self.calls, self.halt_times = limits, safe, [], []
        self.t = 0

    observation_size = property(lambda self: self.n)
    action_size = property(lambda self: 1)
    control_hz = property(lambda self: self.hz)

    def reset(self, seed=None):
        self.seeds.append(seed)
        self.calls.append("reset")
        self.t = 0
        return np.full(self.n, 0.0, np.float32)

    def step(self, action, latency_s=0.0):
        self.t += 1
        self.latencies.append(latency_s)
        self.actions.append(np.array(action, copy=True))
        self.step_times.append(time.monotonic())
        return np.full(self.n, float(self.t), np.float32), 1.0, self.t >= self.episode_len

    def action_limits(self):
        return None if self.limits is None else tuple(np.float32(v) for v in self.limits)

    def safe_action(self):
        return super().safe_action() if self.safe is None else np.float32(self.safe)

    def halt(self):
        self.calls.append("halt")
        self.halt_times.append(time.monotonic())

    def arm_watchdog(self, timeout_s):
        self.calls.append(f"arm {timeout_s}")

    @property
    def halts(self):
        return self.calls.count("halt")


class Policy:
    runtime_name, runtime_version = "stub", "0"

    def __init__(self, sleep_s: float = 0.0, value: float = 0.5):
        self.sleep_s, self.value, self.inputs = sleep_s, value, []

    def act(self, obs):
        self.inputs.append(np.array(obs, copy=True))
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return np.array([self.value], np.float32)


def test_real_time_rate_is_honoured():
    robot = CountingRobot(hz=50.0)
    t0 = time.monotonic()
    report = run_episodes(Policy(), robot, episodes=1, seed=3, max_steps=10)
    wall = time.monotonic() - t0
    assert report["lengths"] == [10] and report["returns"] == [10.0]
    gaps = np.diff(robot.step_times)
    assert 0.9 * 0.02 * 9 <= robot.step_times[-1] - robot.step_times[0] <= 0.02 * 9 + 0.05
    assert np.median(gaps) == pytest.approx(0.02, abs=0.004)
    assert wall >= 0.18 and report["deadline_misses"] == 0 and robot.seeds == [3]
    assert report["runtime"] == "stub" and report["control_hz"] == 50.0


def test_slow_policy_counts_deadline_misses_and_fast_mode_passes_latency():
    robot = CountingRobot(hz=100.0)  # 10 ms period, policy takes ~15 ms
    report = run_episodes(Policy(sleep_s=0.015), robot, 1, 0, max_steps=6, fast=True)
    assert report["deadline_misses"] == 6 and report["miss_rate"] == 1.0
    assert all(lat >= 0.015 for lat in robot.latencies)
    assert report["timings_ms"]["p50"] >= 15.0 and report["timings_ms"]["max"] >= 15.0
    robot2 = CountingRobot(hz=100.0)
    quick = run_episodes(Policy(), robot2, 1, 0, max_steps=50, fast=True)
    assert quick["deadline_misses"] == 0 and quick["wall_s"] < 0.3  # no sleeps in fast mode
    assert all(0 < lat < 0.01 for lat in robot2.latencies)


class SlowComputerRobot(CountingRobot):
    """A robot whose own computer takes 1000x what this machine measured."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.bound = []

    def bind_policy(self, policy):
        self.bound.append(policy)

    def compute_time(self, measured_s):
        return 1000.0 * measured_s


def test_the_robot_computer_time_is_reported_handed_on_and_judged():
    policy = Policy(sleep_s=20e-6)  # tens of microseconds here, tens of milliseconds there
    robot = SlowComputerRobot(hz=100.0)
    report = run_episodes(policy, robot, 1, 0, max_steps=40, fast=True)
    assert robot.bound == [policy]
    host, own = report["host_timings_ms"], report["timings_ms"]
    assert own["p50"] == pytest.approx(1000.0 * host["p50"], rel=1e-3)
    assert own["max"] == pytest.approx(1000.0 * host["max"], rel=1e-3)
    # the robot got its own computer's latency, and deadlines are judged on it
    assert np.median(robot.latencies) * 1e3 == pytest.approx(own["p50"], rel=1e-3)
    # every step missed the 10 ms period on the robot's computer, none would have here
    assert host["p50"] < 10.0 and min(robot.latencies) > 0.01  # p50: a preemption may hit one step
    assert report["deadline_misses"] == 40 and report["miss_rate"] == 1.0


def test_history_stacks_oldest_first_with_pad_and_episodes_reset():
    robot = CountingRobot(obs_size=2, episode_len=3)
    policy = Policy()
    report = run_episodes(policy, robot, episodes=2, seed=10, history=3, fast=True, history_pad=[-1.0, -2.0])
    assert report["lengths"] == [3, 3] and robot.seeds == [10, 11]
    np.testing.assert_array_equal(policy.inputs[0], [-1, -2, -1, -2, 0, 0])
    np.testing.assert_array_equal(policy.inputs[2], [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(policy.inputs[3], [-1, -2, -1, -2, 0, 0])  # re-padded


def test_bad_arguments_are_refused():
    with pytest.raises(DeviceError, match="episodes"):
        run_episodes(Policy(), CountingRobot(), -1, 0)
    with pytest.raises(DeviceError, match="history_pad"):
        run_episodes(Policy(), CountingRobot(obs_size=2), 1, 0, history_pad=[0.0])
    with pytest.raises(DeviceError, match="action_output"):
        run_episodes(Policy(), CountingRobot(), 1, 0, action_output="onehot")
    with pytest.raises(DeviceError, match="fallback 'brake'"):
        run_episodes(Policy(), CountingRobot(), 1, 0, fallback="brake")
    with pytest.raises(DeviceError, match="deadline_s"):
        run_episodes(Policy(), CountingRobot(), 1, 0, deadline_s=0.0)
    with pytest.raises(DeviceError, match=r"watchdog_s 0\.005 .* longer than one period"):
        run_episodes(Policy(), CountingRobot(hz=100.0), 1, 0, watchdog_s=0.005)
    with pytest.raises(DeviceError, match="action_high"):
        run_episodes(Policy(), CountingRobot(), 1, 0, action_high=[1.0, 2.0])
    with pytest.raises(DeviceError, match="do not overlap"):
        run_episodes(Policy(), CountingRobot(limits=([-1.0], [1.0])), 1, 0, action_low=[2.0])


def test_policy_settings_read_the_manifest():
    s = policy_settings(
        {
            "control_hz": 50.0,
            "history": 2,
            "observation": {"history_pad": [1.0, 2.0]},
            "action": {"output": "index"},
        }
    )
    assert s == {"control_hz": 50.0, "history": 2, "history_pad": [1.0, 2.0], "action_output": "index"}
    assert policy_settings({})["history"] == 1


# --- safety (issue 14) ----------------------------------------------------------------------------
class Scripted(Policy):
    """Returns `values[i]` on call i (the last one after that); sleeps `sleep_s` on the calls in
    `late`; raises on call `raise_at`; sets `stop` on call `stop_at`."""

    def __init__(self, values, late=(), sleep_s=0.06, raise_at=None, stop=None, stop_at=None):
        super().__init__()
        self.values, self.late, self.sleep_s = list(values), set(late), sleep_s
        self.raise_at, self.stop, self.stop_at = raise_at, stop, stop_at

    def act(self, obs):
        i = len(self.inputs)
        self.inputs.append(np.array(obs, copy=True))
        if i == self.raise_at:
            raise RuntimeError("tensor arena exhausted")
        if i == self.stop_at:
            self.stop.set()
        if i in self.late:
            time.sleep(self.sleep_s)
        return np.array([self.values[min(i, len(self.values) - 1)]], np.float32)


def test_every_run_ends_with_the_robot_halted_and_the_watchdog_armed_first():
    robot = CountingRobot(episode_len=3)
    report = run_episodes(Policy(), robot, 2, 0, fast=True, watchdog_s=0.5)
    assert robot.calls == ["arm 0.5", "reset", "reset", "halt"]
    assert report["halted"] is True and report["stopped"] is None and report["halt_error"] is None
    assert report["lengths"] == [3, 3] and report["watchdog_s"] == 0.5


class HaltFails(CountingRobot):
    def halt(self):
        super().halt()
        raise DeviceError("MCU did not confirm its stop")


def test_a_failed_halt_after_a_complete_run_is_reported():
    robot = HaltFails(episode_len=2)
    report = run_episodes(Policy(), robot, 1, 0, fast=True)
    assert robot.halts == 1 and report["halted"] is False
    assert report["halt_error"] == "MCU did not confirm its stop" and report["lengths"] == [2]


def test_a_non_finite_action_halts_the_robot_and_ends_the_run():
    """The NaN is never sent: the robot got the two finite actions, then was halted."""
    robot = CountingRobot()
    report = run_episodes(
        Scripted([0.1, 0.2, float("nan"), 0.3]), robot, 3, 0, max_steps=10, fast=True, record=True
    )
    assert report["nonfinite_actions"] == 1 and report["stopped"] == "non-finite action"
    assert report["lengths"] == [2] and report["halted"] is True
    assert robot.calls == ["reset", "halt"]
    np.testing.assert_array_equal(np.concatenate(robot.actions), np.float32([0.1, 0.2]))
    (episode,) = decode(report["record"])  # the record says what the robot received, no more
    np.testing.assert_array_equal(episode.action[:, 0], np.float32([0.1, 0.2]))


def test_a_policy_that_raises_halts_the_robot_then_raises():
    robot = CountingRobot()
    with pytest.raises(DeviceError, match="policy error: RuntimeError: tensor arena exhausted"):
        run_episodes(Scripted([0.5], raise_at=3), robot, 1, 0, max_steps=10, fast=True)
    assert len(robot.actions) == 3 and robot.calls == ["reset", "halt"]


class StepFails(CountingRobot):
    def step(self, action, latency_s=0.0):
        if self.t == 2:
            raise DeviceError("serial port failed")
        return super().step(action, latency_s)


class StepAndHaltFail(StepFails, HaltFails):
    pass


@pytest.mark.parametrize("cls", [StepFails, StepAndHaltFail])
def test_a_robot_error_mid_step_halts_and_raises_the_robot_error(cls):
    robot = cls()
    with pytest.raises(DeviceError, match="serial port failed"):  # not the halt's error
        run_episodes(Policy(), robot, 1, 0, max_steps=10, fast=True)
    assert robot.halts == 1 and len(robot.actions) == 2


def test_actions_are_clipped_to_the_manifest_and_the_robot_limits():
    """The robot takes [-1, 1], the manifest [-0.5, unbounded]: a +-1e6 output reaches the
    robot as -0.5 or 1; an output within both passes as it is. The record agrees."""
    robot = CountingRobot(limits=([-1.0], [1.0]))
    outputs = [1e6, -1e6, 0.25, -0.75, 1.0, -0.5]
    report = run_episodes(
        Scripted(outputs),
        robot,
        1,
        0,
        max_steps=6,
        fast=True,
        action_low=[-0.5],
        action_high=[None],
        record=True,
    )
    got = np.concatenate(robot.actions)
    np.testing.assert_array_equal(got, np.float32([1.0, -0.5, 0.25, -0.5, 1.0, -0.5]))
    assert report["clipped_actions"] == 3  # 1e6, -1e6, -0.75; the limits themselves pass
    np.testing.assert_array_equal(decode(report["record"])[0].action[:, 0], got)
    # the robot's limits alone, when the manifest gives none
    robot2 = CountingRobot(limits=([-1.0], [1.0]))
    run_episodes(Scripted(outputs), robot2, 1, 0, max_steps=6, fast=True)
    np.testing.assert_array_equal(np.concatenate(robot2.actions), np.float32([1, -1, 0.25, -0.75, 1, -0.5]))
    # the manifest's alone, on a robot that declares none
    robot3 = CountingRobot()
    run_episodes(
        Scripted(outputs), robot3, 1, 0, max_steps=6, fast=True, action_low=[-0.1], action_high=[0.1]
    )
    assert np.abs(np.concatenate(robot3.actions)).max() == np.float32(0.1)


def test_an_index_output_is_clipped_to_the_index_range():
    outputs = [7.3, -3.0, 1.4, 2.0]
    robot = CountingRobot()
    report = run_episodes(
        Scripted(outputs), robot, 1, 0, max_steps=4, fast=True, action_output="index", action_high=[2]
    )
    np.testing.assert_array_equal(np.concatenate(robot.actions), [2, 0, 1, 2])
    assert report["clipped_actions"] == 2
    robot2 = CountingRobot()  # n unknown: only below 0 is out of range
    run_episodes(Scripted(outputs), robot2, 1, 0, max_steps=4, fast=True, action_output="index")
    np.testing.assert_array_equal(np.concatenate(robot2.actions), [7, 0, 1, 2])


@pytest.mark.parametrize("fallback", ["hold", "safe"])
def test_a_step_past_its_deadline_applies_the_fallback(fallback):
    """Calls 0, 3, 4 (episode 1) and 6 (episode 2's first) sleep 60 ms past a 30 ms deadline; the
    others take microseconds. A late tick's own action never reaches the robot: "hold" keeps the
    previous action (the safe action on an episode's first step), "safe" sends the safe action.
    The 100 ms period is never missed."""
    robot = CountingRobot(hz=10.0, episode_len=6, safe=[-0.25])
    outputs = [10.0 + i for i in range(12)]
    report = run_episodes(
        Scripted(outputs, late={0, 3, 4, 6}),
        robot,
        2,
        0,
        fast=True,
        deadline_s=0.03,
        fallback=fallback,
        record=True,
    )
    got = np.concatenate(robot.actions).tolist()
    safe = -0.25
    if fallback == "hold":
        want = [safe, 11, 12, 12, 12, 15, safe, 17, 18, 19, 20, 21]  # episode 2 from call 6
    else:
        want = [safe, 11, 12, safe, safe, 15, safe, 17, 18, 19, 20, 21]
    assert got == want
    assert report["fallback_ticks"] == 4 and report["deadline_misses"] == 0
    assert report["fallback"] == fallback and report["deadline_ms"] == 30.0
    recorded = np.concatenate([e.action[:, 0] for e in decode(report["record"])])
    np.testing.assert_array_equal(recorded, np.float32(want))


def test_a_stop_set_during_a_step_ends_the_run_after_that_step():
    stop = threading.Event()
    robot = CountingRobot(episode_len=4)
    report = run_episodes(
        Scripted([0.5], stop=stop, stop_at=5), robot, 3, 0, fast=True, stop=stop, record=True
    )
    assert report["stopped"] == "stop" and report["lengths"] == [4, 2] and report["halted"] is True
    assert robot.calls == ["reset", "reset", "halt"]
    assert [e.steps for e in decode(report["record"])] == [4, 2]  # the cut episode as far as it went
    # a stop already set: no episode starts, the robot is still halted
    robot2 = CountingRobot()
    report2 = run_episodes(Policy(), robot2, 3, 0, fast=True, stop=stop)
    assert report2["lengths"] == [] and report2["stopped"] == "stop" and robot2.calls == ["halt"]


def test_a_stop_reaches_the_robot_within_one_period_of_a_real_time_run():
    """The bound is the property: set from another thread halfway between two ticks of a 5 Hz
    run (100 ms before the next), the run halts the robot at once, not at the next tick: within
    50 ms of the set (a generous margin for a loaded machine; a loop that slept to the tick
    would take ~100 ms), so well within one period."""
    stop = threading.Event()
    robot = CountingRobot(hz=5.0)
    set_at = []

    def stopper():
        time.sleep(0.5)  # ticks at 0, 0.2, 0.4, 0.6 s: the loop waits for the 0.6 s one
        set_at.append(time.monotonic())
        stop.set()

    threading.Thread(target=stopper).start()
    report = run_episodes(Policy(), robot, 1, 0, max_steps=50, stop=stop)
    assert report["stopped"] == "stop" and robot.halts == 1
    assert robot.halt_times[0] - set_at[0] < 0.05
    assert all(t < set_at[0] for t in robot.step_times)  # no step after the stop
    assert 2 <= report["lengths"][0] <= 4
