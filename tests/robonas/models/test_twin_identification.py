"""Robot-twin identification (`robonas.models.twin_identification`) on records of the shipped
cart-pole reality profiles.

Records: a hand-written linear balancing policy (gains on x, x_dot, theta, theta_dot) with
Gaussian exploration noise of std 0.3 on the action, so the actions are informative about the
motor, drives each profile through the sim twin (`SimTwin`, the back end a robot agent uses) for
5 episodes of up to 500 steps. The compute latency handed to the twin is the emulated time of a
13-17 us policy on the profile's computer (`SimTwin.compute_time`), so cartpole-mcu-d (1000x
slower) gets 13-17 ms of it on top of its own actuation latency, drawn from a seeded generator so
the records are the same on every run.

Tolerances (the dynamics are per unit mass: the cart-pole's motion cannot tell mass from gain,
friction and damping scaled with it, so mass_scale is not identifiable and the others are
compared with their true values divided by the true mass_scale):
- action delay: exact, with a log-likelihood ratio over the runner-up above 10;
- motor_gain: within 3% (its standard error is about 0.3%);
- damping: within 35% or 0.005 (its error spread is the widest of the fitted dynamics: on three
  other seeds per profile it reached 31%, at 2.8 of its standard errors);
- friction_scale: weakly identifiable (Coulomb friction of 0.05-0.13 N against actions of up to
  10 N): within 35%, and its relative uncertainty at least 10 times the motor gain's;
- actuation_latency_s: within half a physics substep (2 ms), the resolution of the simulator;
- obs_noise_std: within 20% or 0.001;
- mass_scale: not identifiable (no mean, no std, interval = the prior range).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from device_agents.robots.sim_twin import SimTwin
from device_agents.trajectory import Episode
from robonas.errors import RobonasError
from robonas.models.twin_identification import (
    MIN_EPISODES,
    MIN_STEPS,
    PRIOR,
    TwinDataError,
    TwinFit,
    identify,
)
from robonas.models.twin_replay import Record, Replayer
from sim.reality import get_profile

ENV = "sim/CartPole-v0"
GAINS = np.array([0.1, 0.2, 3.0, 0.5])  # on x, x_dot, theta, theta_dot: balances every profile below
EXPLORATION = 0.3
POLICY_S = 13e-6  # the emulated policy's inference time on this machine


def record(
    profile: str,
    episodes: int = 5,
    seed: int = 0,
    latency: tuple[float, float] | None = None,
    gains: np.ndarray = GAINS,
    exploration: float = EXPLORATION,
) -> list[Episode]:
    """`episodes` records of the exploring linear policy on `profile`'s sim twin. latency: a range
    (s) to draw each step's compute latency from instead of the emulated policy's."""
    twin = SimTwin(profile)
    rng = np.random.default_rng(seed)
    out = []
    try:
        for e in range(episodes):
            obs = [twin.reset(seed=1000 * seed + e)]
            actions, rewards, latencies = [], [], []
            done = False
            while not done:
                o = obs[-1]
                state = np.array([o[0], o[1], math.atan2(o[3], o[2]), o[4]])
                a = float(np.clip(gains @ state + exploration * rng.standard_normal(), -1.0, 1.0))
                if latency is None:
                    lat = twin.compute_time(POLICY_S * (1.0 + 0.3 * rng.random()))
                else:
                    lat = float(rng.uniform(*latency))
                o, r, done = twin.step(np.array([a], np.float32), lat)
                obs.append(o)
                actions.append([a])
                rewards.append(r)
                latencies.append(lat)
            n = len(actions)
            out.append(
                Episode(
                    obs=np.array(obs, np.float32),
                    action=np.array(actions, np.float32),
                    reward=np.array(rewards, np.float32),
                    clock_s=np.arange(n, dtype=np.float64) / twin.control_hz,
                    latency_s=np.array(latencies, np.float32),
                    seed=1000 * seed + e,
                )
            )
    finally:
        twin.close()
    return out


@pytest.fixture(scope="module")
def worn_b_fit() -> TwinFit:
    return identify(ENV, record("cartpole-worn-b"))


def check_recovery(fit: TwinFit, profile_name: str) -> None:
    profile = get_profile(profile_name)
    p = fit.params
    assert fit.env_id == ENV and fit.per_unit_mass
    assert fit.episodes == 5 and fit.steps > 1000 and fit.windows > 50

    assert fit.action_delay.steps == profile.action_delay
    assert fit.action_delay.certain and fit.action_delay.log_lr is not None and fit.action_delay.log_lr > 10
    assert fit.action_delay.runner_up != profile.action_delay

    mass = p["mass_scale"]
    assert not mass.identifiable and mass.mean is None and mass.std is None
    assert (mass.lo, mass.hi) == PRIOR["mass_scale"]

    gain, damping, friction = p["motor_gain"], p["damping"], p["friction_scale"]
    assert gain.identifiable and gain.mean is not None and gain.std is not None
    assert gain.mean == pytest.approx(profile.motor_gain / profile.mass_scale, rel=0.03)
    assert damping.identifiable and damping.mean is not None
    assert damping.mean == pytest.approx(profile.damping / profile.mass_scale, rel=0.35, abs=0.005)
    # weakly identifiable: a wide uncertainty, much wider than the gain's
    assert friction.best == pytest.approx(profile.friction_scale / profile.mass_scale, rel=0.35)
    if friction.identifiable:
        assert friction.std is not None and friction.mean is not None
        assert friction.std / friction.mean > 10 * gain.std / gain.mean
        if profile.obs_noise_std > 0:
            assert friction.hi / friction.lo > 1.2

    latency = p["actuation_latency_s"]
    assert latency.best == pytest.approx(profile.actuation_latency_s, abs=0.002 + 1e-6)
    noise = p["obs_noise_std"]
    assert noise.identifiable and noise.mean is not None
    assert noise.mean == pytest.approx(profile.obs_noise_std, rel=0.2, abs=0.001)
    assert fit.loss > 0 or profile.obs_noise_std == 0
    assert len(fit.residual_rms) == 5


def test_identifies_the_worn_cartpole(worn_b_fit: TwinFit) -> None:
    check_recovery(worn_b_fit, "cartpole-worn-b")


@pytest.mark.slow
@pytest.mark.parametrize(
    "profile", ["cartpole-lab-a", "cartpole-laggy-c", "cartpole-mcu-d", "cartpole-ideal"]
)
def test_identifies_every_shipped_cartpole(profile: str) -> None:
    assert get_profile(profile).env_id == ENV
    check_recovery(identify(ENV, record(profile)), profile)


def test_what_the_records_do_not_show_is_flagged_not_invented() -> None:
    """A robot that never moved its motor: the falling pole still shows friction and damping, but
    nothing about the motor gain, the delay or the latency of actions that were all zero."""
    fit = identify(ENV, record("cartpole-worn-b", episodes=8, gains=np.zeros(4), exploration=0.0))
    for name in ("motor_gain", "actuation_latency_s", "mass_scale"):
        p = fit.params[name]
        assert not p.identifiable and p.mean is None and p.std is None, name
    assert (fit.params["motor_gain"].lo, fit.params["motor_gain"].hi) == PRIOR["motor_gain"]
    latency = fit.params["actuation_latency_s"]
    assert latency.lo == 0.0 and latency.hi >= 0.015  # the whole sub-period range
    assert not fit.action_delay.certain and fit.action_delay.log_lr == pytest.approx(0.0, abs=1e-6)
    assert fit.params["damping"].identifiable and fit.params["friction_scale"].identifiable


def test_twin_fit_round_trips_through_json(worn_b_fit: TwinFit) -> None:
    text = json.dumps(worn_b_fit.to_dict())
    again = TwinFit.from_dict(json.loads(text))
    assert again == worn_b_fit
    values = again.profile_values()
    assert values["action_delay"] == 1 and values["mass_scale"] == 1.0
    assert again.dynamics().motor_gain == pytest.approx(values["motor_gain"])


def test_twin_fit_refuses_another_format(worn_b_fit: TwinFit) -> None:
    d = worn_b_fit.to_dict()
    d["format"] = 99
    with pytest.raises(RobonasError, match="format 99"):
        TwinFit.from_dict(d)


def _records(episodes: list) -> list[Record]:
    return [
        Record(
            np.asarray(e.obs, np.float64),
            np.asarray(e.action, np.float64),
            np.asarray(e.latency_s, np.float64),
        )
        for e in episodes
    ]


def test_mass_is_a_gauge_of_the_cartpole() -> None:
    """Scaling every mass with the gain, friction and damping replays exactly the same motion."""
    from sim.dynamics import Dynamics

    records = _records(record("cartpole-lab-a", episodes=2))
    replayer = Replayer(ENV)
    try:
        replayer.load(records, horizon=10, stride=10, max_windows=30)
        schedule = replayer.schedule(0, 0.004)
        base = replayer.predict(Dynamics(1.0, 1.3, 0.02, 0.9), schedule)
        scaled = replayer.predict(Dynamics(1.4, 1.3 * 1.4, 0.02 * 1.4, 0.9 * 1.4), schedule)
        heavier = replayer.predict(Dynamics(1.4, 1.3, 0.02, 0.9), schedule)
    finally:
        replayer.close()
    assert np.max(np.abs(scaled - base)) < 1e-6
    assert np.max(np.abs(heavier - base)) > 1e-3


def test_replay_reproduces_a_noise_free_robot_with_late_actions() -> None:
    """Compute latencies up to 1.6 control periods: actions land late or are overtaken, and the
    replay at the true parameters still reproduces every recorded observation."""
    episodes = record("cartpole-ideal", episodes=2, latency=(0.0, 0.032))
    records = _records(episodes)
    replayer = Replayer(ENV)
    try:
        replayer.load(records, horizon=10, stride=5, max_windows=1000)
        error = replayer.predict(get_profile("cartpole-ideal").dynamics, replayer.schedule(0, 0.0))
        error -= replayer.targets
        wrong = replayer.predict(get_profile("cartpole-ideal").dynamics, replayer.schedule(0, 0.008))
    finally:
        replayer.close()
    assert np.max(np.abs(error)) < 1e-4
    assert np.max(np.abs(wrong - replayer.targets)) > 1e-2


# -- bad input -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_records() -> list:
    return record("cartpole-lab-a", episodes=2)


def test_too_few_episodes_says_how_many_are_needed(short_records: list) -> None:
    with pytest.raises(TwinDataError) as info:
        identify(ENV, short_records[:1])
    message = str(info.value)
    assert f"at least {MIN_EPISODES} episodes" in message and f"{MIN_STEPS} steps" in message
    assert "got 1 episode(s)" in message and "\n" not in message
    assert isinstance(info.value, RobonasError)


def test_too_short_episodes_say_how_long_they_must_be(short_records: list) -> None:
    cut = [
        Episode(e.obs[:6], e.action[:5], e.reward[:5], e.clock_s[:5], e.latency_s[:5])
        for e in short_records * 3
    ]
    with pytest.raises(TwinDataError, match=r"of at least 10 steps .* 0 long enough"):
        identify(ENV, cut)


def test_observation_size_of_another_env_is_refused_in_one_line(short_records: list) -> None:
    bad = [Episode(e.obs[:, :4], e.action, e.reward, e.clock_s, e.latency_s) for e in short_records]
    with pytest.raises(TwinDataError) as info:
        identify(ENV, bad)
    message = str(info.value)
    assert "\n" not in message and "5 values per step" in message and "episode 0" in message


def test_mismatched_action_rows_and_non_finite_values_are_refused(short_records: list) -> None:
    e = short_records[0]
    with pytest.raises(TwinDataError, match="actions"):
        identify(ENV, [Episode(e.obs, e.action[:-1], e.reward, e.clock_s, e.latency_s), *short_records])
    obs = e.obs.copy()
    obs[3, 1] = np.nan
    with pytest.raises(TwinDataError, match="not all finite"):
        identify(ENV, [Episode(obs, e.action, e.reward, e.clock_s, e.latency_s), *short_records])


def test_env_without_a_state_hook_is_refused(short_records: list) -> None:
    with pytest.raises(TwinDataError, match="supports sim/CartPole-v0"):
        identify("sim/Hopper-v0", short_records)


def test_cartpole_state_hook_refuses_a_wrong_observation() -> None:
    from sim.envs.base import substep_control
    from sim.errors import SimError
    from sim.registry import make

    env = make(ENV)
    try:
        env.reset(seed=0)
        with pytest.raises(SimError, match="5 finite observation values"):
            env.unwrapped.set_state_from_observation(np.zeros(4))  # type: ignore[attr-defined]
        env.unwrapped.set_state_from_observation([0.5, 0.0, 1.0, 0.0, 0.0])  # type: ignore[attr-defined]
        substep_control(env).set_held_action(np.zeros(1))
        obs, *_ = env.unwrapped.step(np.zeros(1))
        assert obs[0] == pytest.approx(0.5, abs=1e-3)
    finally:
        env.close()
