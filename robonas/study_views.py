"""Read-only views of a study for the CLI, the demo and export: status counts and the ranked table.

Rows are dataclasses (`RankedTrial`, `RankedTable`); `to_dict()` gives the JSON that
`robonas top --json` prints. The ranking itself is `robonas.scoring.rank`.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from robonas.errors import RobonasError
from robonas.metrics import TrialMetrics
from robonas.scoring import CandidateSeeds, candidate_seeds, pareto_front, rank, ranking_key, within_budget
from robonas.store import Store, StudyRow, TrialRow

STATUSES = ("complete", "running", "pending", "failed", "rejected", "pruned")


def study_ranking(study: StudyRow) -> str:
    """ "mean" or "lcb": what a study ranks by, from its stored config."""
    search = study.config.get("search") or {}
    return str((search.get("objective") or {}).get("ranking", "mean"))


def latency_budget_ms(study: StudyRow) -> float | None:
    budget = ((study.config.get("search") or {}).get("device") or {}).get("latency_budget_ms")
    return float(budget) if isinstance(budget, (int, float)) else None


@dataclass(frozen=True)
class StudyStatus:
    """`robonas status`: counts of trials by status, the best objective, totals."""

    study: str
    status: str
    env: str | None
    device: str | None
    counts: dict[str, int]
    best_objective: float | None  # the best candidate's mean over its seeds
    best_seeds: int
    failures: dict[int, str]  # failed trial id -> the last line of its error
    env_steps: int
    wall_s: float
    updated_at: datetime
    # running trials by the search process holding them ("host:pid:tag"), and how many of those
    # claims have lapsed (their process stopped renewing: another will run them again)
    running_by: dict[str, int] = field(default_factory=dict)
    lapsed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def study_status(store: Store, name: str) -> StudyStatus:
    study = store.get_study(name)
    trials = store.trials(study.id)
    running, now = [t for t in trials if t.status == "running"], time.time()
    candidates = list(candidate_seeds(trials, study_ranking(study)).values())
    best = candidates[0].mean if candidates else None
    search = study.config.get("search") or {}
    return StudyStatus(
        study=study.name,
        status=study.status,
        env=(search.get("env") or {}).get("id"),
        device=(search.get("device") or {}).get("profile"),
        counts={s: sum(t.status == s for t in trials) for s in STATUSES},
        best_objective=None if best is None else round(best, 4),
        best_seeds=candidates[0].seeds if candidates else 0,
        failures=_failure_reasons(trials),
        env_steps=sum(t.env_steps or 0 for t in trials),
        wall_s=sum(t.wall_s or 0.0 for t in trials),
        updated_at=study.updated_at,
        running_by=dict(Counter(t.worker or "unknown" for t in running)),
        lapsed=sum(t.lease_until is None or t.lease_until < now for t in running),
    )


def _failure_reasons(trials: list[TrialRow]) -> dict[int, str]:
    return {
        t.id: (t.error or "unknown error").strip().splitlines()[-1] for t in trials if t.status == "failed"
    }


@dataclass(frozen=True)
class RankedTrial:
    """One row of `robonas top`: a trial's rank, architecture and figures."""

    rank: int | None
    trial: int
    seq: int
    arch_id: str
    arch: str
    objective: float | None
    objective_lcb: float | None
    auc: float | None
    asymptotic_return: float | None
    robustness_return: float | None
    predicted_real_return: float | None
    measured_real_return: float | None
    measured_episodes: int | None
    model_real_return: float | None
    p50_ms: float | None
    p99_ms: float | None
    params: int | None
    pareto: bool
    # the predicted real return's std, 90% interval and basis ("gap-model", "fleet_mean", ...;
    # with --robot: that robot's prediction)
    predicted_real_std: float | None
    predicted_real_lo90: float | None
    predicted_real_hi90: float | None
    prediction_basis: str | None
    # every robot's prediction, once robots have twins: {robot: {mean, std, lo90, hi90, ...}}
    robots: dict[str, dict[str, Any]] | None
    # None when the trial has no latency figure or the study no budget
    within_budget: bool | None
    status: str
    error: str | None
    latency_model: str | None
    gap_model: str | None
    # the candidate (network and trainer settings) over the seeds it was trained on: how many,
    # and the mean and std of the ranking figure across them (this row is its best seed)
    seeds: int = 1
    seed_mean: float | None = None
    seed_std: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RankedTable:
    study: str
    ranked_by: str
    models: dict[str, str]
    latency_budget_ms: float | None
    rows: list[RankedTrial]

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "ranked_by": self.ranked_by,
            "models": self.models,
            "latency_budget_ms": self.latency_budget_ms,
            "rows": [r.to_dict() for r in self.rows],
        }

    def best_within_budget(self) -> RankedTrial | None:
        """The best ranked row whose p99 (by the newest latency model) fits the budget.
        Trials pass the budget when they are asked; a latency model refitted on a robot's reports
        can later put one over it, and then it is no longer what `export --best` ships."""
        return next((r for r in self.rows if r.rank is not None and r.within_budget), None)


def ranked_trials(
    store: Store,
    name: str,
    n: int | None = None,
    include_unfinished: bool = False,
    robot: str | None = None,
    every_seed: bool = False,
) -> RankedTable:
    """Complete trials best first by the study's ranking (every one unless `n` says fewer), with
    the Pareto front marked. `robot`: ranked by the predicted real return on that robot.
    One row per candidate (its best seed) unless `every_seed`: then its other seeds follow it,
    with its rank."""
    study = store.get_study(name)
    ranking = study_ranking(study)
    trials = store.trials(study.id)
    seeds = candidate_seeds(trials, ranking)
    complete = rank(trials, ranking)
    ranked_by = f"{ranking_key(ranking)} ({ranking}; mean over seeds less its standard error)"
    if robot is not None:
        complete = _rank_for_robot(complete, robot, name)
        known = any(robot in ((t.metrics.robots if t.metrics else None) or {}) for t in complete)
        ranked_by = f"predicted real return on {robot}" + (
            "" if known else " (no record yet: the fleet-level prediction)"
        )
    front = set(
        pareto_front(
            (t.id, m.predicted_real_return, m.p99_ms)
            for t in complete
            if (m := t.metrics) is not None
            and m.predicted_real_return is not None
            and m.p99_ms is not None
            and math.isfinite(m.predicted_real_return)
            and math.isfinite(m.p99_ms)
        )
    )
    models: dict[str, str] = {}
    for t in complete:
        assert t.metrics is not None  # rank() keeps scored trials only
        versions = (
            ("latency_model", t.metrics.latency_model),
            ("gap_model", t.metrics.gap_model),
            ("fleet_model", t.metrics.fleet_model),
        )
        for key, version in versions:
            if version:
                models.setdefault(key, version)
    budget = latency_budget_ms(study)
    shown = complete if n is None else complete[:n]
    rows = [
        _row(member, i + 1, member.id in front, budget, robot, seeds.get(t.arch_id))
        for i, t in enumerate(shown)
        for member in (seeds[t.arch_id].trials if every_seed and t.arch_id in seeds else (t,))
    ]
    if include_unfinished:
        rows += [_row(t, None, False, budget) for t in trials if t.status != "complete"]
    return RankedTable(
        study=study.name,
        ranked_by=ranked_by,
        models=models,
        latency_budget_ms=budget,
        rows=rows,
    )


def _robot_prediction(t: TrialRow, robot: str) -> dict[str, Any] | None:
    from robonas.models.robot_predictions import NEW_ROBOT

    robots = (t.metrics.robots if t.metrics else None) or {}
    return robots.get(robot, robots.get(NEW_ROBOT))


def _rank_for_robot(complete: list[TrialRow], robot: str, study: str) -> list[TrialRow]:
    from robonas.models.robot_predictions import NEW_ROBOT

    known = sorted({r for t in complete for r in ((t.metrics.robots if t.metrics else None) or {})})
    if robot not in known and NEW_ROBOT in known:
        robot = NEW_ROBOT  # never heard from: the fleet-level prediction, with the robots' spread
    if robot not in known:
        raise RobonasError(
            f"study {study!r} has no predictions for robot {robot!r}; robots with predictions: "
            + (
                ", ".join(known)
                or "none yet (record runs, `robonas identify` the robots, then `robonas rerank`)"
            )
        )

    def value(t: TrialRow) -> float:
        p = _robot_prediction(t, robot)
        return float(p["mean"]) if p is not None else -math.inf

    return sorted(complete, key=lambda t: (-value(t), t.seq))


def _row(
    t: TrialRow,
    rank: int | None,
    pareto: bool,
    budget_ms: float | None,
    robot: str | None = None,
    seeds: CandidateSeeds | None = None,
) -> RankedTrial:
    m = t.metrics or TrialMetrics()
    p = _robot_prediction(t, robot) if robot is not None else None
    if p is not None:  # the robot's own prediction in place of the fleet's
        m = replace(
            m,
            predicted_real_return=p["mean"],
            predicted_real_std=p["std"],
            predicted_real_lo90=p["lo90"],
            predicted_real_hi90=p["hi90"],
            prediction_basis=p["basis"],
        )
    fits = None if m.p99_ms is None or budget_ms is None else within_budget(m.p99_ms, budget_ms)
    return RankedTrial(
        rank=rank,
        trial=t.id,
        seq=t.seq,
        arch_id=t.arch_id,
        arch=t.arch.describe(),
        objective=m.objective,
        objective_lcb=m.objective_lcb,
        auc=m.auc,
        asymptotic_return=m.asymptotic_return,
        robustness_return=m.robustness_return,
        predicted_real_return=m.predicted_real_return,
        measured_real_return=m.measured_real_return,
        measured_episodes=m.measured_episodes,
        model_real_return=m.model_real_return,
        p50_ms=m.p50_ms,
        p99_ms=m.p99_ms,
        params=m.params,
        pareto=pareto,
        predicted_real_std=m.predicted_real_std,
        predicted_real_lo90=m.predicted_real_lo90,
        predicted_real_hi90=m.predicted_real_hi90,
        prediction_basis=m.prediction_basis,
        robots=m.robots,
        within_budget=fits,
        status=t.status,
        error=t.error,
        latency_model=m.latency_model,
        gap_model=m.gap_model,
        seeds=seeds.seeds if seeds is not None else 1,
        seed_mean=seeds.mean if seeds is not None else None,
        seed_std=seeds.std if seeds is not None else None,
    )
