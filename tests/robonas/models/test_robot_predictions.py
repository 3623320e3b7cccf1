"""Every candidate on every robot (`robonas.models.robot_predictions`, wired into re-ranking and
`robonas top --robot`): trained candidates, robots identified from their records, real returns
measured on the reality profiles, and the ranking the twins give."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from device_agents.trajectory import Episode, encode
from robonas.bench.gap import record_episodes
from robonas.config import parse_config
from robonas.export.trial_export import DeployableActor, trial_weights
from robonas.models.recalibrate import rescore_study
from robonas.models.twin_prediction import ActorController
from robonas.models.twins import identify_new
from robonas.search.loop import Search, SearchPlan
from robonas.store import Store
from sim.reality import make_reality

REPO = Path(__file__).resolve().parents[3]
ROBOTS = {"lab-a": "cartpole-lab-a", "laggy-c": "cartpole-laggy-c"}


def measured_returns(store: Store, trial, profile: str, episodes: int = 4) -> list[float]:
    """What the robot measures: the candidate's deterministic actor on the reality profile."""
    files = trial_weights(store, trial)
    actor = ActorController(
        DeployableActor.from_files(files["actor"], files["obs_norm"], files["spaces"], trial.arch)
    )
    out = []
    for seed in range(episodes):
        env = make_reality(profile)
        obs, _ = env.reset(seed=seed)
        actor.reset(1)
        total, done = 0.0, False
        while not done:
            action = actor(np.asarray(obs, np.float32)[None])[0]
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        env.close()
        out.append(total)
    return out


def record_deployed(store: Store, trial, profile: str, episodes: int = 4) -> list[Episode]:
    """What an agent records while it runs the deployed candidate on the robot (no exploration:
    a robot runs its policy as deployed)."""
    files = trial_weights(store, trial)
    actor = DeployableActor.from_files(files["actor"], files["obs_norm"], files["spaces"], trial.arch)
    return record_episodes(actor, profile, episodes, seed=2)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    url = f"sqlite:///{tmp / 'r.db'}"
    data = tomllib.loads((REPO / "launch" / "cartpole.toml").read_text())
    data["study"]["name"] = "fleet"
    data["budget"].update(trials=3, steps_per_trial=6000, checkpoints=2, eval_episodes=2)
    data["space"].update(depths=[1], widths=[16, 32])
    data["seed_check"] = {"top": 0}  # three trials, not a second seed of the best
    store = Store(url)
    Search(SearchPlan.build(parse_config(data), "fleet"), store, workers=2).run()
    data["budget"]["trials"] = 4  # a later run of the same study, once the robots have twins
    trials = store.trials(store.get_study("fleet").id, status="complete")
    assert len(trials) == 3
    for robot, profile in ROBOTS.items():
        store.add_device(robot, "rpi4")
        episodes = record_deployed(store, trials[0], profile)
        store.add_device_report(
            robot,
            "run",
            {"returns": [float(e.reward.sum()) for e in episodes], "record": encode(episodes)},
            trial_id=trials[0].id,
        )
        for t in trials:
            store.add_device_report(
                robot, "run", {"returns": measured_returns(store, t, profile)}, trial_id=t.id
            )
    lines = identify_new(store, ROBOTS)
    rescore_study(store, "fleet")
    Search(SearchPlan.build(parse_config(data), "fleet"), store, workers=2).run()
    # identified from 4 episodes of one deployed policy: each robot's bus delay, exactly
    assert [line.split(" delay ")[1][:7] for line in lines] == ["0 step(", "2 step("], lines
    yield store, url, trials
    store.close()


@pytest.mark.slow
def test_twins_rank_the_study_per_robot_and_over_the_fleet(study):
    store, url, trials = study
    _, models = rescore_study(store, "fleet")
    assert models["fleet_model"] == "fleet-mean(twin:lab-a@1, twin:laggy-c@1)"
    complete = store.trials(trials[0].study_id, status="complete")
    assert len(complete) == 4  # the trial trained after the twins were fitted is ranked by them too
    for t in complete:
        m = t.metrics
        assert m is not None and m.prediction_basis == "fleet_mean" and m.robots is not None
        assert set(m.robots) == {*ROBOTS, "(new robot)"}
        for p in (m.robots[r] for r in ROBOTS):
            assert p["lo90"] <= p["mean"] <= p["hi90"] and p["twin"].startswith("twin:")
            if "measured" in p:  # the pair's own episodes were measured: its prediction sits near them
                assert abs(p["mean"] - p["measured"]) <= max(0.25 * (p["hi90"] - p["lo90"]), 25.0)
        assert m.predicted_real_lo90 is not None and m.predicted_real_hi90 is not None
        assert m.twin_returns is not None and len(m.twin_returns) == 2
    out = subprocess.run(
        [sys.executable, "-m", "robonas.cli", "top", "fleet", "--robot", "laggy-c", "--json", "--store", url],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    table = json.loads(out.stdout)
    # one row per candidate: a repeated ask of the same network is a second seed of it
    candidates = {t.arch_id for t in store.trials(store.get_study("fleet").id, status="complete")}
    assert table["ranked_by"] == "predicted real return on laggy-c" and len(table["rows"]) == len(candidates)
    means = [r["predicted_real_return"] for r in table["rows"]]
    assert means == sorted(means, reverse=True)
    new = subprocess.run(
        [sys.executable, "-m", "robonas.cli", "top", "fleet", "--robot", "new-bot", "--json", "--store", url],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert new.returncode == 0, new.stderr
    fleet_level = json.loads(new.stdout)
    assert fleet_level["ranked_by"].endswith("(no record yet: the fleet-level prediction)")
    by_trial = {r["trial"]: r for r in table["rows"]}
    for row in fleet_level["rows"]:
        assert row["prediction_basis"] == "fleet"
        # a robot never heard from is less certain than one with a twin and measurements
        width = row["predicted_real_hi90"] - row["predicted_real_lo90"]
        known = by_trial[row["trial"]]
        assert width >= known["predicted_real_hi90"] - known["predicted_real_lo90"]
