"""Scoring: predicted real return, the normalised objective, the Pareto front and ranking."""

from __future__ import annotations

import itertools

import pytest

from robonas.errors import ConfigError, RobonasError
from robonas.metrics import TrialMetrics
from robonas.models.gap_model import GapPrediction
from robonas.models.latency_model import LatencyPrediction
from robonas.scoring import (
    SEED_SPREAD_Z,
    ObjectiveWeights,
    candidate_seeds,
    objective,
    objective_std,
    pareto_front,
    predicted_real_return,
    rank,
    within_budget,
)
from robonas.space import Layer, PolicyArch
from robonas.store import TrialRow


def test_predicted_real_return_subtracts_gap() -> None:
    assert predicted_real_return(800.0, GapPrediction(mean_gap=120.0, std_gap=30.0)) == (680.0, 30.0)


def test_weights_from_config() -> None:
    assert ObjectiveWeights.from_config({}) == ObjectiveWeights(0.5, 0.5)
    w = ObjectiveWeights.from_config({"auc": 2, "real_return": 0})
    assert (w.auc, w.real_return) == (2, 0)
    with pytest.raises(ConfigError) as e:
        ObjectiveWeights.from_config({"auc": 0.5, "return": 0.5})
    assert "'return'" in str(e.value) and "real_return" in str(e.value)
    with pytest.raises(ConfigError, match="auc"):
        ObjectiveWeights.from_config({"auc": -0.1})
    with pytest.raises(ConfigError, match="both 0"):
        ObjectiveWeights.from_config({"auc": 0, "real_return": 0})
    with pytest.raises(ConfigError, match="real_return"):
        ObjectiveWeights.from_config({"real_return": "high"})


def test_objective_hand_values() -> None:
    # auc is already normalised (curves.auc_normalised); real return 750 -> 0.75 on [0, 1000]
    assert objective(0.25, 750.0, 0.0, 1000.0) == pytest.approx(0.5)
    assert objective(0.25, 750.0, 0.0, 1000.0, ObjectiveWeights(1, 3)) == pytest.approx((0.25 + 2.25) / 4)
    assert objective(0.25, 750.0, 0.0, 1000.0, ObjectiveWeights(0, 1)) == pytest.approx(0.75)
    assert objective(0.25, 750.0, 0.0, 1000.0, ObjectiveWeights(1, 0)) == pytest.approx(0.25)
    # negative return ranges work too
    assert objective(0.5, -50.0, -100.0, 0.0) == pytest.approx(0.5)


def test_objective_in_unit_interval_and_return_clipped() -> None:
    aucs = [0.0, 0.1, 0.5, 0.99, 1.0]
    returns = [-5000.0, -1.0, 0.0, 123.0, 500.0, 999.0, 1000.0, 1e6]
    for auc, ret in itertools.product(aucs, returns):
        v = objective(auc, ret, 0.0, 1000.0)
        assert 0.0 <= v <= 1.0
    assert objective(0.0, -5000.0, 0.0, 1000.0) == 0.0  # the gap pushed the return below lo
    assert objective(1.0, 1e6, 0.0, 1000.0) == 1.0


def test_objective_refuses_unnormalised_auc() -> None:
    with pytest.raises(RobonasError, match="auc"):
        objective(250.0, 500.0, 0.0, 1000.0)
    assert objective(1.0 + 1e-12, 1000.0, 0.0, 1000.0) == 1.0  # round-off is tolerated


def test_objective_monotone_in_both_inputs() -> None:
    aucs = [0.0, 0.1, 0.4, 0.7, 1.0]
    returns = [0.0, 100.0, 400.0, 700.0, 1000.0]
    for a_fixed, r_fixed in zip(aucs, returns, strict=True):
        by_auc = [objective(a, r_fixed, 0.0, 1000.0) for a in aucs]
        by_ret = [objective(a_fixed, r, 0.0, 1000.0) for r in returns]
        assert all(b > a for a, b in itertools.pairwise(by_auc))
        assert all(b > a for a, b in itertools.pairwise(by_ret))


def test_objective_rejects_bad_range() -> None:
    with pytest.raises(ConfigError, match="return_hi"):
        objective(0.5, 1.0, 10.0, 10.0)


def test_objective_std_scales_with_weight_and_range() -> None:
    assert objective_std(100.0, 0.0, 1000.0) == pytest.approx(0.05)
    assert objective_std(100.0, 0.0, 1000.0, ObjectiveWeights(1, 0)) == 0.0


def test_pareto_front_known_set() -> None:
    points = [
        ("a", 100.0, 1.0),  # front: the fastest
        ("b", 90.0, 2.0),  # dominated by a (lower return, slower)
        ("c", 200.0, 3.0),  # front
        ("d", 200.0, 4.0),  # dominated by c (same return, slower)
        ("e", 300.0, 10.0),  # front: the best return
        ("f", 150.0, 3.0),  # dominated by c (same latency, lower return)
        ("g", 200.0, 3.0),  # duplicate of c: neither dominates the other
    ]
    assert pareto_front(points) == ["a", "c", "e", "g"]
    assert pareto_front(reversed(points)) == ["g", "e", "c", "a"]  # stable: input order kept
    assert pareto_front([]) == []
    assert pareto_front([("only", 1.0, 1.0)]) == ["only"]


def _trial(
    tid: int,
    objective: float,
    std: float,
    status: str = "complete",
    width: int | None = None,
    real: float | None = None,
) -> TrialRow:
    # lower confidence bound with k=1, as ScoringContext(lcb_z=1.0) stores it
    metrics = TrialMetrics(
        objective=objective, objective_std=std, objective_lcb=objective - std, predicted_real_return=real
    )
    # one candidate per trial unless a width is shared (then they are seeds of one candidate)
    arch = PolicyArch(obs_dim=4, act_dim=1, layers=(Layer(width or 8 * tid, "tanh"),))
    return TrialRow(
        id=tid, study_id=1, seq=tid, arch_id=arch.arch_id, arch=arch, status=status, error=None,
        metrics=metrics, tell_seq=None, attempts=0, started_at=None, finished_at=None, wall_s=None,
        env_steps=None,
    )  # fmt: skip


def test_rank_by_key_stable_and_lcb() -> None:
    rows = [_trial(1, 0.6, 0.30), _trial(2, 0.7, 0.01), _trial(3, 0.6, 0.00), _trial(4, 0.8, 0.60)]
    assert [r.id for r in rank(rows)] == [4, 2, 1, 3]  # ties (1, 3) keep ask order
    # lower confidence bound with k=1: 0.3, 0.69, 0.6, 0.2 -> the certain candidates rise
    assert [r.id for r in rank(rows, "lcb")] == [2, 3, 1, 4]
    # only complete trials with the figure are ranked
    assert [r.id for r in rank([*rows, _trial(5, 0.9, 0.0, status="failed")])] == [4, 2, 1, 3]
    with pytest.raises(ConfigError, match="real_return"):
        rank(rows, "real_return")


def test_rank_groups_seeds_of_a_candidate_and_charges_their_spread() -> None:
    # candidate A (width 64): one lucky seed 0.9, two poor ones; candidate B (width 32): steady
    rows = [
        _trial(1, 0.9, 0.0, width=64),
        _trial(2, 0.7, 0.0, width=32),
        _trial(3, 0.3, 0.0, width=64),
        _trial(4, 0.72, 0.0, width=32),
        _trial(5, 0.3, 0.0, width=64),
        _trial(6, 0.5, 0.0, width=16),
    ]
    seeds = candidate_seeds(rows)
    ranked = list(seeds.values())
    assert [c.trials[0].id for c in ranked] == [4, 6, 1]  # B, then the single-seed C, then A
    b, c, a = ranked
    assert b.seeds == 2 and b.mean == pytest.approx(0.71) and b.std == pytest.approx(0.01414, abs=1e-4)
    assert a.seeds == 3 and a.mean == pytest.approx(0.5) and a.std == pytest.approx(0.3464, abs=1e-4)
    assert a.figure == pytest.approx(0.5 - SEED_SPREAD_Z * a.std / 3**0.5)
    assert c.std == 0.0 and c.figure == 0.5
    # rank gives each candidate's best seed, in that order
    assert [r.id for r in rank(rows)] == [4, 6, 1]
    # before its other seeds were known, A's lucky seed led
    assert [r.id for r in rank(rows[:2])] == [1, 2]


def test_the_seed_that_ships_is_the_best_final_policy_not_the_fastest_learner() -> None:
    # seed 1 learned sooner (a higher objective: its AUC) but ended worse than seed 2
    rows = [_trial(1, 0.93, 0.0, width=64, real=420.0), _trial(2, 0.90, 0.0, width=64, real=446.0)]
    (candidate,) = candidate_seeds(rows).values()
    assert [t.id for t in candidate.trials] == [2, 1]
    assert [t.id for t in rank(rows)] == [2]
    assert candidate.mean == pytest.approx(0.915)  # the ranking figure is still over both seeds


def test_budget_check_uses_p99() -> None:
    pred = LatencyPrediction(p50_ms=1.0, p99_ms=3.0)
    assert within_budget(pred.p99_ms, 3.0)
    assert not within_budget(pred.p99_ms, 2.0)  # the median fits, the tail does not
    for bad in (0, -1.0, float("nan"), "5"):
        with pytest.raises(ConfigError, match="budget_ms"):
            within_budget(pred.p99_ms, bad)  # type: ignore[arg-type]


def test_measured_episodes_outweigh_the_model_once_a_robot_has_spoken():
    from robonas.scoring import with_measurements

    # the model expected 400 +- 50; six real episodes averaged 53
    mean, std = with_measurements(400.0, 50.0, [40, 60, 55, 50, 48, 65], return_range=500.0)
    assert 50 < mean < 70 and std < 10
    # one noisy episode moves the prediction less than six consistent ones
    one, _ = with_measurements(400.0, 50.0, [53.0], return_range=500.0)
    assert mean < one < 400.0
    # no spread in the episodes does not mean certainty: the noise is floored
    flat, flat_std = with_measurements(400.0, 50.0, [500.0] * 3, return_range=500.0)
    assert flat_std > 0 and flat < 500.0
