"""robonas.models.recalibrate on a small stored study: real returns move the ranking, the strategy's
view is kept, the gap model needs enough (trial, robot) pairs, and `after_reports` says what it did."""

from __future__ import annotations

from pathlib import Path

import pytest

from robonas.errors import RobonasError
from robonas.metrics import TrialMetrics
from robonas.models.recalibrate import StudyEvidence, after_reports, calibrate_gap, rescore_study
from robonas.scoring import score
from robonas.space import Layer, PolicyArch
from robonas.store import Store, TrialRow

CONFIG = {
    "search": {
        "device": {"profile": "x86-host", "latency_budget_ms": 5.0},
        "objective": {"auc": 0.5, "real_return": 0.5, "lcb_z": 1.0, "ranking": "mean"},
        "gap": {},
    },
    "resolved": {"control_hz": 50.0, "return_lo": 0.0, "return_hi": 500.0},
}


def _arch(width: int) -> PolicyArch:
    return PolicyArch(obs_dim=4, act_dim=1, layers=(Layer(width, "tanh"),))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'r.db'}")
    yield s
    s.close()


def _study(store: Store, asymptotes: list[float]) -> list[TrialRow]:
    """A study whose trials were scored at the end of a search (heuristic models)."""
    from robonas.models.recalibrate import scoring_context

    study = store.create_study("s", CONFIG)
    ctx = scoring_context(store, study, use_calibrated=False)
    trials = []
    for seq, asym in enumerate(asymptotes):
        arch = _arch(8 * (seq + 1))
        t = store.add_trial(study.id, seq, arch)
        sim = TrialMetrics(auc=0.5, asymptotic_return=asym, robustness_return=asym, env_steps=1000)
        store.complete_trial(t.id, score(arch, sim, ctx), [(0, 0.0, 0.0), (1000, asym, 1.0)], 1.0, 1000)
        trials.append(store.get_trial(t.id))
    return trials


def test_real_returns_move_the_ranking_and_keep_what_the_strategy_was_told(store: Store):
    trials = _study(store, [480.0, 400.0, 300.0])
    told_before = {t.id: t.metrics.strategy_view("objective") for t in trials if t.metrics}
    # the best in simulation falls over on the robot
    store.add_device_report("robot-1", "run", {"returns": [60.0, 50.0, 70.0, 55.0]}, trial_id=trials[0].id)
    changes, models = rescore_study(store, "s")
    by_trial = {c.trial_id: c for c in changes}
    assert (by_trial[trials[0].id].rank_before, by_trial[trials[0].id].rank_after) == (1, 3)
    assert by_trial[trials[0].id].measured_real == pytest.approx(58.75)
    assert by_trial[trials[0].id].predicted_real_after < 100.0 < by_trial[trials[0].id].predicted_real_before
    assert [c.rank_after for c in changes] == [1, 2, 3]
    assert models == {"latency_model": "analytic-roofline@1", "gap_model": "heuristic-gap@1"}
    for t in store.trials(trials[0].study_id):
        assert t.metrics is not None and t.metrics.told == told_before[t.id]
    first = store.get_trial(trials[0].id).metrics
    assert first is not None and first.measured_episodes == 4 and first.model_real_return is not None


def test_gap_calibration_needs_three_pairs_then_stores_a_version(store: Store):
    trials = _study(store, [480.0, 400.0, 300.0, 200.0])
    store.add_device_report("robot-1", "run", {"returns": [400.0, 410.0]}, trial_id=trials[0].id)
    store.add_device_report("robot-1", "run", {"returns": [330.0]}, trial_id=trials[1].id)
    with pytest.raises(RobonasError, match="2 \\(trial, robot\\) pair"):
        calibrate_gap(store, "s")
    store.add_device_report("robot-2", "run", {"returns": [250.0, 240.0]}, trial_id=trials[2].id)
    evidence = StudyEvidence.read(store, "s")
    assert [(r.trial_id, r.device) for r in evidence.real] == [
        (trials[0].id, "robot-1"),
        (trials[1].id, "robot-1"),
        (trials[2].id, "robot-2"),
    ]
    _, version, metrics = calibrate_gap(store, "s", evidence)
    assert version == 1 and metrics["n"] == 3 and len(metrics["points"]) == 3
    _, models = rescore_study(store, "s")
    assert models["gap_model"] == "bayes-gap@1"


def test_canary_episodes_are_checks_unless_the_config_counts_them(store: Store):
    trials = _study(store, [480.0, 400.0])
    store.add_device_report("robot-1", "canary", {"returns": [90.0]}, trial_id=trials[0].id)
    store.add_device_report("robot-1", "run", {"returns": [300.0]}, trial_id=trials[1].id)
    assert [r.trial_id for r in StudyEvidence.read(store, "s").real] == [trials[1].id]
    study = store.get_study("s")
    search = {**study.config["search"], "calibration": {"canary_returns": True}}
    store.update_study_config(study.id, {**study.config, "search": search})
    assert [r.trial_id for r in StudyEvidence.read(store, "s").real] == [trials[0].id, trials[1].id]


def test_after_reports_says_what_it_refitted(store: Store):
    trials = _study(store, [480.0, 400.0])
    store.add_device("robot-1", "x86-host")
    store.add_device_report("robot-1", "run", {"returns": [100.0]}, trial_id=trials[0].id)
    lines = after_reports(store, ["s"], ["x86-host"])
    assert lines[0].startswith("latency model for x86-host: not refitted")
    assert any("at least 3 are needed" in line for line in lines)
    assert lines[-1].startswith(
        "re-ranked s with analytic-roofline@1, heuristic-gap@1: 2 of 2 trials moved"
    )  # they swap


def test_after_reports_refits_only_on_new_reports_and_can_be_turned_off(store: Store):
    trials = _study(store, [480.0, 400.0, 300.0])
    for t, ret in zip(trials, (100.0, 350.0, 280.0), strict=True):
        store.add_device_report("robot-1", "run", {"returns": [ret]}, trial_id=t.id)
    first = after_reports(store, ["s"], [])
    assert first[0].startswith("gap model for s: version 1 from 3 (trial, robot) pairs")
    assert after_reports(store, ["s"], []) == ["s: no new real returns (gap model version 1); not re-ranked"]
    assert after_reports(store, ["s"], [], refit=False)[0].startswith("automatic refitting is off")
    store.add_device_report("robot-2", "run", {"returns": [120.0]}, trial_id=trials[0].id)
    assert after_reports(store, ["s"], [])[0].startswith("gap model for s: version 2 from 4")
