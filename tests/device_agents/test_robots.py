"""Robot back ends: one contract test for each (sim twin, serial MCU on a pty) plus specs."""

from __future__ import annotations

import time

import numpy as np
import pytest

from device_agents.errors import DeviceError
from device_agents.robots import BACKENDS, make_robot, parse_spec
from device_agents.robots.serial_mcu import SerialRobot, SerialRobotError, parse_hello, split_kind

pytest.importorskip("sim")


@pytest.fixture(params=["sim", "serial", "serial-1.0"])
def robot(request):
    if request.param == "sim":
        r = make_robot("sim:cartpole-lab-a", fast=True)
        yield r
        r.close()
        return
    from tests.e2e.fake_mcu import FakeMCU

    mcu = FakeMCU("cartpole-lab-a", legacy=request.param == "serial-1.0").start()
    r = make_robot(f"serial:{mcu.port}?baudrate=115200")
    r.mcu = mcu  # for the test to look at
    yield r
    r.close()
    mcu.close()


def test_contract(robot):
    assert robot.observation_size == 5 and robot.action_size == 1
    assert robot.control_hz == 50.0
    np.testing.assert_array_equal(robot.safe_action(), np.zeros(1, np.float32))
    assert robot.safe_action().dtype == np.float32
    if getattr(robot, "mcu", None) is not None and robot.mcu.legacy:  # a 1.0 hello says neither
        assert robot.kind is None and robot.action_limits() is None
    else:
        assert robot.kind == "sim/CartPole-v0"
        low, high = robot.action_limits()
        np.testing.assert_array_equal(low, [-1.0])
        np.testing.assert_array_equal(high, [1.0])
    assert robot.describe()["kind"] == robot.kind
    robot.halt()  # nothing runs: fine
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
    robot.halt()
    robot.halt()  # twice is fine
    robot.close()
    robot.close()  # twice is fine
    robot.halt()  # and halting a closed robot does nothing


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


# --- safety (issue 14) ----------------------------------------------------------------------------
def test_sim_twin_halt_puts_the_safe_action_on_the_motors_at_once():
    """Pushing right, then actions that are never ready in time (5 s late): without a halt the
    motors keep pushing; after one they hold the safe action (zero), and the halt is counted."""

    def run(halt):
        r = make_robot("sim:cartpole-lab-a", fast=True)
        try:
            r.reset(3)
            for _ in range(5):
                r.step(np.array([1.0]), 0.0)
            if halt:
                r.halt()
            out = [r.step(np.array([1.0]), 5.0)[0] for _ in range(10)]
            return np.array(out), r.report_extras()
        finally:
            r.close()

    pushed, extras = run(halt=False)
    halted, halted_extras = run(halt=True)
    assert extras["halts"] == 0 and halted_extras["halts"] == 1
    assert halted[-1][1] < pushed[-1][1] - 0.1  # the cart's velocity: no longer driven right


def test_sim_twin_knows_its_kind_from_its_profile():
    r = make_robot("sim:swingup-lab-a", fast=True)
    try:
        assert r.kind == "sim/CartPoleSwingUp-v0"
        assert r.describe()["action_low"] == [-1.0] and r.describe()["action_high"] == [1.0]
    finally:
        r.close()


@pytest.fixture
def mcu():
    from tests.e2e.fake_mcu import FakeMCU

    m = FakeMCU("cartpole-lab-a", safe=[0.25]).start()
    yield m
    m.close()


def test_serial_hello_gives_kind_limits_and_safe_action(mcu):
    assert mcu.hello() == "H 5 1 50 kind=sim/CartPole-v0 low=-1 high=1 safe=0.25"
    r = SerialRobot(mcu.port)
    try:
        assert r.kind == "sim/CartPole-v0"
        np.testing.assert_array_equal(r.action_limits()[0], [-1.0])
        np.testing.assert_array_equal(r.action_limits()[1], [1.0])
        np.testing.assert_array_equal(r.safe_action(), np.float32([0.25]))
    finally:
        r.close()


def test_serial_halt_stops_the_mcu_until_the_next_reset(mcu):
    r = SerialRobot(f"{mcu.port}?timeout=1")
    try:
        r.reset(1)
        r.step(np.array([0.9]))
        assert mcu.running and mcu.motor[0] == pytest.approx(0.9)
        r.halt()
        assert [n for _, n in mcu.events] == ["reset", "stop"]
        assert not mcu.running and mcu.motor[0] == 0.25  # the firmware's own safe action
        with pytest.raises(SerialRobotError, match="MCU error for 'A': stopped"):
            r.step(np.array([0.9]))
        assert mcu.motor[0] == 0.25 and mcu.refused == 1
        r.reset(2)
        r.step(np.array([-0.4]))
        assert mcu.motor[0] == pytest.approx(-0.4)
    finally:
        r.close()


def test_serial_watchdog_fires_on_silence_and_disarms_with_zero(mcu):
    """The bound is the property: armed at 150 ms, the fake MCU falls to its safe state about
    150 ms after the last line (never before; up to 350 ms more on a loaded machine); `K 0`
    disarms it, and a halt disarms it too."""
    r = SerialRobot(f"{mcu.port}?timeout=1")
    try:
        r.arm_watchdog(0.15)
        r.reset(1)
        r.step(np.array([0.5]))
        last = mcu.action_times[-1]
        deadline = time.monotonic() + 2.0
        while not mcu.event_times("watchdog") and time.monotonic() < deadline:
            time.sleep(0.01)
        (fired,) = mcu.event_times("watchdog")
        assert 0.15 <= fired - last < 0.15 + 0.35
        assert not mcu.running and mcu.motor[0] == 0.25
        with pytest.raises(SerialRobotError, match="stopped"):
            r.step(np.array([0.5]))
        r.arm_watchdog(0.15)
        r.arm_watchdog(0)
        r.reset(2)
        r.arm_watchdog(0.15)
        r.halt()  # S disarms
        time.sleep(0.4)
        assert len(mcu.event_times("watchdog")) == 1
        assert [n for _, n in mcu.events][-5:] == ["arm", "disarm", "reset", "arm", "stop"]
    finally:
        r.close()


def test_a_version_1_0_mcu_still_works_and_is_halted_with_its_safe_action():
    from tests.e2e.fake_mcu import FakeMCU

    mcu = FakeMCU(legacy=True).start()
    try:
        assert mcu.hello() == "H 5 1 50"
        r = SerialRobot(f"{mcu.port}?timeout=1&kind=sim/CartPole-v0")  # the kind from the URL
        assert r.kind == "sim/CartPole-v0" and r.action_limits() is None
        r.reset(1)
        r.step(np.array([0.7]))
        r.halt()  # E to S: the agent sends the safe action instead
        r.halt()  # and goes straight to it the next time
        assert [a[0] for a in mcu.actions] == [pytest.approx(0.7), 0.0, 0.0]
        with pytest.raises(SerialRobotError, match="no heartbeat watchdog"):
            r.arm_watchdog(0.2)
        r.close()
    finally:
        mcu.close()


def test_the_url_kind_must_agree_with_the_hello(mcu):
    with pytest.raises(
        SerialRobotError, match="URL says kind=sim/Hopper-v0, the MCU says kind=sim/CartPole-v0"
    ):
        SerialRobot(f"{mcu.port}?kind=sim/Hopper-v0")
    r = SerialRobot(f"{mcu.port}?kind=sim/CartPole-v0&timeout=1")
    assert r.kind == "sim/CartPole-v0" and r.timeout_s == 1.0
    r.close()
    assert split_kind("socket://h:9?logging=debug&kind=sim/X-v0") == (
        "socket://h:9?logging=debug",
        "sim/X-v0",
    )
    assert split_kind("/dev/ttyACM0") == ("/dev/ttyACM0", None)


@pytest.mark.parametrize(
    "fields, match",
    [
        (["5", "1"], "fewer than three"),
        (["5", "0", "50"], "must be positive"),
        (["5", "1", "50", "low=-1"], "low= and high= come together"),
        (["5", "2", "50", "low=-1", "high=1,1"], "low= has 1 values, the action has 2"),
        (["5", "1", "50", "low=1", "high=-1"], "exceeds"),
        (["5", "1", "50", "low=-1", "high=1", "safe=2"], "outside"),
        (["5", "1", "50", "safe=nan"], "NaN"),
        (["5", "1", "50", "low=a"], "not comma-separated numbers"),
        (["5", "1", "50", "kind"], "not key=value"),
    ],
)
def test_bad_hellos_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        parse_hello(fields)


def test_hello_tokens_parse_and_unknown_ones_are_ignored():
    h = parse_hello(
        ["4", "2", "100", "kind=sim/Reacher-v0", "low=-1,-2", "high=1,2", "safe=0,0.5", "brake=1"]
    )
    assert (h["obs"], h["act"], h["hz"], h["kind"]) == (4, 2, 100.0, "sim/Reacher-v0")
    np.testing.assert_array_equal(h["low"], [-1, -2])
    np.testing.assert_array_equal(h["high"], [1, 2])
    np.testing.assert_array_equal(h["safe"], [0, 0.5])
    old = parse_hello(["4", "2", "100"])
    assert old["kind"] is old["low"] is old["high"] is old["safe"] is None
