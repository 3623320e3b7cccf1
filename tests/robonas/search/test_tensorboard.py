"""Optional TensorBoard logs per trial (`[training] tensorboard = true`, the `tensorboard` extra)."""

from __future__ import annotations

import importlib.util

import pytest

from robonas.config import parse_config
from robonas.errors import ConfigError
from robonas.search.loop import SearchPlan
from robonas.search.training import TrainSpec, train_trial
from robonas.space import Layer, PolicyArch


def _config(tensorboard: bool) -> dict:
    return {
        "env": {"id": "sim/CartPole-v0", "return_target": 500.0},
        "space": {"depths": [1], "widths": [8]},
        "budget": {"trials": 1, "steps_per_trial": 512},
        "training": {"tensorboard": tensorboard},
        "device": {"profile": "rpi4", "latency_budget_ms": 5.0},
    }


def test_a_trial_writes_tensorboard_events_in_its_folder(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    spec = TrainSpec(
        env_id="sim/CartPole-v0",
        arch=PolicyArch(obs_dim=5, act_dim=1, layers=(Layer(8, "tanh"),)),
        total_steps=512,
        checkpoints=2,
        eval_episodes=2,
        out_dir=tmp_path,
        return_lo=0,
        return_hi=500,
        hyperparams={"n_epochs": 1, "n_steps": 128},
        tensorboard=True,
    )
    train_trial(spec)
    events = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert acc.Tags()["scalars"]  # SB3's training figures, step by step


def test_without_tensorboard_the_config_is_refused_in_one_line(monkeypatch):
    real = importlib.util.find_spec

    def no_tensorboard(name, *args, **kwargs):
        return None if name == "tensorboard" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_tensorboard)
    with pytest.raises(ConfigError, match=r"pip install 'robonas\[tensorboard\]'"):
        SearchPlan.build(parse_config(_config(True)), "tb")
    assert parse_config(_config(True)).fingerprint() == parse_config(_config(False)).fingerprint()
