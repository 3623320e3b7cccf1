"""Every candidate on every robot: predicted real returns from the robots' twins.

For a study whose env has identified twins (`robonas.models.twins`):
1. each complete trial's returns in each twin (`twin_prediction.twin_stats`: episodes drawn over
   the twin's uncertainty), cached in the trial's metrics under the twin's label, so a re-rank
   replays a twin only when the twin or the trial is new;
2. the hierarchical residual across robots (`fleet_residual.FleetResidual`) fitted on every
   (trial, robot) pair with real returns;
3. per robot a prediction with its 90% interval: robots with a twin from their twin and their
   own offset, robots that reported but have no twin, and any robot not heard from yet
   (`NEW_ROBOT`), from the fleet level with the between-robot spread; a pair's own measured
   episodes then update its prediction (`scoring.with_measurements`);
4. the fleet objective that ranks the study: the mean (or, with `[objective] fleet = "worst"`, the
   worst) over the twinned robots, sampled from the joint posterior, updated by the trial's
   measured episodes like the gap model's prediction is.
With twins but no measured pair yet there is no residual to fit: the study stays ranked by the
gap model (`predict_fleet` returns None and says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from robonas.models.fleet_residual import FleetResidual, Objective, Pair, Prediction, ReturnStats
from robonas.models.twins import StoredTwin, twins

if TYPE_CHECKING:
    from robonas.models.recalibrate import StudyEvidence
    from robonas.store import Store, TrialRow

# The key under which each trial keeps the fleet-level prediction for a robot with no record yet
# (`robonas top --robot NAME` for a robot it has never heard from).
NEW_ROBOT = "(new robot)"
TWIN_EPISODES = 10
TWIN_SEED = 0


@dataclass(frozen=True)
class FleetPredictions:
    """What `predict_fleet` found for one study."""

    how: str  # "mean" or "worst" over the fleet's robots
    fleet: dict[int, Prediction]  # trial id -> the fleet objective's prediction
    robots: dict[int, dict[str, dict[str, Any]]]  # trial id -> robot -> prediction (to_dict)
    twin_returns: dict[int, dict[str, dict[str, Any]]]  # trial id -> twin label -> ReturnStats
    twins: dict[str, str] = field(default_factory=dict)  # robot -> twin label
    residual: dict[str, Any] = field(default_factory=dict)  # FleetResidual.summary()

    @property
    def label(self) -> str:
        """What ranked the study, for `robonas top`: the twins and the residual."""
        return f"fleet-{self.how}(" + ", ".join(sorted(self.twins.values())) + ")"


def _key(twin: StoredTwin) -> str:
    return f"{twin.label}/{TWIN_EPISODES}x{TWIN_SEED}"


def _twin_stats(
    store: Store, trial: TrialRow, fleet: dict[str, StoredTwin], env_kwargs: dict[str, Any]
) -> dict[str, ReturnStats]:
    """The trial's returns in each twin: cached ones from its metrics, the rest simulated now."""
    cached = dict((trial.metrics.twin_returns if trial.metrics else None) or {})
    out: dict[str, ReturnStats] = {}
    actor = None
    for robot, twin in fleet.items():
        if _key(twin) in cached:
            out[robot] = ReturnStats.from_dict(cached[_key(twin)])
            continue
        if actor is None:
            from robonas.export.trial_export import DeployableActor, trial_weights

            files = trial_weights(store, trial)
            actor = DeployableActor.from_files(files["actor"], files["obs_norm"], files["spaces"], trial.arch)
        from robonas.models.twin_prediction import twin_stats

        out[robot] = twin_stats(actor, twin.fit, TWIN_EPISODES, TWIN_SEED, env_kwargs=env_kwargs)
    return out


def predict_fleet(store: Store, evidence: StudyEvidence, how: str = "mean") -> FleetPredictions | None:
    """Per-robot and fleet predictions for every complete trial (None: no twins of the study's
    env, or no (trial, twinned robot) pair with real returns to fit the residual on)."""
    from robonas.scoring import with_measurements

    study = evidence.study
    search = study.config.get("search") or {}
    env = search.get("env") or {}
    resolved = study.config.get("resolved") or {}
    fleet = {robot: t for robot, t in twins(store).items() if t.fit.env_id == env.get("id")}
    if not fleet or not evidence.trials:
        return None
    lo, hi = float(resolved["return_lo"]), float(resolved["return_hi"])
    top = float(env.get("return_max") or hi)
    env_kwargs = dict(env.get("kwargs") or {})
    stats = {tid: _twin_stats(store, t, fleet, env_kwargs) for tid, t in evidence.trials.items()}
    pairs = [
        Pair(str(rr.trial_id), rr.device, stats[rr.trial_id][rr.device], ReturnStats.from_returns(rr.returns))
        for rr in evidence.real
        if rr.device in fleet
    ]
    if not pairs:
        return None
    residual = FleetResidual.fit(pairs, prior_scale=0.1 * (hi - lo), bounds=(min(lo, 0.0), top))
    measured: dict[int, dict[str, list[float]]] = {}
    for rr in evidence.real:
        measured.setdefault(rr.trial_id, {})[rr.device] = rr.returns
    untwinned = sorted({rr.device for rr in evidence.real} - set(fleet))
    objective: Objective = "worst" if how == "worst" else "mean"
    out_fleet, out_robots = {}, {}
    for tid, trial_stats in stats.items():
        robots: dict[str, dict[str, Any]] = {}
        for robot in fleet:
            robots[robot] = {
                **residual.predict(robot, trial_stats[robot]).to_dict(),
                "twin": fleet[robot].label,
            }
        for robot in [*untwinned, NEW_ROBOT]:
            robots[robot] = {**residual.predict_fleet(trial_stats).to_dict(), "twin": None}
        for robot, returns in measured.get(tid, {}).items():
            p = robots[robot]
            p["model_mean"], p["model_std"] = p["mean"], p["std"]
            p["mean"], p["std"] = with_measurements(p["mean"], p["std"], returns, hi - lo)
            p["measured"] = sum(returns) / len(returns)
        out_robots[tid] = robots
        out_fleet[tid] = residual.predict_objective(trial_stats, objective, seed=tid)
    return FleetPredictions(
        how=objective,
        fleet=out_fleet,
        robots=out_robots,
        twin_returns={
            tid: {_key(fleet[robot]): s.to_dict() for robot, s in trial_stats.items()}
            for tid, trial_stats in stats.items()
        },
        twins={robot: t.label for robot, t in fleet.items()},
        residual=residual.summary(),
    )
