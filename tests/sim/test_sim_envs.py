"""The sim envs: gymnasium conformance, seed determinism, physics sanity, control rate and latency."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import sim
from sim import SimError

ALL_WRAPPERS = {
    "mass_scale": (0.7, 1.3),
    "friction_scale": (0.5, 1.5),
    "damping": (0.0, 0.1),
    "motor_gain": (0.8, 1.2),
    "obs_noise_std": (0.0, 0.05),
    "action_delay": (0, 2),
    "period_jitter": (0.0, 0.1),
}


def rollout(env: gymnasium.Env, seed: int, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    obs, _ = env.reset(seed=seed)
    observations, rewards = [obs], []
    for a in actions:
        obs, r, terminated, truncated, _ = env.step(a)
        observations.append(obs)
        rewards.append(r)
        if terminated or truncated:
            break
    return np.array(observations), np.array(rewards)


def random_actions(env: gymnasium.Env, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(n, *env.action_space.shape)).astype(np.float32)


@pytest.mark.parametrize("env_id", sim.ENV_IDS)
@pytest.mark.parametrize("randomization", [None, ALL_WRAPPERS], ids=["nominal", "randomized"])
def test_check_env_passes(env_id, randomization):
    env = sim.make(env_id, randomization=randomization, render_mode="rgb_array")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env)
    problems = [str(w.message) for w in caught if "different from the unwrapped" not in str(w.message)]
    assert problems == []
    frame = env.render()
    assert frame.shape == (240, 320, 3) and frame.dtype == np.uint8 and frame.std() > 0
    env.close()


@pytest.mark.parametrize("env_id", sim.ENV_IDS)
def test_spaces_bounded_and_rate_exposed(env_id):
    env = sim.make(env_id)
    for space in (env.observation_space, env.action_space):
        assert (
            space.dtype == np.float32 and np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))
        )
    u = env.unwrapped
    assert u.dt == pytest.approx(1.0 / u.control_hz)
    assert env.metadata["render_fps"] == pytest.approx(u.control_hz)
    env.close()


@pytest.mark.parametrize("env_id", sim.ENV_IDS)
def test_same_seed_same_actions_same_trajectory(env_id):
    a, b = sim.make(env_id), sim.make(env_id)
    actions = random_actions(a, 40)
    obs_a, rew_a = rollout(a, 7, actions)
    rollout(a, 99, actions)  # a different episode in between must not leak into the next
    obs_a2, rew_a2 = rollout(a, 7, actions)
    obs_b, rew_b = rollout(b, 7, actions)
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(rew_a, rew_b)
    np.testing.assert_array_equal(obs_a, obs_a2)
    np.testing.assert_array_equal(rew_a, rew_a2)
    first_0, _ = a.reset(seed=0)
    first_1, _ = a.reset(seed=1)
    assert not np.array_equal(first_0, first_1)


def test_many_instances_in_one_process_are_independent():
    envs = [sim.make("sim/CartPole-v0") for _ in range(3)]
    for i, env in enumerate(envs):
        env.reset(seed=0)
        for _ in range(5):
            env.step(np.array([i - 1.0], dtype=np.float32))
    xs = [env.unwrapped._state()[0] for env in envs]
    assert xs[0] < xs[1] < xs[2]


def test_balancing_pole_falls_under_zero_force():
    env = sim.make("sim/CartPole-v0")
    env.reset(seed=3)
    for step in range(200):  # noqa: B007  (read after the loop: the step it ended on)
        _, reward, terminated, _, info = env.step(np.zeros(1, dtype=np.float32))
        assert reward == 1.0
        if terminated:
            break
    assert terminated and step < 100
    assert abs(math.remainder(info["theta"], 2 * math.pi)) > env.unwrapped.theta_threshold


def test_cart_leaving_rail_terminates():
    env = sim.make("sim/CartPole-v0", control_hz=100.0)
    env.reset(seed=0)
    env.unwrapped.theta_threshold = math.inf  # isolate the rail limit
    for _ in range(500):
        _, _, terminated, _, info = env.step(np.ones(1, dtype=np.float32))
        if terminated:
            break
    assert terminated and info["x"] > env.unwrapped.x_threshold


def test_swingup_starts_hanging_and_does_not_end_on_angle():
    env = sim.make("sim/CartPoleSwingUp-v0")
    obs, _ = env.reset(seed=5)
    assert obs[2] < -0.99  # cos(theta) near -1: hanging down
    rewards = []
    for _ in range(100):
        obs, r, terminated, _, _ = env.step(np.zeros(1, dtype=np.float32))
        rewards.append(r)
        assert not terminated
    assert max(rewards) < 0.05  # hanging earns almost nothing


def test_hopper_with_zero_torque_falls():
    env = sim.make("sim/Hopper-v0")
    env.reset(seed=0)
    for step in range(1000):  # noqa: B007  (read after the loop: the step it ended on)
        _, _, terminated, truncated, _ = env.step(np.zeros(3, dtype=np.float32))
        if terminated or truncated:
            break
    assert terminated and not truncated and step < 300


def test_hopper_rewards_match_upstream_bullet_env():
    from pybullet_envs_gymnasium.gym_locomotion_envs import HopperBulletEnv

    ours, upstream = sim.make("sim/Hopper-v0").unwrapped, HopperBulletEnv()
    actions = random_actions(ours, 30, seed=4)
    # Second episodes: upstream's first episode has a spurious step-1 progress reward we fix.
    rollout(upstream, 11, actions)
    _, rew_ours = rollout(ours, 11, actions)
    _, rew_up = rollout(upstream, 11, actions)
    np.testing.assert_allclose(rew_ours, rew_up[: len(rew_ours)], rtol=1e-3, atol=1e-3)
    upstream.close()


def test_control_hz_override_changes_substeps_not_episode_limit():
    env = sim.make("sim/CartPole-v0", control_hz=100.0)
    u = env.unwrapped
    assert u.control_hz == 100.0 and u.dt == pytest.approx(0.01)
    assert u.n_substeps * u.physics_dt == pytest.approx(0.01) and u.physics_dt <= 1 / 240
    assert env.spec.max_episode_steps == 500
    with pytest.raises(SimError, match="control_hz"):
        sim.make("sim/CartPole-v0", control_hz=-5.0)


@pytest.mark.parametrize("env_id", sim.ENV_IDS)
def test_actuation_latency_holds_previous_action(env_id):
    env = sim.make(env_id)
    actions = random_actions(env, 10, seed=2)
    nominal, _ = rollout(env, 1, actions)
    env.unwrapped.actuation_latency_s = 0.5 * env.unwrapped.dt
    late, _ = rollout(env, 1, actions)
    n = min(len(nominal), len(late))
    assert not np.allclose(nominal[1:n], late[1:n])
    # Whole periods of delay belong to the ActionDelay wrapper; latency is sub-period only.
    with pytest.raises(SimError, match="actuation_latency_s"):
        env.unwrapped.actuation_latency_s = env.unwrapped.dt


def test_set_dynamics_applies_immediately_and_persists_across_resets():
    env = sim.make("sim/CartPole-v0")
    actions = np.ones((5, 1), dtype=np.float32)
    nominal, _ = rollout(env, 0, actions)
    env.unwrapped.set_dynamics(sim.Dynamics(mass_scale=2.0))
    heavy, _ = rollout(env, 0, actions)
    heavy_again, _ = rollout(env, 0, actions)
    assert env.unwrapped.dynamics.mass_scale == 2.0
    assert heavy[-1][1] < nominal[-1][1]  # the same force accelerates a heavier cart less
    np.testing.assert_array_equal(heavy, heavy_again)
    with pytest.raises(SimError, match="mass_scale"):
        sim.Dynamics(mass_scale=0.0)


def test_unknown_env_id_names_valid_ids():
    with pytest.raises(SimError) as err:
        sim.make("sim/Nope-v0")
    assert "sim/Nope-v0" in str(err.value) and "sim/CartPole-v0" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_import_sim_is_cheap_and_registers_ids():
    code = (
        "import sys, sim, gymnasium; assert 'pybullet' not in sys.modules; "
        "print(all(i in gymnasium.registry for i in sim.ENV_IDS))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
