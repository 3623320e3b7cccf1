"""Domain randomisation: config validation, each wrapper's effect, determinism of the stack."""

from __future__ import annotations

import numpy as np
import pytest

import sim
from sim import SimError
from sim.randomization import (
    ActionDelay,
    ControlPeriodJitter,
    DynamicsRandomization,
    ObservationNoise,
    RandomizationConfig,
)


def run(env, seed, actions):
    obs, info = env.reset(seed=seed)
    out = [obs]
    for a in actions:
        obs, *_ = env.step(a)
        out.append(obs)
    return np.array(out), info


def actions(n, dim=1, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, dim)).astype(np.float32)


def test_from_dict_accepts_lists_and_rejects_unknown_keys():
    cfg = RandomizationConfig.from_dict({"mass_scale": [0.8, 1.2], "action_delay": [0, 2]})
    assert cfg.mass_scale == (0.8, 1.2) and cfg.action_delay == (0, 2) and cfg.damping == (0.0, 0.0)
    with pytest.raises(SimError) as err:
        RandomizationConfig.from_dict({"mass": (0.8, 1.2)})
    assert "mass" in str(err.value) and "mass_scale" in str(err.value) and "period_jitter" in str(err.value)


@pytest.mark.parametrize(
    ("field", "value", "phrase"),
    [
        ("mass_scale", (1.2, 0.8), "inverted"),
        ("action_delay", (3, 1), "inverted"),
        ("action_delay", (0.5, 1.0), "ints"),
        ("obs_noise_std", (-0.1, 0.1), "out of range"),
        ("period_jitter", (0.0, 1.5), "out of range"),
        ("motor_gain", (0.0, 1.0), "out of range"),
        ("damping", 0.1, "(lo, hi)"),
    ],
)
def test_bad_ranges_name_field_and_value(field, value, phrase):
    with pytest.raises(SimError) as err:
        RandomizationConfig.from_dict({field: value})
    msg = str(err.value)
    assert field in msg and repr(value) in msg and phrase in msg


def test_make_rejects_a_bad_randomization_type():
    with pytest.raises(SimError, match="randomization"):
        sim.make("sim/CartPole-v0", randomization=[("mass_scale", 1.0)])


def test_different_mass_scales_give_different_trajectories():
    acts = actions(20)
    light = sim.make("sim/CartPole-v0", randomization={"mass_scale": (0.5, 0.5)})
    heavy = sim.make("sim/CartPole-v0", randomization={"mass_scale": (2.0, 2.0)})
    traj_light, info = run(light, 0, acts)
    traj_heavy, _ = run(heavy, 0, acts)
    assert info["dynamics"].mass_scale == 0.5
    np.testing.assert_array_equal(traj_light[0], traj_heavy[0])  # same start
    assert not np.allclose(traj_light[1:], traj_heavy[1:])


def test_dynamics_drawn_per_episode_from_seeded_rng():
    env = sim.make("sim/Hopper-v0", randomization={"mass_scale": (0.5, 1.5), "motor_gain": (0.5, 1.5)})
    _, a = env.reset(seed=1)
    _, b = env.reset(seed=1)
    _, c = env.reset(seed=2)
    _, d = env.reset()
    assert a["dynamics"] == b["dynamics"] != c["dynamics"] != d["dynamics"]
    assert env.unwrapped.dynamics == d["dynamics"]


@pytest.mark.parametrize("k", [1, 3])
def test_action_delay_shifts_response_by_exactly_k_steps(k):
    acts = actions(25)
    nominal = sim.make("sim/CartPole-v0", max_episode_steps=1000)
    delayed = ActionDelay(sim.make("sim/CartPole-v0", max_episode_steps=1000), (k, k))
    shifted = np.concatenate([np.zeros((k, 1), dtype=np.float32), acts[:-k]])
    expected, _ = run(nominal, 4, shifted)
    got, _ = run(delayed, 4, acts)
    np.testing.assert_array_equal(got, expected)
    undelayed, _ = run(nominal, 4, acts)
    assert not np.allclose(got[1:], undelayed[1:])


def test_observation_noise_is_seeded_and_has_the_drawn_std():
    env = ObservationNoise(sim.make("sim/Reacher-v0"), (0.02, 0.02))
    clean = sim.make("sim/Reacher-v0")
    acts = actions(40, dim=2)
    noisy_1, _ = run(env, 3, acts)
    noisy_2, _ = run(env, 3, acts)
    truth, _ = run(clean, 3, acts)
    np.testing.assert_array_equal(noisy_1, noisy_2)
    # Noise goes on observations only, never into the physics: it stays independent of the state.
    resid = (noisy_1 - truth)[:, 2:6]  # components well inside their bounds, so unclipped
    assert resid.std() == pytest.approx(0.02, rel=0.2)


def test_period_jitter_changes_trajectory_but_is_seeded():
    acts = actions(30)
    env = ControlPeriodJitter(sim.make("sim/CartPole-v0"), (0.2, 0.2))
    a, _ = run(env, 0, acts)
    b, _ = run(env, 0, acts)
    nominal, _ = run(sim.make("sim/CartPole-v0"), 0, acts)
    np.testing.assert_array_equal(a, b)
    n = min(len(a), len(nominal))
    assert not np.allclose(a[1:n], nominal[1:n])


def test_wrappers_compose_and_the_stack_is_deterministic():
    cfg = {
        "mass_scale": (0.8, 1.2),
        "friction_scale": (0.5, 2.0),
        "damping": (0.0, 0.05),
        "motor_gain": (0.8, 1.2),
        "obs_noise_std": (0.0, 0.02),
        "action_delay": (1, 2),
        "period_jitter": (0.0, 0.1),
    }
    env = sim.make("sim/CartPoleSwingUp-v0", randomization=cfg)
    kinds = set()
    layer = env
    while layer is not env.unwrapped:
        kinds.add(type(layer))
        layer = layer.env
    assert {DynamicsRandomization, ControlPeriodJitter, ActionDelay, ObservationNoise} <= kinds
    acts = actions(50)
    a, _ = run(env, 9, acts)
    b, _ = run(sim.make("sim/CartPoleSwingUp-v0", randomization=RandomizationConfig.from_dict(cfg)), 9, acts)
    np.testing.assert_array_equal(a, b)
