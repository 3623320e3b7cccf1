"""The robot's safe state, end to end over a pty: the control loop driving a SerialRobot on the
fake MCU (tests/e2e/fake_mcu.py, SERIAL_ROBOT.md 1.1), in real time.

What the MCU receives is the evidence: huge outputs arrive clipped; a stop set from another
thread reaches it as `S` within one control period; a non-finite action or a policy that raises
ends with `S`; and when the process driving it is killed outright, the MCU's heartbeat watchdog
puts it in its safe state by itself.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_agents.control_loop import run_episodes
from device_agents.errors import DeviceError
from device_agents.robots import make_robot
from device_agents.robots.serial_mcu import SerialRobot
from device_agents.trajectory import decode

pytest.importorskip("sim")
from tests.e2e.fake_mcu import FakeMCU

REPO = Path(__file__).resolve().parents[2]


class Outputs:
    """A stub policy: `values[i]` on call i (the last one after that); raises on call `raise_at`."""

    runtime_name, runtime_version = "stub", "0"

    def __init__(self, values, raise_at=None):
        self.values, self.raise_at, self.calls = list(values), raise_at, 0

    def act(self, obs):
        i, self.calls = self.calls, self.calls + 1
        if i == self.raise_at:
            raise ValueError("bad tensor")
        return np.array([self.values[min(i, len(self.values) - 1)]], np.float32)


@pytest.fixture
def mcu_robot():
    mcu = FakeMCU("cartpole-lab-a", hz=20.0).start()
    robot = SerialRobot(f"{mcu.port}?timeout=1")
    yield mcu, robot
    robot.close()
    mcu.close()


def test_a_huge_output_reaches_the_mcu_clipped(mcu_robot):
    """An fp32 artifact has no int8 range to save it: +-1e6 reaches the MCU as the limits,
    here the manifest's -0.8 below and the MCU's own 1 above."""
    mcu, robot = mcu_robot
    report = run_episodes(
        Outputs([1e6, -1e6] * 4), robot, 1, 0, max_steps=8, action_low=[-0.8], action_high=[5.0], record=True
    )
    received = [float(a[0]) for a in mcu.actions]
    assert received == pytest.approx([1.0, -0.8] * 4)
    assert report["clipped_actions"] == 8 and report["halted"] is True
    np.testing.assert_allclose(decode(report["record"])[0].action[:, 0], received)
    assert mcu.event_times("stop")  # the run ended with S


def test_a_huge_output_reaches_the_sim_twin_clipped():
    robot = make_robot("sim:cartpole-lab-a", fast=True)
    try:
        report = run_episodes(Outputs([1e6, -1e6, 0.5]), robot, 1, 0, max_steps=5, fast=True, record=True)
        assert report["robot_extras"]["halts"] == 1
    finally:
        robot.close()
    np.testing.assert_array_equal(
        decode(report["record"])[0].action[:, 0], np.float32([1, -1, 0.5, 0.5, 0.5])
    )
    assert report["clipped_actions"] == 2


def test_a_stop_from_another_thread_reaches_the_mcu_within_one_period(mcu_robot):
    """The bound is the property: a 20 Hz run (50 ms period); the MCU receives `S` within one
    period of the set, with 50 ms more for the pty round trip and a loaded machine's scheduling.
    No action reaches it after the `S`."""
    mcu, robot = mcu_robot
    stop = threading.Event()
    set_at: list[float] = []

    def stopper():
        deadline = time.monotonic() + 10
        while len(mcu.actions) < 6 and time.monotonic() < deadline:
            time.sleep(0.003)
        set_at.append(time.monotonic())
        stop.set()

    t = threading.Thread(target=stopper)
    t.start()
    report = run_episodes(Outputs([0.0]), robot, 100, 0, stop=stop)
    t.join()
    assert report["stopped"] == "stop" and report["halted"] is True
    (stopped_at,) = mcu.event_times("stop")
    assert 0 <= stopped_at - set_at[0] < 0.05 + 0.05
    assert all(a < stopped_at for a in mcu.action_times) and mcu.refused == 0
    assert not mcu.running and mcu.motor[0] == 0.0


@pytest.mark.parametrize("failure", ["non-finite", "raises"])
def test_a_failing_policy_leaves_the_mcu_stopped(mcu_robot, failure):
    mcu, robot = mcu_robot
    if failure == "non-finite":
        report = run_episodes(Outputs([0.3, 0.3, 0.3, float("inf")]), robot, 1, 0, max_steps=20)
        assert report["stopped"] == "non-finite action" and report["nonfinite_actions"] == 1
    else:
        with pytest.raises(DeviceError, match="policy error: ValueError: bad tensor"):
            run_episodes(Outputs([0.3], raise_at=3), robot, 1, 0, max_steps=20)
    assert [float(a[0]) for a in mcu.actions] == pytest.approx([0.3, 0.3, 0.3])  # nothing after
    assert [n for _, n in mcu.events] == ["reset", "stop"]
    assert not mcu.running and mcu.motor[0] == 0.0


# A robot-side process: the device package only (no sim), a trivial numpy policy, a watchdog.
AGENT = """
import sys

import numpy as np

from device_agents.control_loop import run_episodes
from device_agents.robots.serial_mcu import SerialRobot


class Zero:
    runtime_name, runtime_version = "numpy", np.__version__

    def act(self, obs):
        return np.zeros(1, np.float32)


robot = SerialRobot(sys.argv[1])
run_episodes(Zero(), robot, 1_000_000, 0, watchdog_s=float(sys.argv[2]))
"""
WATCHDOG_S = 0.2


def _lines(stream) -> queue.Queue:
    """The stream's lines, read by a thread so the test can wait on them with a timeout."""
    q: queue.Queue = queue.Queue()

    def read():
        for line in stream:
            q.put(line.strip())

    threading.Thread(target=read, daemon=True).start()
    return q


def _wait_for(q: queue.Queue, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        line = q.get(timeout=max(0.0, deadline - time.monotonic()))
        if line.startswith(prefix):
            return line


def _kill_mid_run(port: str, running) -> tuple[subprocess.Popen, float]:
    """Start the robot-side process on `port`, wait until `running()`, SIGKILL it; (it, kill time)."""
    agent = subprocess.Popen([sys.executable, "-c", AGENT, port, str(WATCHDOG_S)], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not running() and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert agent.poll() is None and running(), "the robot-side process never got going"
        killed_at = time.monotonic()
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(10)
        return agent, killed_at
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)


def test_the_heartbeat_watchdog_fires_when_the_agent_is_killed():
    """The bound is the property: the process driving the MCU arms a 200 ms watchdog and runs at
    20 Hz; SIGKILLed mid-run, it sends nothing more (no `S`), and the MCU falls to its safe state
    by itself 200 ms after the last line it got (never before), 300 ms of margin for a loaded
    machine."""
    mcu = FakeMCU("cartpole-lab-a", hz=20.0).start()
    try:
        agent, killed_at = _kill_mid_run(mcu.port, lambda: len(mcu.actions) >= 10)
        assert agent.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while not mcu.event_times("watchdog") and time.monotonic() < deadline:
            time.sleep(0.01)
        (fired,) = mcu.event_times("watchdog")
        assert mcu.event_times("arm") and not mcu.event_times("stop")
        assert fired - mcu.action_times[-1] >= WATCHDOG_S  # the last line fed it
        assert fired - killed_at < WATCHDOG_S + 0.3
        assert not mcu.running and mcu.motor[0] == 0.0
    finally:
        mcu.close()


def test_the_fake_mcu_process_reports_its_watchdog_on_stdout():
    """Both sides as processes, as on a robot: the fake MCU's `event watchdog <t>` line comes
    within the timeout (+300 ms margin) of the kill."""
    mcu = subprocess.Popen(
        [sys.executable, "tests/e2e/fake_mcu.py", "cartpole-lab-a", "hz=20"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = mcu.stdout.readline().strip()
        assert port.startswith("/dev/")
        events = _lines(mcu.stdout)
        seen: list[tuple[str, float]] = []

        def running() -> bool:  # armed, and a third of a second into the first episode
            while not events.empty():
                _, name, t = events.get().split()
                seen.append((name, float(t)))
            resets = [t for name, t in seen if name == "reset"]
            return any(n == "arm" for n, _ in seen) and bool(resets) and time.monotonic() - resets[0] > 0.3

        _, killed_at = _kill_mid_run(port, running)
        line = _wait_for(events, "event watchdog ", timeout=5)
        fired = float(line.split()[2])
        assert 0 < fired - killed_at < WATCHDOG_S + 0.3
        assert all(name != "stop" for name, _ in seen)
    finally:
        if mcu.stdin:
            mcu.stdin.close()
        mcu.wait(10)
