"""Robot back ends: one contract test for each (sim twin, serial MCU on a pty) plus specs."""

from __future__ import annotations

import numpy as np
import pytest

from device_agents.errors import DeviceError
from device_agents.robots import BACKENDS, make_robot, parse_spec
from device_agents.robots.serial_mcu import SerialRobot, SerialRobotError

pytest.importorskip("sim")


@pytest.fixture(params=["sim", "serial"])
def robot(request):
    if request.param == "sim":
        r = make_robot("sim:cartpole-lab-a", fast=True)
        yield r
        r.close()
        return
    from tests.e2e.fake_mcu import FakeMCU

    mcu = FakeMCU("cartpole-lab-a").start()
    r = make_robot(f"serial:{mcu.port}?baudrate=115200")
    yield r
    r.close()
    mcu.close()


def test_contract(robot):
    assert robot.observation_size == 5 and robot.action_size == 1
    assert robot.control_hz == 50.0
    obs = robot.reset(7)
    assert obs.shape == (5,) and obs.dtype == np.float32
    again = robot.reset(7)
    np.testing.assert_allclose(obs, again)  # seeded: same start
    total, done, steps = 0.0, False, 0
    while not done and steps < 600:
        obs, reward, done = robot.step(np.array([1.0], np.float32), latency_s=0.001)
        total += reward
        steps += 1
    assert done and 1 <= steps < 600  # pushing one way topples the pole
    assert total == pytest.approx(steps, rel=0.2)
    robot.close()
    robot.close()  # twice is fine


def _twin_run(profile, actions, latency):
    r = make_robot(f"sim:{profile}", fast=True)
    try:
        r.reset(1)
        out = [r.step(np.array([a]), latency)[0] for a in actions]
        extras = r.report_extras()
    finally:
        r.close()
    return np.array(out), extras


def test_sim_twin_latency_changes_the_trajectory_and_late_actions_wait():
    actions = [1.0 if i % 2 else -1.0 for i in range(20)]
    base, _ = _twin_run("cartpole-lab-a", actions, 0.0)
    late, _ = _twin_run("cartpole-lab-a", actions, 0.012)
    assert not np.allclose(base, late)
    # 1.5 periods late: the first period has no ready action, every later one gets the previous
    # period's action 14 ms into the period (4 ms profile latency + 30 ms - 20 ms)
    _, extras = _twin_run("cartpole-lab-a", actions, 0.030)
    assert extras["stale_periods"] == 1
    # never ready within the episode: the motors hold their initial zero action throughout
    never, extras = _twin_run("cartpole-lab-a", actions, 5.0)
    idle, _ = _twin_run("cartpole-lab-a", [0.0] * 20, 0.0)
    assert extras["stale_periods"] == 20 and np.allclose(never, idle)


class _Cost:
    def __init__(self, macs):
        self.macs = macs


def test_sim_twin_emulates_its_robot_computer():
    """compute_time: this machine's measurement x compute_scale + policy MACs / the robot's
    MAC rate; step applies what it is handed (the loop passes compute_time's answer)."""
    lab = make_robot("sim:cartpole-lab-a", fast=True)
    mcu_d = make_robot("sim:cartpole-mcu-d", fast=True)
    slow = make_robot("sim:cartpole-mcu-slow", fast=True)
    try:
        for r in (lab, mcu_d, slow):
            r.bind_policy(_Cost(67_072))  # a 2x256 cart-pole actor
        assert lab.compute_time(20e-6) == pytest.approx(20e-6)  # as fast as this machine
        assert mcu_d.compute_time(20e-6) == pytest.approx(20e-3)  # 1000x, no MAC term
        assert slow.compute_time(20e-6) == pytest.approx(20e-6 * 100 + 67_072 / 5e5)
        slow.bind_policy(_Cost(384))  # a 1x64 actor: the arithmetic term shrinks with the net
        assert slow.compute_time(20e-6) == pytest.approx(2e-3 + 384 / 5e5)
        with pytest.raises(DeviceError, match="MAC count"):
            slow.bind_policy(object())  # a runtime that cannot count MACs cannot drive it
    finally:
        for r in (lab, mcu_d, slow):
            r.close()
    _, lab_extras = _twin_run("cartpole-lab-a", [0.0] * 5, 20e-6)
    _, mcu = _twin_run("cartpole-mcu-d", [0.0] * 5, 20e-3)
    assert lab_extras["compute_scale"] == 1.0 and mcu["compute_scale"] == 1000.0
    assert lab_extras["applied_latency_ms"]["p50"] == pytest.approx(4.0 + 0.02)
    assert mcu["applied_latency_ms"]["p50"] == pytest.approx(2.0 + 20.0)


def test_serial_robot_errors_are_clear():
    from tests.e2e.fake_mcu import FakeMCU

    mcu = FakeMCU().start()
    try:
        r = SerialRobot(f"{mcu.port}?timeout=0.5")
        with pytest.raises(SerialRobotError, match="action has 2 values"):
            r.step(np.zeros(2))
        r._port.write(b"X\n")  # the MCU answers E ...: the next reply read is the error
        with pytest.raises(SerialRobotError, match="MCU error"):
            r._request("Q", "O")
        r.close()
    finally:
        mcu.close()
    with pytest.raises(SerialRobotError, match="unknown option"):
        SerialRobot("/dev/null?speed=9")
    with pytest.raises(SerialRobotError, match="cannot open"):
        SerialRobot("/nonexistent/tty")


def test_serial_robot_times_out_on_a_silent_line():
    import os
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        with pytest.raises(SerialRobotError, match=r"no reply line within 0.3"):
            SerialRobot(f"{os.ttyname(slave)}?timeout=0.3")
    finally:
        os.close(slave)
        os.close(master)


@pytest.mark.parametrize(
    "spec, match", [("cartpole", "not valid"), ("sim:", "lacks"), ("ros:robot1", "unknown")]
)
def test_bad_specs_name_the_valid_forms(spec, match):
    with pytest.raises(DeviceError, match=match) as e:
        make_robot(spec)
    assert "sim:PROFILE" in str(e.value) and "serial:URL" in str(e.value)


def test_an_unknown_back_end_lists_the_table():
    with pytest.raises(DeviceError, match="known back ends: sim, serial"):
        make_robot("ros:robot1")
    assert parse_spec("serial:/dev/ttyACM0?baudrate=9600").argument == "/dev/ttyACM0?baudrate=9600"
    assert parse_spec("sim:cartpole-lab-a").backend is BACKENDS["sim"]


def test_unknown_profile_is_a_device_error():
    with pytest.raises(DeviceError, match="cartpole-lab-a"):
        make_robot("sim:no-such-profile")
