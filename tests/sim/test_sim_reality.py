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
