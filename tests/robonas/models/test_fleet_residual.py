"""The hierarchical residual across robots (`robonas.models.fleet_residual`) on synthetic fleets.

A synthetic fleet is made from known values: mu (what every twin misses in common), the robots'
offsets b_j (drawn once from N(0, tau^2) and then fixed), s (per-pair model error). Each pair
(candidate i, robot j) has a true twin return T_ij, a true robot return T_ij + mu + b_j + e_ij,
a twin mean over 10 episodes and a measured mean over 5, each with its sampling noise. The model
sees the means and their episode stds; the truth it is scored against is the robot's expected
return.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest

from robonas.models.fleet_residual import FleetResidual, Pair, Prediction, ResidualDataError, ReturnStats

MU, TAU, S = -20.0, 15.0, 8.0
TWIN_EPISODES, MEASURED_EPISODES = 10, 5
PRIOR_SCALE = 50.0  # a tenth of cart-pole's return range


@dataclass
class Fleet:
    pairs: dict[tuple[int, int], Pair]
    truth: dict[tuple[int, int], float]

    def twin(self, i: int, j: int) -> ReturnStats:
        return self.pairs[(i, j)].twin


def make_fleet(
    rng: np.random.Generator, offsets: np.ndarray, candidates: int, mu: float = MU, s: float = S
) -> Fleet:
    pairs, truth = {}, {}
    for j, b in enumerate(offsets):
        for i in range(candidates):
            t_true = rng.uniform(150.0, 450.0)
            sd_twin, sd_meas = rng.uniform(5.0, 40.0), rng.uniform(5.0, 30.0)
            twin_mean = t_true + rng.normal(0.0, sd_twin / math.sqrt(TWIN_EPISODES))
            real = t_true + mu + b + rng.normal(0.0, s)
            measured = real + rng.normal(0.0, sd_meas / math.sqrt(MEASURED_EPISODES))
            pairs[(i, j)] = Pair(
                f"c{i}",
                f"robot{j}",
                ReturnStats(twin_mean, sd_twin, TWIN_EPISODES),
                ReturnStats(measured, sd_meas, MEASURED_EPISODES),
            )
            truth[(i, j)] = real
    return Fleet(pairs, truth)


def covers(p: Prediction, value: float) -> bool:
    return p.lo90 <= value <= p.hi90


def test_intervals_cover_held_out_pairs_at_the_nominal_rate() -> None:
    """8 known robots; per replicate, 5 candidates measured on 7 robots fit the model, which then
    predicts 3 held-out candidates on those 7 robots (robot basis) and on the 8th, a robot with a
    twin and no record (robot_prior basis). 40 replicates: 840 + 120 intervals."""
    rng = np.random.default_rng(20240613)
    offsets = rng.normal(0.0, TAU, 8)
    seen: list[bool] = []
    unseen: list[bool] = []
    for _ in range(40):
        fleet = make_fleet(rng, offsets, candidates=8)
        train = [p for (i, j), p in fleet.pairs.items() if i < 5 and j < 7]
        model = FleetResidual.fit(train, prior_scale=PRIOR_SCALE)
        for (i, j), truth in fleet.truth.items():
            if i < 5:
                continue
            p = model.predict(f"robot{j}", fleet.twin(i, j))
            assert p.basis == ("robot" if j < 7 else "robot_prior")
            (seen if j < 7 else unseen).append(covers(p, truth))
    print(f"coverage: robots with records {np.mean(seen):.3f} ({len(seen)}), without {np.mean(unseen):.3f}")
    assert 0.85 <= np.mean(seen) <= 0.95
    # a robot without records leans on tau from 7 robots: honest, not over-confident
    assert np.mean(unseen) >= 0.85


def test_a_robot_without_data_gets_a_wider_interval() -> None:
    rng = np.random.default_rng(7)
    fleet = make_fleet(rng, rng.normal(0.0, TAU, 4), candidates=10)
    model = FleetResidual.fit([p for (i, j), p in fleet.pairs.items() if j < 3], prior_scale=PRIOR_SCALE)
    twin = fleet.twin(0, 3)
    with_data = model.predict("robot0", twin)
    without = model.predict("robot3", twin)
    fleet_level = model.predict_fleet({f"robot{j}": fleet.twin(0, j) for j in range(4)})
    assert (with_data.basis, without.basis, fleet_level.basis) == ("robot", "robot_prior", "fleet")
    width = {p.basis: p.hi90 - p.lo90 for p in (with_data, without, fleet_level)}
    assert width["robot_prior"] > 1.3 * width["robot"]
    # no twin either: the spread of the candidate's twins across robots adds to tau
    assert width["fleet"] > width["robot_prior"]
    assert without.std > with_data.std


def test_without_spread_between_robots_the_prediction_approaches_twin_plus_mu() -> None:
    rng = np.random.default_rng(3)
    fleet = make_fleet(rng, np.zeros(10), candidates=40, s=2.0)
    model = FleetResidual.fit(list(fleet.pairs.values()), prior_scale=PRIOR_SCALE)
    summary = model.summary()
    assert summary["tau"]["hi90"] < 3.0
    assert abs(summary["mu"]["mean"] - MU) < 3 * summary["mu"]["std"] < 3.0
    twin = ReturnStats(300.0, 0.0, TWIN_EPISODES)
    for robot in ("robot0", "robot9", "robot_new"):
        p = model.predict(robot, twin)
        assert abs(p.mean - (300.0 + MU)) < 2.0
        assert p.hi90 - p.lo90 < 15.0


def test_round_trip_and_json() -> None:
    rng = np.random.default_rng(11)
    fleet = make_fleet(rng, rng.normal(0.0, TAU, 3), candidates=6)
    model = FleetResidual.fit(list(fleet.pairs.values()), prior_scale=PRIOR_SCALE, bounds=(0.0, 500.0))
    text = json.dumps(model.to_dict())
    again = FleetResidual.from_dict(json.loads(text))
    twin = fleet.twin(2, 1)
    assert again.predict("robot1", twin) == model.predict("robot1", twin)
    p = model.predict("robot1", twin)
    assert json.loads(json.dumps(p.to_dict())) == p.to_dict()
    assert set(model.summary()["robots"]) == {"robot0", "robot1", "robot2"}


def test_bounds_clip_the_interval() -> None:
    rng = np.random.default_rng(5)
    fleet = make_fleet(rng, rng.normal(0.0, TAU, 3), candidates=6, mu=10.0)
    model = FleetResidual.fit(list(fleet.pairs.values()), prior_scale=PRIOR_SCALE, bounds=(0.0, 500.0))
    twin = ReturnStats(490.0, 5.0, TWIN_EPISODES)
    free = FleetResidual.fit(list(fleet.pairs.values()), prior_scale=PRIOR_SCALE).predict("robot0", twin)
    p = model.predict("robot0", twin)
    assert free.lo90 < 500.0 < free.hi90
    assert p.hi90 == 500.0 and p.lo90 == pytest.approx(free.lo90)
    assert p.mean < min(free.mean, 500.0) and p.std < free.std
    # wholly above the range: the interval collapses onto the bound
    assert model.predict("robot0", ReturnStats(700.0, 5.0, TWIN_EPISODES)).lo90 == 500.0


def test_fleet_objective() -> None:
    rng = np.random.default_rng(9)
    fleet = make_fleet(rng, rng.normal(0.0, TAU, 3), candidates=8)
    model = FleetResidual.fit(list(fleet.pairs.values()), prior_scale=PRIOR_SCALE)
    twins = {"robot0": ReturnStats(400.0, 10.0, 10), "robot1": ReturnStats(200.0, 10.0, 10)}
    mean = model.predict_objective(twins, "mean")
    worst = model.predict_objective(twins, "worst")
    assert (mean.basis, worst.basis) == ("fleet_mean", "fleet_worst")
    per_robot = [model.predict(r, t) for r, t in twins.items()]
    assert mean.mean == pytest.approx(np.mean([p.mean for p in per_robot]), abs=2.0)
    assert worst.mean == pytest.approx(per_robot[1].mean, abs=3.0)
    assert worst.mean < mean.mean
    assert model.predict_objective(twins, "worst") == worst  # seeded


def test_bad_input() -> None:
    with pytest.raises(ResidualDataError, match="at least one"):
        FleetResidual.fit([])
    with pytest.raises(ResidualDataError):
        ReturnStats(float("nan"), 1.0, 3)
    with pytest.raises(ResidualDataError):
        ReturnStats(1.0, 1.0, 0)
    assert ReturnStats.from_returns([500.0]) == ReturnStats(500.0, 0.0, 1)
