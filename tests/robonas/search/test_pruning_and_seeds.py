"""ASHA pruning and the seed check, through the real search loop, store and worker processes, with
a scripted trainer (tests/robonas/search/stub_trainer.py) so the curves are known in advance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from robonas.config import parse_config
from robonas.search.loop import Search, SearchPlan
from robonas.search.pruning import Reporter, ReportSpec, promote, rung_value, rungs_for
from robonas.space import Layer, PolicyArch
from robonas.store import Store

STUB = "stub_trainer:run_trial"


def test_rungs_are_geometric_and_never_the_last_checkpoint():
    assert rungs_for(8, 3) == (1, 3)
    assert rungs_for(8, 2) == (1, 2, 4)
    assert rungs_for(16, 2) == (1, 2, 4, 8)
    assert rungs_for(2, 3) == (1,)
    assert rungs_for(8, 3, min_rung=3) == (3,)  # no rung in the first checkpoints
    assert rungs_for(8, 3, min_rung=4) == ()
    for c in range(2, 30):
        for eta in (2, 3, 4):
            assert all(1 <= r < c for r in rungs_for(c, eta))


def test_promote_keeps_the_top_share():
    assert promote(1.0, [], eta=3, grace=3)  # alone: nothing to halve
    assert promote(0.0, [5.0], eta=3, grace=3)  # two at the rung, grace 3: goes on
    assert not promote(0.0, [5.0, 6.0], eta=3, grace=3)  # three: only the best goes on
    assert promote(6.0, [5.0, 0.0], eta=3, grace=3)
    # six at the rung, eta 3: the best two go on
    assert promote(5.0, [6.0, 1.0, 2.0, 3.0, 4.0], eta=3, grace=3)
    assert not promote(4.0, [6.0, 5.0, 1.0, 2.0, 3.0], eta=3, grace=3)
    assert rung_value([10.0, 20.0, 90.0], 2) == 15.0


def test_reporter_writes_points_and_compares_with_rivals(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = Store(url)
    study = store.create_study("s", {})
    trials = [
        store.add_trial(study.id, i, PolicyArch(4, 1, (Layer(8 * (i + 1), "relu"),)), status="running")
        for i in range(3)
    ]
    for t, value in zip(trials[:2], (100.0, 200.0), strict=True):
        store.add_curve_point(t.id, 1000, value, 1.0)
    reporter = Reporter(ReportSpec(url, study.id, trials[2].id, rungs=(1,), eta=3, grace=3))
    assert not reporter.report([(1000, 50.0, 1.0)])  # third of three, worst: stopped
    assert store.curves(study.id)[trials[2].id] == [(1000, 50.0, 1.0)]
    reporter.close()
    good = Reporter(ReportSpec(url, study.id, trials[2].id, rungs=(1,), eta=3, grace=3))
    assert good.report([(1000, 250.0, 1.0)])  # rewritten at the same step, now the best
    assert good.report([(1000, 250.0, 1.0), (2000, 10.0, 1.0)])  # not a rung: always goes on
    good.close()


def _config(**sections: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "study": {"name": "stubbed"},
        "env": {"id": "sim/CartPole-v0", "return_target": 500.0, "return_floor": 20.0, "return_max": 500.0},
        "space": {
            "depths": [1],
            "widths": [8, 32, 64],
            "activations": ["relu"],
            "layer_norm": [False],
            "residual": [False],
            "shared_trunk": [False],
        },
        "strategy": {"name": "random", "seed": 3},
        "budget": {"trials": 8, "steps_per_trial": 8000, "checkpoints": 8},
        "objective": {"auc": 0.3, "real_return": 0.7},
        "device": {"profile": "rpi4", "latency_budget_ms": 5.0},
    }
    for name, table in sections.items():
        data[name] = {**data.get(name, {}), **table}
    return data


def _search(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    data: dict[str, Any],
    url: str | None = None,
    workers: int = 1,
):
    monkeypatch.setattr("robonas.search.loop.TRIAL_FN", STUB)
    monkeypatch.chdir(tmp_path)
    store = Store(url or f"sqlite:///{tmp_path / name / 'robonas.db'}")
    # a shared store's trial folders go where the search is told, never an implicit ./runs
    artifacts = None if url is None else str(tmp_path / "shared")
    summary = Search(
        SearchPlan.build(parse_config(data), name), store, workers=workers, artifact_dir=artifacts
    ).run()
    study = store.get_study(name)
    return summary, store, store.trials(study.id)


def test_asha_prunes_non_learners_at_the_first_rung_and_keeps_the_best(tmp_path, monkeypatch):
    # one learner (32 wide) and one that cannot learn (8 wide)
    space = {"widths": [8, 32]}
    no_check = {"top": 0}
    plain, _, plain_trials = _search(
        tmp_path, monkeypatch, "plain", _config(seed_check=no_check, space=space)
    )
    asha, store, trials = _search(
        tmp_path,
        monkeypatch,
        "asha",
        _config(seed_check=no_check, space=space, pruning={"kind": "asha", "eta": 3, "grace": 2}),
    )
    widths = [t.arch.layers[0].width for t in trials]
    assert 8 in widths and max(widths) > 8, widths  # the seed samples both kinds
    first_learner = min(t.seq for t in trials if t.arch.layers[0].width > 8)
    for t in trials:
        if t.arch.layers[0].width <= 8 and t.seq > first_learner:
            # stopped at the first checkpoint, with the steps it used recorded
            assert t.status == "pruned", (t.seq, t.status)
            assert t.env_steps == 1000
            assert len(store.curve(t.id)) == 1
        elif t.arch.layers[0].width > 8:
            assert t.status == "complete"
    assert asha.pruned >= 1
    assert asha.complete + asha.pruned == 8
    # the same asks (random strategy, same seed) and the same best, at a lower cost in steps
    assert [t.arch_id for t in trials] == [t.arch_id for t in plain_trials]
    assert asha.best_trial is not None and plain.best_trial is not None
    best = store.get_trial(asha.best_trial)
    assert best.arch_id == next(t.arch_id for t in plain_trials if t.id == plain.best_trial)
    assert asha.best_objective == pytest.approx(plain.best_objective)
    assert sum(t.env_steps or 0 for t in trials) < sum(t.env_steps or 0 for t in plain_trials)


def test_pruning_and_the_seed_check_on_postgresql_with_two_workers(tmp_path, monkeypatch, postgres_server):
    """Trials report from their worker processes into a PostgreSQL store, as on SQLite."""
    data = _config(
        seed_check={"top": 1, "seeds": 2},
        pruning={"kind": "asha", "eta": 3, "grace": 2},
        space={"widths": [8, 32]},
    )
    summary, store, trials = _search(tmp_path, monkeypatch, "pg", data, url=postgres_server, workers=2)
    assert summary.failed == 0 and summary.complete + summary.pruned == 8
    assert store.get_trial(summary.best_trial).arch.layers[0].width == 32 and summary.best_seeds >= 2
    for t in trials:
        points = store.curve(t.id)
        assert len(points) in ((1, 3) if t.status == "pruned" else (8,)), (t.status, points)
    for t in trials:
        (weights,) = store.artifacts(t.id, "weights")
        assert Path(weights.path).is_relative_to(tmp_path / "shared" / "studies" / "pg"), weights.path


def test_seed_check_reranks_a_lucky_candidate_and_reports_seeds(tmp_path, monkeypatch):
    data = _config(
        seed_check={"top": 2, "seeds": 3},
        budget={"trials": 6},
        space={"widths": [16, 32, 64]},
        strategy={"seed": 0},  # asks 64 once, 32 twice (a repeat counts as a seed), 16 three times
    )
    summary, store, trials = _search(tmp_path, monkeypatch, "seeded", data)
    asked = [t for t in trials if t.origin == "ask"]
    assert {t.arch.layers[0].width for t in asked} >= {32, 64}, "the seed asks both candidates"
    seed_trials = [t for t in trials if t.origin == "seed"]
    assert seed_trials, "the seed check trained candidates again"
    # the lucky candidate (480 on its first seed, 120 after) fell below the steady one
    best = store.get_trial(summary.best_trial)
    assert best.arch.layers[0].width == 32
    assert summary.best_seeds >= 3
    assert summary.best_spread is not None and summary.best_spread < 0.01
    from robonas.scoring import candidate_seeds

    ranked = list(candidate_seeds(trials).values())
    lucky = next(c for c in ranked if c.trials[0].arch.layers[0].width == 64)
    assert lucky.seeds >= 2 and lucky.std > 0.05
    assert ranked.index(lucky) > 0
    # seed trials were never told to the strategy; a resume replays without asking again
    assert all(t.tell_seq is None for t in seed_trials)
    again = Search(SearchPlan.build(parse_config(data), "seeded"), store, workers=1).run()
    assert again.best_trial == summary.best_trial
    assert len(store.trials(store.get_study("seeded").id)) == len(trials)


@pytest.mark.slow  # starts a local Ray
def test_a_search_on_the_ray_executor_prunes_and_checks_seeds_like_the_local_one(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'robonas[ray]')")
    space = {"widths": [8, 32]}
    pruning = {"kind": "asha", "eta": 3, "grace": 2}
    check = {"top": 1, "seeds": 2}
    local, _, local_trials = _search(
        tmp_path, monkeypatch, "local", _config(space=space, pruning=pruning, seed_check=check)
    )
    on_ray, _, trials = _search(
        tmp_path,
        monkeypatch,
        "ray",
        _config(space=space, pruning=pruning, seed_check=check, executor={"kind": "ray"}),
    )
    assert on_ray.failed == 0
    # one worker each: the same asks, the same pruning decisions, the same seed trials and best
    assert [(t.arch_id, t.status, t.origin) for t in trials] == [
        (t.arch_id, t.status, t.origin) for t in local_trials
    ]
    assert on_ray.best_objective == pytest.approx(local.best_objective)
    assert on_ray.best_seeds == local.best_seeds >= 2 and on_ray.pruned == local.pruned >= 1
