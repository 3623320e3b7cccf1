"""Robot twins in the store (`robonas.models.twins`) and `robonas identify` / `robonas twins`:
recorded runs in, a versioned twin per robot out, refitted only when new records arrive."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from device_agents.trajectory import encode
from robonas.errors import RobonasError
from robonas.models.twins import identify_new, load_twin, recorded_episodes, twins
from robonas.space import Layer, PolicyArch
from robonas.store import Store
from tests.robonas.models.test_twin_identification import record

REPO = Path(__file__).resolve().parents[3]
CONFIG = {"search": {"env": {"id": "sim/CartPole-v0"}}}


@pytest.fixture(scope="module")
def worn_records() -> list:
    return record("cartpole-worn-b", episodes=5, seed=1)


def _store_with_runs(url: str, runs: list[list]) -> tuple[Store, int]:
    store = Store(url)
    study = store.create_study("s", CONFIG)
    trial = store.add_trial(study.id, 0, PolicyArch(obs_dim=5, act_dim=1, layers=(Layer(8, "tanh"),)))
    for episodes in runs:
        payload = {"returns": [float(e.reward.sum()) for e in episodes], "record": encode(episodes)}
        store.add_device_report("worn", "run", payload, trial_id=trial.id)
    return store, trial.id


def test_recorded_episodes_are_the_newest_and_know_their_env(tmp_path, worn_records):
    store, _ = _store_with_runs(f"sqlite:///{tmp_path / 'r.db'}", [worn_records[:3], worn_records[3:]])
    env, episodes, last = recorded_episodes(store, "worn", max_episodes=3)
    assert env == "sim/CartPole-v0" and len(episodes) == 3
    # the newest report's two episodes, then the newest of the older report's
    assert [e.steps for e in episodes] == [worn_records[i].steps for i in (2, 3, 4)]
    assert last == max(r.id for r in store.device_reports(device="worn"))
    with pytest.raises(RobonasError, match=r"no recorded runs.*--record"):
        recorded_episodes(store, "someone-else")


def test_identify_new_fits_once_then_only_on_new_records(tmp_path, worn_records):
    store, trial_id = _store_with_runs(f"sqlite:///{tmp_path / 'r.db'}", [worn_records])
    first = identify_new(store, ["worn", "never-recorded"])
    assert len(first) == 1 and first[0].startswith("twin of worn: twin:worn@1 delay 1 step(s)"), first
    twin = load_twin(store, "worn")
    assert twin is not None and twin.fit.action_delay.steps == 1 and set(twins(store)) == {"worn"}
    assert identify_new(store, ["worn"]) == ["twin of worn: up to date (twin:worn@1)"]
    store.add_device_report(
        "worn", "run", {"returns": [1.0], "record": encode(worn_records[:2])}, trial_id=trial_id
    )
    assert identify_new(store, ["worn"])[0].startswith("twin of worn: twin:worn@2")


def test_identify_and_twins_commands(tmp_path, worn_records):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store, _ = _store_with_runs(url, [worn_records])
    store.close()

    def robonas(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "robonas.cli", *args, "--store", url],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )

    none = robonas("twins")
    assert none.returncode == 0 and "no twins yet" in none.stdout
    bad = robonas("identify", "nobody")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no recorded runs" in bad.stderr
    done = robonas("identify", "worn", "--episodes", "4")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("twin:worn@1: delay 1 step(s)") and "4 episodes" in done.stdout
    listed = json.loads(robonas("twins", "--json").stdout)
    assert listed["worn"]["version"] == 1 and listed["worn"]["twin"]["action_delay"]["steps"] == 1


def test_a_fleet_randomized_search_trains_and_scores_on_the_identified_robots(tmp_path, worn_records):
    import tomllib

    from robonas.config import parse_config
    from robonas.models.twins import fleet_randomization
    from robonas.search.loop import Search, SearchPlan

    url = f"sqlite:///{tmp_path / 'r.db'}"
    store, _ = _store_with_runs(url, [worn_records])
    data = tomllib.loads((REPO / "launch" / "cartpole.toml").read_text())
    data["study"]["name"] = "fleet-trained"
    data["budget"].update(trials=1, steps_per_trial=1024, checkpoints=2, eval_episodes=2)
    data["training"]["randomization"] = "fleet"
    data["robustness"] = "fleet"
    data["space"].update(depths=[1], widths=[16])
    data["seed_check"] = {"top": 0}  # one trial, not a second seed of it
    plan = SearchPlan.build(parse_config(data), "fleet-trained")
    with pytest.raises(RobonasError, match='randomization "fleet" needs identified twins'):
        Search(plan, store, workers=1).run()
    identify_new(store, ["worn"])
    ranges = fleet_randomization(store, "sim/CartPole-v0")
    assert ranges["action_delay"] == [1, 1]  # the worn cart-pole's bus delay
    fit = load_twin(store, "worn")
    assert fit is not None
    lo, hi = ranges["motor_gain"]
    assert lo <= fit.fit.params["motor_gain"].best <= hi and hi - lo < 0.2
    summary = Search(plan, store, workers=1).run()
    assert summary.complete == 1, store.trials(store.get_study("fleet-trained").id)
    resolved = store.get_study("fleet-trained").config["resolved"]
    assert resolved["fleet_randomization"] == ranges  # fixed for the study's later trials
    (trial,) = store.trials(store.get_study("fleet-trained").id, status="complete")
    assert trial.metrics is not None and trial.metrics.robustness_return is not None
