"""`robonas bench gap` (`robonas.bench.gap`) on a tiny budget.

Candidates built by hand: three linear balancing controllers (gains on x, x_dot, theta,
theta_dot; gentle, medium, aggressive) as `twin_prediction.Controller`s and a weak one as a real
`DeployableActor` (a ReLU MLP whose two hidden units carry +/- the linear law), with made-up
simulation figures. Three robots (cartpole-lab-a, -laggy-c, -worn-b), 4 measured and 4 twin
episodes per (candidate, robot), twins from 3 records of the gentle controller, identification on
40 windows. About 20 s.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING

import numpy as np
import pytest

from robonas.bench.gap import (
    PREDICTORS,
    Candidate,
    CandidateSet,
    GapBench,
    GapData,
    collect,
    default_profiles,
    evaluate,
    loro,
)
from robonas.errors import RobonasError
from robonas.models.fleet_residual import ReturnStats
from robonas.models.gap_model import GapFeatures
from tests.robonas.models.test_twin_prediction import tiny_actor

if TYPE_CHECKING:
    from robonas.export.trial_export import DeployableActor

ENV = "sim/CartPole-v0"
ROBOTS = ["cartpole-lab-a", "cartpole-laggy-c", "cartpole-worn-b"]


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


def linear_actor(gains: tuple[float, ...]) -> DeployableActor:
    """The linear law as a trained trial's `DeployableActor` (history 1)."""
    return tiny_actor(gains, history=1)


def features(asymptote: float, robustness: float, p99_ms: float = 0.05) -> GapFeatures:
    return GapFeatures(asymptote, robustness, p99_ms, 20.0, 1000, 20.0, 500.0)


def candidates() -> CandidateSet:
    return CandidateSet(
        env_id=ENV,
        candidates=[
            Candidate("gentle", Linear((0.1, 0.2, 3.0, 0.5)), features(500.0, 480.0), 5.0),
            Candidate("medium", Linear((0.3, 0.6, 8.0, 1.2)), features(490.0, 420.0), 8.0),
            Candidate("aggressive", Linear((1.0, 2.0, 20.0, 3.0)), features(500.0, 300.0, 0.3), 5.0),
            Candidate("weak", linear_actor((0.0, 0.05, 1.0, 0.1)), features(300.0, 200.0), 20.0),
        ],
        return_lo=20.0,
        return_hi=500.0,
        return_max=500.0,
    )


@pytest.fixture(scope="module")
def data() -> GapData:
    return collect(
        candidates(), ROBOTS, episodes=4, twin_episodes=4, records=3, seed=0, max_windows=40, log=print
    )


@pytest.fixture(scope="module")
def bench(data: GapData) -> GapBench:
    return evaluate(data)


def test_the_table_has_five_predictors_with_finite_figures(bench: GapBench) -> None:
    rows = bench.rows()
    assert [r["predictor"] for r in rows] == list(PREDICTORS)
    for r in rows:
        assert 0.0 <= r["mae_share"] < 1.0, r
        assert 0.0 <= r["coverage90"] <= 1.0, r
        for key in ("spearman", "spearman_within"):
            assert r[key] is not None and math.isfinite(r[key]) and -1.0 <= r[key] <= 1.0, r
    for s in bench.scores:
        assert s.n == len(bench.candidates) * len(ROBOTS)
        assert set(s.mae_share_by_robot) == set(ROBOTS)
    assert bench.profiles == ROBOTS and bench.recorder == "gentle"
    assert all(info["identified"] for info in bench.robots), bench.robots
    # the gentle controller balances on every robot: twins of each from 3 records, delays found
    for info in bench.robots:
        assert info["records"] == 3 and info["delay"] == info["true_delay"], info
    # the robot-specific prediction tells the robots apart for a candidate that is not robust
    twin = {(p.candidate, p.robot): p for p in bench.predictions if p.predictor == "twin + residual"}
    assert {p.basis for p in twin.values()} == {"robot_prior"}
    assert all(p.lo90 <= p.mean <= p.hi90 for p in twin.values())
    d = bench.to_dict()
    assert json.loads(json.dumps(d))["rows"] == json.loads(json.dumps(rows))
    assert d["wall_s"] > 0 and set(d["seconds"]) >= {"measure", "identify", "twin_returns", "loro"}


def test_a_left_out_robot_is_never_fitted_on(data: GapData, bench: GapBench) -> None:
    for fold in bench.folds:
        others = sorted(r for r in ROBOTS if r != fold.robot)
        assert fold.robot not in fold.bayes_robots and fold.robot not in fold.residual_robots
        assert fold.bayes_robots == others and fold.residual_robots == others
        assert fold.residual_pairs == len(bench.candidates) * len(others)
    # Replace one robot's measured returns by nonsense: its predictions stay as they were, the
    # other robots' fitted predictions move (they did use them).
    left_out = "cartpole-laggy-c"
    nonsense = {
        k: (ReturnStats(0.0, 1.0, v.episodes) if k[1] == left_out else v) for k, v in data.measured.items()
    }
    changed, _ = loro(dataclasses.replace(data, measured=nonsense))
    before = {(p.predictor, p.candidate, p.robot): p for p in bench.predictions}
    moved = set()
    for p in changed:
        q = before[(p.predictor, p.candidate, p.robot)]
        if p.robot == left_out:
            assert (p.mean, p.lo90, p.hi90) == (q.mean, q.lo90, q.hi90), p
            assert p.measured == 0.0
        elif (p.mean, p.lo90, p.hi90) != (q.mean, q.lo90, q.hi90):
            moved.add(p.predictor)
    assert moved == {"bayesian gap", "twin + residual"}


def test_the_cli_prints_the_table(bench: GapBench, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import robonas.bench.gap
    from robonas.cli.bench import bench_app

    seen = {}

    def fake(**kwargs: object) -> GapBench:
        seen.update(kwargs)
        return bench

    monkeypatch.setattr(robonas.bench.gap, "bench_gap", fake)
    out = CliRunner().invoke(bench_app, ["gap", "--study", "s", "--profiles", "a, b", "--episodes", "3"])
    assert out.exit_code == 0, out.output
    for name in PREDICTORS:
        assert name in out.output
    assert "MAE % of range" in out.output and "wall time" in out.output
    assert seen["study"] == "s" and seen["profiles"] == ["a", "b"] and seen["episodes"] == 3
    lonely = CliRunner().invoke(bench_app, ["gap", "--store", "sqlite:///x.db"])
    assert lonely.exit_code != 0 and "--study" in str(lonely.exception)
    as_json = CliRunner().invoke(bench_app, ["gap", "--study", "s", "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert [r["predictor"] for r in json.loads(as_json.stdout)["rows"]] == list(PREDICTORS)


def test_default_robots_and_bad_input() -> None:
    assert default_profiles(ENV) == [
        "cartpole-ideal",
        "cartpole-lab-a",
        "cartpole-laggy-c",
        "cartpole-mcu-d",
        "cartpole-worn-b",
    ]
    cands = candidates()
    with pytest.raises(RobonasError, match="at least 2 reality profiles"):
        collect(cands, ["cartpole-lab-a"])
    with pytest.raises(RobonasError, match="sim/CartPoleSwingUp-v0 robot"):
        collect(cands, ["cartpole-lab-a", "swingup-lab-a"])
    with pytest.raises(RobonasError, match="unknown reality profile"):
        collect(cands, ["cartpole-lab-a", "no-such-robot"])
    with pytest.raises(RobonasError, match="records"):
        collect(cands, ROBOTS, records=0)


@pytest.mark.slow
def test_the_whole_benchmark_on_a_tiny_search() -> None:
    """A 2-trial search of launch/cartpole.toml in a temporary store, its trials loaded as
    candidates (`candidates_from_study`), two robots. About a minute."""
    from robonas.bench.gap import bench_gap

    lines: list[str] = []
    result = bench_gap(
        trials=2,
        steps=2000,
        workers=1,
        profiles=["cartpole-lab-a", "cartpole-laggy-c"],
        episodes=2,
        twin_episodes=2,
        records=3,
        max_windows=40,
        log=lines.append,
    )
    assert [r["predictor"] for r in result.rows()] == list(PREDICTORS)
    assert len(result.candidates) == 2 and result.candidates[0] == result.recorder
    assert all(c.startswith("trial ") for c in result.candidates)
    assert result.seconds["search"] > 0 and result.wall_s >= sum(result.seconds.values()) - 1e-6
    for r in result.rows():
        assert r["mae_share"] >= 0.0 and 0.0 <= r["coverage90"] <= 1.0
    # two candidates on one other robot: too few pairs to fit the Bayesian model, the prior stays
    assert all(f.bayes_robots == [] and f.robot not in f.residual_robots for f in result.folds)
    assert any(line.startswith("search: 2 complete") for line in lines), lines
