"""SAC end to end on the continuous-force cart-pole: a short trial learns well above random, and
the same trial's int8 export passes the parity check and balances on a robot agent.

The trial runs once per module (5000 env steps, about 40 s of one core) with a small budget
overriding the [sac."sim/CartPole-v0"] defaults of robonas/data/ppo_defaults.toml only where the
budget asks for it (an early start of learning and a small buffer); the export and the agent reuse
its artifacts. Measured with these settings over training seeds 0-3: final evaluation returns
346, 284, 227, 461 against a random policy's 35, so "3x random and 50 more" (~105) has a margin
of 2x over the worst seed. The agent is a real `python -m device_agents serve` process
(robonas.fleet.local_agents) on a sim twin of sim/CartPole-v0, reached over TLS with the local
operator's certificate; the store, study and trial rows for export_trial come from the export
tests' helpers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robonas.search.training import TrainSpec, TrialOutcome, resolve_hyperparams, train_trial
from robonas.space import Layer, PolicyArch
from tests.robonas.export.test_export import _add_trial, _study_config

ENV = "sim/CartPole-v0"
ARCH = PolicyArch(5, 1, (Layer(64, "relu"), Layer(64, "relu")))
# The short-budget overrides; everything else comes from [sac."sim/CartPole-v0"].
SHORT = {"learning_starts": 500, "buffer_size": 10_000}
STEPS = 5_000


def clearly_above_random(ret: float, random_ret: float) -> bool:
    """The margin both tests ask for: 3x the random policy's return and 50 steps more."""
    return ret > 3 * random_ret and ret > random_ret + 50


@pytest.fixture(scope="module")
def trial(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainSpec, TrialOutcome]:
    spec = TrainSpec(
        env_id=ENV,
        arch=ARCH,
        algo="sac",
        total_steps=STEPS,
        checkpoints=2,
        eval_episodes=5,
        out_dir=tmp_path_factory.mktemp("sac-cartpole") / "trial",
        return_lo=0.0,
        return_hi=500.0,
        return_max=500.0,
        hyperparams=SHORT,
        n_envs=1,
    )
    outcome = train_trial(spec)
    print(
        f"\nSAC {ENV}: {outcome.env_steps} steps in {outcome.wall_s:.1f} s (eval {outcome.eval_s:.1f} s),"
        f" curve {outcome.curve}, random {outcome.random_return:.1f}"
    )
    return spec, outcome


def test_cartpole_defaults_are_the_off_policy_settings_the_trial_runs_with() -> None:
    hp = resolve_hyperparams("sac", ENV, SHORT)
    # gSDE off: the exported head is the plain Gaussian mean squashed by tanh
    assert hp["use_sde"] is False and hp["train_freq"] == hp["gradient_steps"] == 1
    assert hp["learning_starts"] == 500 and hp["n_envs"] == 1


def test_short_sac_trial_learns_well_above_random(trial) -> None:
    _spec, outcome = trial
    final = outcome.curve[-1][1]
    assert outcome.algo == "sac" and outcome.env_steps >= STEPS
    assert outcome.random_return > 0
    assert clearly_above_random(final, outcome.random_return), (final, outcome.random_return)
    spaces = json.loads(Path(outcome.artifacts["spaces"]).read_text())
    assert spaces["action"]["transform"] == "tanh_rescale"  # SAC's squashed Gaussian


def test_sac_trial_exports_to_int8_and_balances_on_an_agent(trial, tmp_path) -> None:
    """export_trial's parity check (int8 TFLite on the robot's interpreter vs the torch policy,
    held-out seeds) accepts the SAC actor; a signed rollout to an agent on the cartpole-lab-a
    twin (heavier, more friction, a weaker motor, sensor noise and actuation latency the trial
    never saw) passes its canary, and RUN episodes there return clearly more than random."""
    from device_agents.signing import generate_keypair
    from robonas.export.trial_export import export_trial
    from robonas.fleet.deploy import rollout
    from robonas.fleet.inventory import load_inventory
    from robonas.fleet.local_agents import LocalAgent, write_fleet
    from robonas.store import Store

    spec, outcome = trial
    store = Store(f"sqlite:///{tmp_path / 'runs' / 'robonas.db'}")
    try:
        config = _study_config(ENV, calibration_episodes=4, parity_episodes=5)
        study = store.create_study("sac-cartpole", config)
        tid = _add_trial(store, study.id, 0, ARCH, 0.5, Path(spec.out_dir))
        key, pub = generate_keypair(tmp_path / "keys")
        exported = export_trial(store, "sac-cartpole", tid, key_path=key)
        m = exported.manifest
        p = m["parity"]
        print(f"\nSAC int8 export: {m['model_size']} bytes, parity {p}")
        assert m["precision"] == "int8" and m["input"]["dtype"] == "int8"
        assert m["action"]["discrete"] is False
        assert p["return_drop"] <= p["allowed_drop"]
        assert clearly_above_random(p["tflite_return"], outcome.random_return), p

        agent = LocalAgent("sac-bot", "sim:cartpole-lab-a", "x86-host", tmp_path / "agent", pub).start()
        try:
            inventory = load_inventory(write_fleet(tmp_path / "fleet.toml", [agent]))
            result = rollout(exported.path, inventory, canary_count=1, episodes=2, store=store)
            assert result.ok, result.to_dict()
            with agent.client(timeout_s=120.0) as client:
                report = client.run(5, seed=300)
        finally:
            agent.stop()
    finally:
        store.close()
    print(f"agent on cartpole-lab-a: returns {report['returns']}, p50 {report['timings_ms']['p50']} ms")
    assert report["sha256"] == m["sha256"] and report["nonfinite_actions"] == 0
    assert len(report["returns"]) == 5
    assert clearly_above_random(report["mean_return"], outcome.random_return), report["returns"]
