"""A candidate's returns in a robot's twin (`robonas.models.twin_prediction`).

The twins are hand-made `TwinFit`s of the cart-pole (identifiable dynamics with tight posteriors,
friction not identifiable, as identification reports them for the shipped profiles). The policies:
hand-written linear balancing controllers (gains on x, x_dot, theta, theta_dot) as `Controller`s,
and the same law as a real `DeployableActor` (a ReLU MLP whose two hidden units carry +/- the
linear law, with a history of two frames of which it reads the newest).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
import pytest

from robonas.errors import RobonasError
from robonas.models.fleet_residual import ReturnStats
from robonas.models.twin_identification import PARAM_NAMES, DelayFit, ParamFit, TwinFit
from robonas.models.twin_prediction import (
    EpisodeParams,
    delay_probabilities,
    draw_episode_params,
    episode_seeds,
    twin_returns,
    twin_stats,
)

if TYPE_CHECKING:
    from robonas.export.trial_export import DeployableActor

ENV = "sim/CartPole-v0"
GENTLE = (0.1, 0.2, 3.0, 0.5)  # balances behind a delay of 4 steps
AGGRESSIVE = (1.0, 2.0, 20.0, 3.0)  # balances without delay, falls behind 3 or more steps


def make_fit(delay: int = 0, runner_up: int | None = None, log_lr: float | None = None) -> TwinFit:
    params = {
        "mass_scale": ParamFit(1.0, None, None, 0.5, 2.0, False),
        "friction_scale": ParamFit(1.2, None, None, 0.05, 20.0, False),
        "damping": ParamFit(0.02, 0.02, 0.004, 0.012, 0.028, True),
        "motor_gain": ParamFit(1.1, 1.1, 0.01, 1.08, 1.12, True),
        "actuation_latency_s": ParamFit(0.004, 0.004, 0.001, 0.002, 0.006, True),
        "obs_noise_std": ParamFit(0.01, 0.01, 0.001, 0.008, 0.012, True),
    }
    certain = runner_up is None or (log_lr is not None and log_lr > 3.0)
    return TwinFit(
        env_id=ENV,
        params=params,
        action_delay=DelayFit(delay, runner_up, log_lr, certain, {}),
        per_unit_mass=True,
        episodes=5,
        steps=2500,
        windows=100,
        horizon=10,
        residuals=5000,
        effective_samples=500.0,
        loss=1.0,
        residual_rms=(0.01,) * 5,
        seconds=1.0,
        simulated_steps=1000,
    )


class Linear:
    """u = clip(K [x, x_dot, theta, theta_dot], -1, 1) for a batch of episodes."""

    def __init__(self, gains: tuple[float, ...]) -> None:
        self.gains = np.asarray(gains)

    def reset(self, n: int) -> None:
        pass

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        theta = np.arctan2(obs[:, 3], obs[:, 2])
        state = np.stack([obs[:, 0], obs[:, 1], theta, obs[:, 4]], axis=1)
        return np.clip(state @ self.gains, -1.0, 1.0)[:, None]


def test_draws_follow_the_posterior_and_stay_in_range() -> None:
    fit = make_fit()
    draws = draw_episode_params(fit, 200, seed=3)
    assert draws == draw_episode_params(fit, 200, seed=3)
    assert draws != draw_episode_params(fit, 200, seed=4)
    for name in PARAM_NAMES:
        p = fit.params[name]
        values = np.array([getattr(d, name) for d in draws])
        assert np.all((values >= p.lo) & (values <= p.hi)), name
        if p.identifiable and p.std is not None:
            assert abs(values.mean() - p.best) < 0.15 * p.std, name
            assert 0.7 * p.std < values.std() < 1.0 * p.std, name  # truncated at about +/- 2 std
    assert {d.mass_scale for d in draws} == {1.0}  # the gauge: the others are per unit mass
    friction = np.log([d.friction_scale for d in draws])  # not identifiable: log-uniform over the range
    assert friction.min() < math.log(0.1) and friction.max() > math.log(10.0)
    assert abs(np.median(friction) - 0.5 * math.log(0.05 * 20.0)) < 0.3
    assert {d.action_delay for d in draws} == {0}


def test_an_uncertain_delay_mixes_in_the_runner_up() -> None:
    fit = make_fit(delay=2, runner_up=3, log_lr=math.log(3.0))  # 3:1 for 2 steps over 3
    assert delay_probabilities(fit) == pytest.approx({2: 0.75, 3: 0.25})
    delays = [d.action_delay for d in draw_episode_params(fit, 20, seed=0)]
    assert sorted(set(delays)) == [2, 3] and abs(delays.count(3) - 5) <= 1  # stratified
    assert delay_probabilities(make_fit(delay=2, runner_up=3, log_lr=10.0)) == {2: 1.0}


def test_returns_are_deterministic_under_a_seed() -> None:
    fit = make_fit(delay=3)
    t0 = time.perf_counter()
    first = twin_returns(Linear(AGGRESSIVE), fit, episodes=10, seed=0)
    seconds = time.perf_counter() - t0
    assert first.shape == (10,)
    np.testing.assert_array_equal(first, twin_returns(Linear(AGGRESSIVE), fit, episodes=10, seed=0))
    assert not np.array_equal(first, twin_returns(Linear(AGGRESSIVE), fit, episodes=10, seed=1))
    print(f"10 twin episodes: {seconds:.2f} s")


def test_a_long_delay_breaks_an_aggressive_controller() -> None:
    prompt, late = make_fit(delay=0), make_fit(delay=4)
    aggressive_prompt = twin_returns(Linear(AGGRESSIVE), prompt, episodes=6, seed=0)
    aggressive_late = twin_returns(Linear(AGGRESSIVE), late, episodes=6, seed=0)
    gentle_late = twin_returns(Linear(GENTLE), late, episodes=6, seed=0)
    assert aggressive_prompt.mean() == 500.0
    assert aggressive_late.mean() < 0.3 * aggressive_prompt.mean()
    assert gentle_late.mean() == 500.0  # the delay, not the twin, is what breaks it
    # an uncertain delay spreads the returns over both outcomes
    mixed = twin_returns(Linear(AGGRESSIVE), make_fit(delay=0, runner_up=4, log_lr=0.0), episodes=6, seed=0)
    assert mixed.max() == 500.0 and mixed.min() < 200.0


def tiny_actor(gains: tuple[float, ...], history: int = 2) -> DeployableActor:
    import torch
    from torch import nn

    from robonas.export.trial_export import DeployableActor
    from robonas.space import Layer, PolicyArch

    arch = PolicyArch(obs_dim=5, act_dim=1, layers=(Layer(2, "relu"),), history=history)
    actor = arch.build_actor()
    law = np.zeros(arch.input_dim)
    newest = 5 * (history - 1)  # frames are stacked oldest first
    law[newest + np.array([0, 1, 3, 4])] = gains  # sin(theta) for theta: near upright they agree
    fc = actor.trunk.blocks[0].fc
    assert isinstance(fc, nn.Linear)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor(np.stack([law, -law]), dtype=torch.float32))
        fc.bias.zero_()
        actor.head.weight.copy_(torch.tensor([[1.0, -1.0]]))
        actor.head.bias.zero_()
    obs_norm = {
        "mean": np.zeros(5),
        "var": np.ones(5),
        "clip_obs": np.asarray(10.0),
        "epsilon": np.asarray(0.0),
    }
    spaces = {"action": {"discrete": False, "shape": [1], "low": [-1.0], "high": [1.0], "transform": "clip"}}
    return DeployableActor(arch, actor, obs_norm, spaces)


def test_a_deployable_actor_runs_in_the_twin() -> None:
    actor = tiny_actor(AGGRESSIVE)
    t0 = time.perf_counter()
    prompt = twin_returns(actor, make_fit(delay=0), episodes=10, seed=0)
    seconds = time.perf_counter() - t0
    print(f"10 twin episodes of a torch MLP: {seconds:.2f} s")
    late = twin_returns(actor, make_fit(delay=4), episodes=10, seed=0)
    assert prompt.mean() == 500.0 and late.mean() < 150.0
    np.testing.assert_array_equal(late, twin_returns(actor, make_fit(delay=4), episodes=10, seed=0))
    stats = twin_stats(actor, make_fit(delay=4), episodes=10, seed=0)
    assert stats == ReturnStats.from_returns(late)


def test_bad_input() -> None:
    fit = make_fit()
    with pytest.raises(RobonasError, match="episodes"):
        draw_episode_params(fit, 0)
    with pytest.raises(RobonasError, match="seed"):
        episode_seeds(3, seed=-1)
    with pytest.raises(RobonasError, match="neither"):
        twin_returns(object(), fit, episodes=1)  # type: ignore[arg-type]  # not a policy, on purpose
    p = draw_episode_params(fit, 1)[0]
    assert isinstance(p, EpisodeParams) and p.randomization()["action_delay"] == (0, 0)
