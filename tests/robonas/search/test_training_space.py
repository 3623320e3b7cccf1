"""Trainer settings searched beside the network: config, space, strategies and real trials."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from robonas.config import parse_config
from robonas.errors import ConfigError
from robonas.search.loop import Search, SearchPlan
from robonas.space import SearchSpace
from robonas.store import Store
from robonas.strategies import make_strategy

REPO = Path(__file__).resolve().parents[3]


def _data(training: dict[str, Any], algo: str = "ppo", **extra: Any) -> dict[str, Any]:
    return {
        "study": {"name": "hp"},
        "env": {"id": "sim/CartPole-v0", "return_target": 500.0, "return_max": 500.0, "return_floor": 20.0},
        "space": {
            "depths": [1],
            "widths": [16, 32],
            "activations": ["tanh"],
            "layer_norm": [False],
            "residual": [False],
            "shared_trunk": [False],
            "training": training,
        },
        "strategy": {"name": "random", "seed": 1},
        "budget": {"trials": 2, "steps_per_trial": 1024, "checkpoints": 2, "eval_episodes": 2},
        "training": {"algo": algo, "n_envs": 2},
        "seed_check": {"top": 0},
        "device": {"profile": "rpi4", "latency_budget_ms": 5.0},
        **extra,
    }


def test_a_config_with_trainer_settings_validates_and_starts_from_the_tuned_values():
    cfg = parse_config(
        _data({"learning_rate": [3e-4, "lin_1e-3"], "n_steps": [128, 256], "gamma": [0.98, 0.99]})
    )
    plan = SearchPlan.build(cfg, "hp")
    space = plan.space
    assert dict(space.training) == {
        "gamma": (0.98, 0.99),
        "learning_rate": (3e-4, "lin_1e-3"),
        "n_steps": (128, 256),
    }
    # ppo_defaults.toml's tuned sim/CartPole-v0 values, where they are among the choices
    assert dict(space.training_start) == {"gamma": 0.98, "learning_rate": "lin_1e-3", "n_steps": 256}
    assert space.size() == 2 * 8
    # TPE's and evolution's first candidates train with the tuned settings; later ones vary
    for name in ("tpe", "evolution"):
        strategy = make_strategy(name, space, 0)
        first = strategy.ask()
        assert dict(first.training) == dict(space.training_start), name
        later = {strategy.ask().training for _ in range(12)}
        assert len(later) > 1, name
    # the settings are part of the candidate: encoded, mutated, described, round-tripped
    rng = np.random.default_rng(0)
    arch = space.sample(rng)
    assert space.decode(space.encode(arch)) == arch
    assert "nsteps=" in arch.describe() and "lr=" in arch.describe()
    assert arch.network.training == () and arch.network.arch_id != arch.arch_id
    from robonas.space import PolicyArch

    assert PolicyArch.from_json(arch.to_json()) == arch


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"learning_rate": [3e-4, 0.0]}, r"space.training.learning_rate: 0.0 is outside \(0, inf\]"),
        ({"gamma": [1.5]}, r"space.training.gamma: 1.5 is outside \(0, 1\]"),
        ({"n_steps": [128, 12.5]}, r"space.training.n_steps: 12.5 is not an integer >= 2"),
        ({"batch_size": []}, r"space.training.batch_size: the list of choices is empty"),
        ({"n_epochs": [5, 5]}, r"lists a choice twice"),
        ({"lr": [1e-3]}, r"'lr' is not a ppo hyperparameter; valid: .*learning_rate"),
        ({"tau": [0.01]}, r"'tau' is not a ppo hyperparameter"),
        ({"learning_rate": ["fast"]}, r"space.training.learning_rate: 'fast' is not a number"),
    ],
)
def test_bad_trainer_settings_fail_with_one_line(training, message):
    with pytest.raises(ConfigError, match=message) as info:
        SearchPlan.build(parse_config(_data(training)), "hp")
    assert "\n" not in str(info.value)


def test_sac_settings_are_checked_against_sac():
    cfg = parse_config(_data({"tau": [0.005, 0.02], "train_freq": [1, 8], "ent_coef": ["auto", 0.01]}, "sac"))
    assert dict(SearchPlan.build(cfg, "hp").space.training)["tau"] == (0.005, 0.02)
    with pytest.raises(ConfigError, match=r"space.training.tau: 2 is outside \(0, 1\]"):
        SearchPlan.build(parse_config(_data({"tau": [2]}, "sac")), "hp")


def test_bad_setting_from_the_cli_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "bad.toml"
    text = (REPO / "launch" / "cartpole.toml").read_text()
    cfg.write_text(text.replace("[strategy]", "[space.training]\nn_steps = [0]\n\n[strategy]"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "robonas.cli",
            "search",
            str(cfg),
            "--store",
            f"sqlite:///{tmp_path / 's.db'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "space.training.n_steps: 0 is not an integer >= 2" in lines[0], proc.stderr
    assert not (tmp_path / "s.db").exists() or Store(f"sqlite:///{tmp_path / 's.db'}").list_studies() == []


def test_each_trial_trains_with_the_settings_it_was_asked(tmp_path):
    from stable_baselines3 import PPO

    cfg = parse_config(_data({"n_steps": [64, 128], "n_epochs": [1, 2], "batch_size": [64]}))
    store = Store(f"sqlite:///{tmp_path / 'runs' / 'robonas.db'}")
    summary = Search(SearchPlan.build(cfg, "hp"), store, workers=2).run()
    assert summary.complete == 2 and summary.failed == 0
    trials = store.trials(store.get_study("hp").id)
    for t in trials:
        asked = dict(t.arch.training)  # recorded with the trial
        assert set(asked) == {"n_steps", "n_epochs", "batch_size"}
        (weights,) = store.artifacts(t.id, "weights")
        model = PPO.load(weights.meta["sb3_model"], device="cpu")
        assert model.n_steps == asked["n_steps"]
        assert model.n_epochs == asked["n_epochs"]
        assert model.batch_size == asked["batch_size"]


def test_space_refuses_a_start_value_outside_its_choices():
    with pytest.raises(ConfigError, match=r"training_start.n_steps: 64 is not one of its choices"):
        SearchSpace(4, 1, training=(("n_steps", (128,)),), training_start=(("n_steps", 64),))
