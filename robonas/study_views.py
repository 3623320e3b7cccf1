"""Read-only views of a study for the CLI: status counts and the ranked table."""

from __future__ import annotations

import math
from typing import Any

from robonas.scoring import pareto_front, ranking_key
from robonas.space import PolicyArch
from robonas.store import Store

STATUSES = ("complete", "running", "pending", "failed", "rejected")


def _ranking(study_config: dict[str, Any]) -> tuple[str, str]:
    """(metric, "mean" | "lcb") a study ranks by, from its stored config."""
    ranking = ((study_config.get("search") or {}).get("objective") or {}).get("ranking", "mean")
    return ranking_key(ranking), ranking


def _latency_budget_ms(study_config: dict[str, Any]) -> float | None:
    budget = ((study_config.get("search") or {}).get("device") or {}).get("latency_budget_ms")
    return float(budget) if isinstance(budget, (int, float)) else None


def study_status(store: Store, name: str) -> dict[str, Any]:
    study = store.get_study(name)
    trials = store.trials(study.id)
    key, _ = _ranking(study.config)
    complete = [t for t in trials if t.status == "complete"]
    best = max((t.metrics.get(key) for t in complete if t.metrics.get(key) is not None), default=None)
    search = study.config.get("search") or {}
    return {
        "study": study.name,
        "status": study.status,
        "env": (search.get("env") or {}).get("id"),
        "device": (search.get("device") or {}).get("profile"),
        "counts": {s: sum(t.status == s for t in trials) for s in STATUSES},
        "best_objective": None if best is None else round(best, 4),
        "env_steps": sum(t.env_steps or 0 for t in trials),
        "wall_s": sum(t.wall_s or 0.0 for t in trials),
        "updated_at": study.updated_at,
    }


def ranked_trials(store: Store, name: str, n: int = 10, include_unfinished: bool = False) -> dict[str, Any]:
    """Complete trials best first by the study's ranking, with the Pareto front marked."""
    study = store.get_study(name)
    key, ranked_by = _ranking(study.config)
    trials = store.trials(study.id)
    complete = [t for t in trials if t.status == "complete" and t.metrics and t.metrics.get(key) is not None]
    complete.sort(key=lambda t: (-t.metrics[key], t.seq))
    front = set(
        pareto_front(
            (t.id, t.metrics["predicted_real_return"], t.metrics["p99_ms"])
            for t in complete
            if math.isfinite(t.metrics["predicted_real_return"]) and math.isfinite(t.metrics["p99_ms"])
        )
    )
    models: dict[str, str] = {}
    for t in complete:
        for m in ("latency_model", "gap_model"):
            if t.metrics.get(m):
                models.setdefault(m, t.metrics[m])
    budget = _latency_budget_ms(study.config)
    rows = []
    for i, t in enumerate(complete[:n]):
        rows.append(_row(t, i + 1, t.id in front, budget))
    if include_unfinished:
        rows += [_row(t, None, False, budget) for t in trials if t.status != "complete"]
    return {
        "study": study.name,
        "ranked_by": f"{key} ({ranked_by})",
        "models": models,
        "latency_budget_ms": budget,
        "rows": rows,
    }


def best_within_budget(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Of `ranked_trials` rows, the best whose p99 (by the newest latency model) fits the budget.
    Trials pass the budget when they are asked; a latency model refitted on a robot's reports can
    later put one over it, and then it is no longer what `export --best` ships."""
    return next((r for r in rows if r["within_budget"]), None)


def _row(t, rank: int | None, pareto: bool, budget_ms: float | None = None) -> dict[str, Any]:
    m = t.metrics or {}
    p99 = m.get("p99_ms")
    return {
        "rank": rank,
        "trial": t.id,
        "seq": t.seq,
        "arch_id": t.arch_id,
        "arch": PolicyArch.from_json(t.arch_json).describe(),
        "objective": m.get("objective"),
        "objective_lcb": m.get("objective_lcb"),
        "auc": m.get("auc"),
        "asymptotic_return": m.get("asymptotic_return"),
        "robustness_return": m.get("robustness_return"),
        "predicted_real_return": m.get("predicted_real_return"),
        "measured_real_return": m.get("measured_real_return"),
        "measured_episodes": m.get("measured_episodes"),
        "model_real_return": m.get("model_real_return"),
        "p50_ms": m.get("p50_ms"),
        "p99_ms": m.get("p99_ms"),
        "params": m.get("params"),
        "pareto": pareto,
        "within_budget": None if p99 is None or budget_ms is None else bool(p99 <= budget_ms),
        "status": t.status,
        "error": t.error,
        "latency_model": m.get("latency_model"),
        "gap_model": m.get("gap_model"),
    }
