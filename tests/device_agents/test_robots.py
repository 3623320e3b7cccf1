"""Robot back ends: one contract test for each (sim twin, serial MCU on a pty) plus specs."""

from __future__ import annotations

import numpy as np
import pytest

from device_agents.errors import DeviceError
from device_agents.robots import make_robot
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


def test_sim_twin_latency_changes_the_trajectory_and_is_capped():
    def run(latency):
        r = make_robot("sim:cartpole-lab-a", fast=True)
        try:
            r.reset(1)
            out = [r.step(np.array([1.0 if i % 2 else -1.0]), latency)[0] for i in range(20)]
            cap = r._env.unwrapped.actuation_latency_s
        finally:
            r.close()
        return np.array(out), cap

    base, _ = run(0.0)
    late, _ = run(0.012)
    over, cap = run(5.0)  # an overrun is capped just below one period (20 ms)
    assert not np.allclose(base, late)
    assert 0.019 < cap < 0.02


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
        with pytest.raises(SerialRobotError, match="no reply line within 0.3"):
            SerialRobot(f"{os.ttyname(slave)}?timeout=0.3")
    finally:
        os.close(slave)
        os.close(master)


@pytest.mark.parametrize("spec, match", [("cartpole", "not valid"), ("sim:", "lacks"),
                                          ("ros:robot1", "unknown")])
def test_bad_specs_name_the_valid_forms(spec, match):
    with pytest.raises(DeviceError, match=match) as e:
        make_robot(spec)
    assert "sim:PROFILE" in str(e.value) and "serial:URL" in str(e.value)


def test_unknown_profile_is_a_device_error():
    with pytest.raises(DeviceError, match="cartpole-lab-a"):
        make_robot("sim:no-such-profile")
