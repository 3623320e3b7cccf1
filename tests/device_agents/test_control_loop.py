"""The control loop: rate honoured, deadline misses counted, latency passed on, NaN caught."""

from __future__ import annotations

import time

import numpy as np
import pytest

from device_agents.control_loop import policy_settings, run_episodes
from device_agents.errors import DeviceError
from device_agents.robots.base import Robot


class CountingRobot(Robot):
    """1-D robot: obs is the step index; reward 1 a step; records what it was given."""

    name = "counting"

    def __init__(self, hz: float = 100.0, obs_size: int = 2, episode_len: int = 1000):
        self.hz, self.n, self.episode_len = hz, obs_size, episode_len
        self.latencies, self.actions, self.step_times, self.seeds = [], [], [], []
        self.t = 0

    observation_size = property(lambda self: self.n)
    action_size = property(lambda self: 1)
    control_hz = property(lambda self: self.hz)

    def reset(self, seed=None):
        self.seeds.append(seed)
        self.t = 0
        return np.full(self.n, 0.0, np.float32)

    def step(self, action, latency_s=0.0):
        self.t += 1
        self.latencies.append(latency_s)
        self.actions.append(np.array(action, copy=True))
        self.step_times.append(time.monotonic())
        return np.full(self.n, float(self.t), np.float32), 1.0, self.t >= self.episode_len


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
    assert host["max"] < 10.0 and min(robot.latencies) > 0.01
    assert report["deadline_misses"] == 40 and report["miss_rate"] == 1.0


def test_history_stacks_oldest_first_with_pad_and_episodes_reset():
    robot = CountingRobot(obs_size=2, episode_len=3)
    policy = Policy()
    report = run_episodes(policy, robot, episodes=2, seed=10, history=3, fast=True, history_pad=[-1.0, -2.0])
    assert report["lengths"] == [3, 3] and robot.seeds == [10, 11]
    np.testing.assert_array_equal(policy.inputs[0], [-1, -2, -1, -2, 0, 0])
    np.testing.assert_array_equal(policy.inputs[2], [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(policy.inputs[3], [-1, -2, -1, -2, 0, 0])  # re-padded


def test_nonfinite_actions_are_counted_and_not_sent():
    robot = CountingRobot()
    report = run_episodes(Policy(value=float("nan")), robot, 1, 0, max_steps=4, fast=True)
    assert report["nonfinite_actions"] == 4
    assert all(np.all(a == 0) for a in robot.actions)


def test_bad_arguments_are_refused():
    with pytest.raises(DeviceError, match="episodes"):
        run_episodes(Policy(), CountingRobot(), -1, 0)
    with pytest.raises(DeviceError, match="history_pad"):
        run_episodes(Policy(), CountingRobot(obs_size=2), 1, 0, history_pad=[0.0])
    with pytest.raises(DeviceError, match="action_output"):
        run_episodes(Policy(), CountingRobot(), 1, 0, action_output="onehot")


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
