"""One trial end to end: learning on sim/CartPole-v0, the curve figures, and the artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from robonas.errors import ConfigError
from robonas.search.curves import asymptote, auc_normalised
from robonas.search.training import TrainSpec, resolve_hyperparams, train_trial
from robonas.space import Layer, PolicyArch

CARTPOLE_ARCH = PolicyArch(5, 1, (Layer(32, "tanh"), Layer(32, "tanh")))


def _loaded_actor(arch: PolicyArch, path: str) -> torch.nn.Module:
    actor = arch.build_actor()
    actor.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return actor.eval()


def _sb3_mean_actions(model, obs: np.ndarray) -> np.ndarray:
    """SB3's deterministic action before any clipping (PPO) or tanh squashing (SAC)."""
    obs_t = torch.as_tensor(obs, dtype=torch.float32)
    with torch.no_grad():
        if hasattr(model.policy, "get_distribution"):  # PPO
            dist = model.policy.get_distribution(obs_t).distribution
            # Categorical: normalised log-probabilities; Normal: the mean
            return (dist.logits if isinstance(dist, torch.distributions.Categorical) else dist.mean).numpy()
        mean, _, _ = model.policy.actor.get_action_dist_params(obs_t)
        return mean.numpy()


def _normalise(obs: np.ndarray, norm) -> np.ndarray:
    z = (obs - norm["mean"]) / np.sqrt(norm["var"] + norm["epsilon"])
    return np.clip(z, -norm["clip_obs"], norm["clip_obs"])


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory):
    spec = TrainSpec(
        env_id="sim/CartPole-v0",
        arch=CARTPOLE_ARCH,
        total_steps=24_576,
        checkpoints=4,
        eval_episodes=5,
        eval_seed=100,
        out_dir=tmp_path_factory.mktemp("cartpole"),
        return_lo=0.0,
        return_hi=500.0,
        seed=1,
        randomization={"mass_scale": [0.7, 1.3], "obs_noise_std": [0.0, 0.02]},
    )
    seen: list[int] = []
    outcome = train_trial(spec, progress=seen.append)
    print(
        f"\nsim/CartPole-v0: {outcome.env_steps} steps in {outcome.wall_s:.1f} s "
        f"({outcome.steps_per_s:.0f} steps/s, eval {outcome.eval_s:.1f} s), curve {outcome.curve}, "
        f"random {outcome.random_return}, randomised {outcome.robustness_return}"
    )
    return spec, outcome, seen


@pytest.mark.slow
def test_cartpole_learns_well_above_random(cartpole):
    spec, outcome, seen = cartpole
    final = outcome.curve[-1][1]
    assert outcome.random_return > 0
    assert final > 3 * outcome.random_return
    assert final > outcome.random_return + 100
    # the curve: K points, increasing steps, the last at the end of training
    steps = [p[0] for p in outcome.curve]
    assert len(steps) == spec.checkpoints
    assert steps == sorted(set(steps))
    assert steps[-1] == outcome.env_steps >= spec.total_steps
    assert seen and seen == sorted(seen) and seen[-1] == outcome.env_steps
    assert outcome.steps_per_s == pytest.approx(outcome.env_steps / outcome.wall_s)


@pytest.mark.slow
def test_cartpole_figures_come_from_the_curve(cartpole):
    _, outcome, _ = cartpole
    steps = [p[0] for p in outcome.curve]
    means = [p[1] for p in outcome.curve]
    assert outcome.auc == pytest.approx(auc_normalised(steps, means, 0.0, 500.0))
    assert 0.0 < outcome.auc < 1.0
    assert (outcome.asymptotic_return, outcome.asymptotic_std) == pytest.approx(asymptote(steps, means))
    assert 0.0 < outcome.robustness_return <= 500.0
    d = json.loads(json.dumps(outcome.to_dict()))
    assert d["curve"][-1][0] == outcome.env_steps


@pytest.mark.slow
def test_cartpole_artifacts_reproduce_sb3(cartpole):
    from stable_baselines3 import PPO

    spec, outcome, _ = cartpole
    model = PPO.load(outcome.artifacts["sb3_model"], device="cpu")
    actor = _loaded_actor(spec.arch, outcome.artifacts["actor"])
    norm = dict(np.load(outcome.artifacts["obs_norm"]))
    assert set(norm) >= {"mean", "var", "clip_obs", "epsilon"}
    assert norm["mean"].shape == (5,)

    # raw observations from the env, normalised with obs_norm.npz by hand
    import sim

    env = sim.make("sim/CartPole-v0")
    raw, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    batch = []
    for _ in range(64):
        batch.append(raw)
        raw, *_ = env.step(rng.uniform(-1, 1, size=1).astype(np.float32))
    obs = _normalise(np.array(batch, dtype=np.float32), norm).astype(np.float32)
    with torch.no_grad():
        ours = actor(torch.as_tensor(obs)).numpy()
    np.testing.assert_allclose(ours, _sb3_mean_actions(model, obs), rtol=1e-5, atol=1e-6)
    sb3_actions, _ = model.predict(obs, deterministic=True)
    np.testing.assert_allclose(np.clip(ours, -1, 1), sb3_actions, rtol=1e-5, atol=1e-6)

    spaces = json.loads(Path(outcome.artifacts["spaces"]).read_text())
    assert spaces["action"] == {
        "discrete": False,
        "shape": [1],
        "low": [-1.0],
        "high": [1.0],
        "transform": "clip",
    }
    assert spaces["observation"]["shape"] == [5] and spaces["history"] == 1


def test_discrete_history_shared_trunk_actor_matches_sb3_logits(tmp_path):
    arch = PolicyArch(
        4,
        2,
        (Layer(16, "relu"), Layer(16, "relu")),
        history=3,
        shared_trunk=True,
        layer_norm=True,
        residual=True,
    )
    spec = TrainSpec(
        env_id="CartPole-v1",
        arch=arch,
        total_steps=512,
        checkpoints=2,
        eval_episodes=2,
        out_dir=tmp_path,
        return_lo=0,
        return_hi=500,
        hyperparams={"n_epochs": 1},
    )
    outcome = train_trial(spec)
    from stable_baselines3 import PPO

    model = PPO.load(outcome.artifacts["sb3_model"], device="cpu")
    extractor = model.policy.mlp_extractor
    assert extractor.value_net is extractor.policy_net  # one trunk, shared
    obs = np.random.default_rng(1).normal(size=(32, 12)).astype(np.float32)
    actor = _loaded_actor(arch, outcome.artifacts["actor"])
    with torch.no_grad():
        logits = actor(torch.as_tensor(obs)).numpy()
    sb3_logp = _sb3_mean_actions(model, obs)  # normalised log-probabilities: logits - logsumexp
    np.testing.assert_allclose(
        logits - np.log(np.exp(logits).sum(1, keepdims=True)), sb3_logp, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(logits.argmax(1), model.predict(obs, deterministic=True)[0])
    spaces = json.loads(Path(outcome.artifacts["spaces"]).read_text())
    assert spaces["action"]["discrete"] and spaces["action"]["n"] == 2 and spaces["history"] == 3
    assert len(outcome.curve) == 2 and outcome.random_return > 0


def test_separate_trunks_for_policy_and_value(tmp_path):
    from stable_baselines3 import PPO

    from robonas.search.sb3_policy import ArchActorCriticPolicy
    from robonas.search.training import make_env

    arch = PolicyArch(4, 2, (Layer(8, "tanh"),))
    model = PPO(ArchActorCriticPolicy, make_env("CartPole-v1"), policy_kwargs={"arch": arch}, device="cpu")
    extractor = model.policy.mlp_extractor
    assert extractor.value_net is not extractor.policy_net
    names = {k for k, _ in model.policy.named_parameters()}
    assert "mlp_extractor.value_net.blocks.0.fc.weight" in names
    assert "action_net.weight" in names


def test_sac_actor_matches_sb3_mean_before_tanh(tmp_path):
    arch = PolicyArch(3, 1, (Layer(16, "silu"),))
    spec = TrainSpec(
        env_id="Pendulum-v1",
        arch=arch,
        algo="sac",
        total_steps=300,
        checkpoints=1,
        eval_episodes=1,
        out_dir=tmp_path,
        return_lo=-1500,
        return_hi=0,
        hyperparams={"learning_starts": 100, "gradient_steps": 1, "train_freq": 1, "buffer_size": 1000},
    )
    outcome = train_trial(spec)
    from stable_baselines3 import SAC

    model = SAC.load(outcome.artifacts["sb3_model"], device="cpu")
    obs = np.random.default_rng(2).normal(size=(16, 3)).astype(np.float32)
    with torch.no_grad():
        ours = _loaded_actor(arch, outcome.artifacts["actor"])(torch.as_tensor(obs)).numpy()
    np.testing.assert_allclose(ours, _sb3_mean_actions(model, obs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        2.0 * np.tanh(ours), model.predict(obs, deterministic=True)[0], rtol=1e-4, atol=1e-5
    )
    assert json.loads(Path(outcome.artifacts["spaces"]).read_text())["action"]["transform"] == "tanh_rescale"


def test_hyperparameters_merge_defaults_env_and_overrides():
    hp = resolve_hyperparams("ppo", "sim/Hopper-v0", {"n_epochs": 3})
    assert hp["learning_rate"] == 3e-5 and hp["clip_range"] == "lin_0.4"  # rl-zoo3 Hopper
    assert hp["n_epochs"] == 3
    assert hp["policy_kwargs"] == {"log_std_init": -2, "ortho_init": False}
    sac = resolve_hyperparams("sac", "sim/Hopper-v0")
    assert sac["learning_rate"] == "lin_7.3e-4" and sac["tau"] == 0.02  # default + env table
    assert resolve_hyperparams("ppo", "Unknown-v9")["n_epochs"] == 5


def test_bad_input_names_the_value(tmp_path):
    base = {
        "env_id": "CartPole-v1",
        "arch": PolicyArch(4, 2, (Layer(8, "tanh"),)),
        "total_steps": 64,
        "out_dir": tmp_path,
        "return_lo": 0,
        "return_hi": 500,
    }
    with pytest.raises(ConfigError, match=r"'dqn'.*ppo, sac"):
        TrainSpec(**{**base, "algo": "dqn"})
    with pytest.raises(ConfigError, match="lo < hi"):
        TrainSpec(**{**base, "return_hi": 0})
    with pytest.raises(ConfigError, match="'n_epoch'"):
        resolve_hyperparams("ppo", "CartPole-v1", {"n_epoch": 3})
    with pytest.raises(ConfigError, match="obs_dim 5"):
        train_trial(TrainSpec(**{**base, "arch": PolicyArch(5, 2, (Layer(8, "tanh"),))}))
    with pytest.raises(ConfigError, match="continuous"):
        train_trial(TrainSpec(**{**base, "algo": "sac"}))
    cart = {**base, "env_id": "sim/CartPole-v0", "arch": CARTPOLE_ARCH}
    with pytest.raises(ConfigError, match="mass_scal"):
        train_trial(TrainSpec(**{**cart, "randomization": {"mass_scal": [0.8, 1.2]}}))
    with pytest.raises(ConfigError, match="randomised"):
        train_trial(TrainSpec(**{**base, "randomization": {"mass_scale": [0.8, 1.2]}}))
