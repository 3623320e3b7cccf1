"""Reality profiles: listed, fixed, different from the nominal robot, and validated by name."""

from __future__ import annotations

import numpy as np
import pytest

import sim
from sim import SimError
from sim.reality import get_profile, list_profiles, make_reality

REQUIRED = {
    "cartpole-lab-a",
    "cartpole-worn-b",
    "cartpole-laggy-c",
    "swingup-lab-a",
    "reacher-lab-a",
    "hopper-lab-a",
    "halfcheetah-lab-a",
}


def run(env, seed, n):
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for _ in range(n):
        obs, *_ = env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
        out.append(obs)
    return np.array(out)


def test_required_profiles_exist_and_point_at_valid_envs():
    assert set(list_profiles()) >= REQUIRED
    for name in list_profiles():
        profile = get_profile(name)
        assert profile.env_id in sim.ENV_IDS
        if name != "cartpole-ideal":  # the control case is the nominal robot on purpose
            assert profile.dynamics != sim.Dynamics()


def test_laggy_profile_has_long_actuation_delay():
    p = get_profile("cartpole-laggy-c")
    env = make_reality("cartpole-laggy-c")
    assert p.action_delay >= 2 and 0 < p.actuation_latency_s < env.unwrapped.dt
    assert env.unwrapped.actuation_latency_s == p.actuation_latency_s


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_profile_differs_from_nominal_and_is_the_same_every_build(name):
    profile = get_profile(name)
    first = run(make_reality(name), 5, 15)
    again = run(make_reality(name), 5, 15)
    nominal = run(sim.make(profile.env_id), 5, 15)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first[1:], nominal[1:])


def test_make_reality_passes_kwargs_and_refuses_randomization():
    env = make_reality("cartpole-lab-a", render_mode="rgb_array")
    env.reset(seed=0)
    assert env.render().shape == (240, 320, 3)
    with pytest.raises(SimError, match="randomization"):
        make_reality("cartpole-lab-a", randomization={"mass_scale": (1, 2)})


def test_unknown_profile_names_valid_ones():
    with pytest.raises(SimError) as err:
        get_profile("cartpole-mars")
    assert "cartpole-mars" in str(err.value) and "cartpole-lab-a" in str(err.value)


USER_ROBOT = """
[my-heavy-cartpole]
description = "a user's own robot, described outside the package"
env_id = "sim/CartPole-v0"
mass_scale = 1.6
friction_scale = 2.0
damping = 0.05
motor_gain = 0.7
obs_noise_std = 0.0
action_delay = 3
actuation_latency_s = 0.005
"""


def test_user_profiles_from_the_environment_join_the_packaged_ones(tmp_path, monkeypatch):
    (tmp_path / "robots").mkdir()
    (tmp_path / "robots" / "mine.toml").write_text(USER_ROBOT)
    monkeypatch.delenv("ROBONAS_REALITY_PROFILES", raising=False)
    with pytest.raises(SimError, match="my-heavy-cartpole"):
        get_profile("my-heavy-cartpole")
    monkeypatch.setenv("ROBONAS_REALITY_PROFILES", str(tmp_path / "robots"))  # a folder of files
    assert {"my-heavy-cartpole", "cartpole-lab-a"} <= set(list_profiles())
    profile = get_profile("my-heavy-cartpole")
    assert (profile.action_delay, profile.dynamics.mass_scale) == (3, 1.6)
    heavy = run(make_reality("my-heavy-cartpole"), seed=3, n=20)
    nominal = run(sim.make("sim/CartPole-v0"), seed=3, n=20)
    assert heavy.shape == nominal.shape and not np.allclose(heavy, nominal)


def test_user_profiles_may_not_shadow_and_must_exist(tmp_path, monkeypatch):
    shadow = tmp_path / "shadow.toml"
    shadow.write_text(USER_ROBOT.replace("my-heavy-cartpole", "cartpole-lab-a"))
    monkeypatch.setenv("ROBONAS_REALITY_PROFILES", str(shadow))
    with pytest.raises(SimError, match=r"reuses a name from reality_profiles\.toml"):
        list_profiles()
    monkeypatch.setenv("ROBONAS_REALITY_PROFILES", str(tmp_path / "nowhere.toml"))
    with pytest.raises(SimError, match="neither a TOML file nor a folder"):
        list_profiles()
    bad = tmp_path / "bad.toml"
    bad.write_text(USER_ROBOT.replace("action_delay = 3", "action_dealy = 3"))
    monkeypatch.setenv("ROBONAS_REALITY_PROFILES", str(bad))
    with pytest.raises(SimError, match=r"missing \['action_delay'\], unknown \['action_dealy'\]"):
        list_profiles()
