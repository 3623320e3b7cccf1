"""Study views: the latency budget after recalibration, and what `export --best` ships."""

from __future__ import annotations

import pytest

from robonas.errors import RobonasError
from robonas.export.trial_export import _pick_trial
from robonas.metrics import TrialMetrics
from robonas.space import Layer, PolicyArch
from robonas.store import Store
from robonas.study_views import ranked_trials


def _study(tmp_path, p99s_and_objectives):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    study = store.create_study(
        "s", {"search": {"device": {"profile": "cortex-m7", "latency_budget_ms": 20.0}}}
    )
    ids = []
    for seq, (p99, objective) in enumerate(p99s_and_objectives):
        # one candidate per trial (the same arch twice would be two seeds of one candidate)
        arch = PolicyArch(obs_dim=4, act_dim=1, layers=(Layer(8 + seq, "tanh"),))
        t = store.add_trial(study.id, seq, arch)
        store.complete_trial(
            t.id,
            TrialMetrics(
                objective=objective,
                p99_ms=p99,
                p50_ms=p99 / 2,
                predicted_real_return=100.0 * objective,
                params=49,
            ),
            [(0, 0.0, 0.0)],
            1.0,
            10,
        )
        ids.append(t.id)
    return store, study, ids


def test_a_trial_over_the_budget_is_marked_and_not_the_best_to_ship(tmp_path):
    # the best trial by objective was refitted to 147 ms p99 on the robot's reports
    store, study, ids = _study(tmp_path, [(147.0, 0.9), (7.0, 0.6), (20.0, 0.5)])
    table = ranked_trials(store, "s")
    assert table.latency_budget_ms == 20.0
    assert [(r.trial, r.within_budget) for r in table.rows] == [
        (ids[0], False),
        (ids[1], True),
        (ids[2], True),
    ]  # the budget is inclusive
    best = table.best_within_budget()
    assert best is not None and best.trial == ids[1]
    assert _pick_trial(store, study, None).id == ids[1]
    assert _pick_trial(store, study, ids[0]).id == ids[0]  # --trial still ships it on purpose


def test_no_trial_within_the_budget_says_how_to_export_anyway(tmp_path):
    store, study, _ = _study(tmp_path, [(147.0, 0.9), (60.0, 0.6)])
    assert ranked_trials(store, "s").best_within_budget() is None
    with pytest.raises(RobonasError, match="--trial ID"):
        _pick_trial(store, study, None)


def test_ranking_for_a_robot_needs_predictions_from_twins(tmp_path):
    store, _, _ = _study(tmp_path, [(7.0, 0.6)])
    with pytest.raises(RobonasError, match=r"no predictions for robot .lab-a..*none yet"):
        ranked_trials(store, "s", robot="lab-a")
