"""Robot twins in the store: identify a robot from its recorded runs, keep every fit as a version.

A twin is a `TwinFit` (robonas.models.twin_identification) stored as a model version of kind
"twin" whose device is the robot's name, so each robot has its own history of fits and
`robonas top` can say which twin version predicted what. The episodes come from the robot's
run reports that carry a record (`robonas fleet run --record`); the newest `max_episodes` of
them are used, whatever policy produced them: identification replays the recorded actions, so
any policy's episodes inform the same twin.

A fit remembers the newest report it saw (`last_report_id`), so `identify_new` refits a robot
only when it has sent new records.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from robonas.errors import RobonasError
from robonas.models.twin_identification import TwinDataError, TwinFit, identify

if TYPE_CHECKING:
    from device_agents.trajectory import Episode
    from robonas.store import ModelVersionRow, Store

TWIN_KIND = "twin"
DEFAULT_EPISODES = 5


@dataclass(frozen=True)
class StoredTwin:
    robot: str
    version: int
    fit: TwinFit
    last_report_id: int | None
    created_at: datetime

    @property
    def label(self) -> str:
        return f"twin:{self.robot}@{self.version}"


def _stored(row: ModelVersionRow) -> StoredTwin:
    last = row.metrics.get("last_report_id")
    return StoredTwin(
        robot=str(row.device),
        version=row.version,
        fit=TwinFit.from_dict(row.params),
        last_report_id=last if isinstance(last, int) else None,
        created_at=row.created_at,
    )


def load_twin(store: Store, robot: str) -> StoredTwin | None:
    """The robot's newest twin, or None when it has never been identified."""
    row = store.latest_model_version(TWIN_KIND, device=robot)
    return None if row is None else _stored(row)


def twins(store: Store) -> dict[str, StoredTwin]:
    """The newest twin of every identified robot, by robot name."""
    newest: dict[str, ModelVersionRow] = {}
    for row in store.model_versions(TWIN_KIND):
        if row.device is not None:
            newest[row.device] = row  # rows come in id order: the last one wins
    return {robot: _stored(row) for robot, row in sorted(newest.items())}


def _env_of(store: Store, trial_ids: Iterable[int]) -> set[str]:
    envs = set()
    for tid in set(trial_ids):
        study = store.get_study_by_id(store.get_trial(tid).study_id)
        env = ((study.config.get("search") or {}).get("env") or {}).get("id")
        if isinstance(env, str):
            envs.add(env)
    return envs


def recorded_episodes(
    store: Store, robot: str, max_episodes: int = DEFAULT_EPISODES, env_id: str | None = None
) -> tuple[str, list[Episode], int | None]:
    """(env id, the robot's newest recorded episodes oldest first, id of the newest report used).

    The env is the one the recorded policies were trained on (through the report's trial), or
    `env_id` when given; records of another env are left out.
    """
    from robonas.fleet.reports import episodes_of, has_record

    reports = [r for r in store.device_reports(device=robot, kind="run") if has_record(r)]
    if not reports:
        raise TwinDataError(
            f"robot {robot!r} has no recorded runs; record some with "
            f"`robonas fleet run --record --agents {robot}` (identification needs a few episodes)"
        )
    if env_id is None:
        envs = _env_of(store, (r.trial_id for r in reports if r.trial_id is not None))
        if len(envs) != 1:
            raise TwinDataError(
                f"robot {robot!r}: its recorded runs are of envs {sorted(envs) or 'unknown'}; "
                "name the env to identify (--env ENV_ID)"
            )
        env_id = envs.pop()
    chosen: list[Episode] = []
    last: int | None = None
    for r in reversed(reports):  # newest first
        if r.trial_id is not None and _env_of(store, [r.trial_id]) - {env_id}:
            continue
        episodes = episodes_of(r)
        if not episodes:
            continue
        last = r.id if last is None else max(last, r.id)
        chosen = episodes[-(max_episodes - len(chosen)) :] + chosen
        if len(chosen) >= max_episodes:
            break
    return env_id, chosen, last


def identify_robot(
    store: Store,
    robot: str,
    *,
    max_episodes: int = DEFAULT_EPISODES,
    env_id: str | None = None,
    **options: Any,
) -> StoredTwin:
    """Identify `robot` from its newest recorded episodes and store the fit as its next twin."""
    env, episodes, last = recorded_episodes(store, robot, max_episodes, env_id)
    fit = identify(env, episodes, **options)
    row = store.add_model_version(
        TWIN_KIND,
        fit.to_dict(),
        {"last_report_id": last, "episodes": fit.episodes, "seconds": fit.seconds},
        device=robot,
    )
    return _stored(row)


def identify_new(store: Store, robots: Iterable[str]) -> list[str]:
    """Refit the twins of robots that sent records since their last fit; one line per robot."""
    from robonas.fleet.reports import has_record

    lines = []
    for robot in sorted(set(robots)):
        recorded = [r.id for r in store.device_reports(device=robot, kind="run") if has_record(r)]
        if not recorded:
            continue
        twin = load_twin(store, robot)
        if twin is not None and twin.last_report_id is not None and twin.last_report_id >= max(recorded):
            lines.append(f"twin of {robot}: up to date ({twin.label})")
            continue
        try:
            new = identify_robot(store, robot)
        except RobonasError as e:
            lines.append(f"twin of {robot}: not identified: {e}")
            continue
        lines.append(f"twin of {robot}: {new.label} {describe(new.fit)}")
    return lines


def describe(fit: TwinFit) -> str:
    """One line: the delay and every parameter with its uncertainty, or why it has none."""
    delay = fit.action_delay
    parts = [f"delay {delay.steps} step(s)" + ("" if delay.certain else f" (or {delay.runner_up})")]
    for name, p in fit.params.items():
        if p.identifiable and p.mean is not None and p.std is not None:
            parts.append(f"{name} {p.mean:.3g} +- {p.std:.2g}")
        else:
            parts.append(f"{name} not identifiable ({p.lo:.3g}..{p.hi:.3g})")
    return ", ".join(parts) + f"; {fit.episodes} episodes, {fit.seconds:.0f} s"


RANGE_PARAMS = ("mass_scale", "friction_scale", "damping", "motor_gain", "obs_noise_std")


def _param_range(fit: TwinFit, name: str) -> tuple[float, float]:
    p = fit.params[name]
    if name == "mass_scale" and fit.per_unit_mass:
        return p.best, p.best  # the gauge: the twin simulates per unit mass
    if p.identifiable and p.mean is not None and p.std is not None:
        return max(p.lo, p.best - 2 * p.std), min(p.hi, p.best + 2 * p.std)
    return p.lo, p.hi


def fleet_randomization(store: Store, env_id: str) -> dict[str, list[float] | list[int]]:
    """Randomisation ranges that cover every identified robot of `env_id`: per parameter, the
    union over the twins of its 95% range (the best value +- 2 std; the whole interval where the
    records could not pin it down), and every delay a twin finds plausible. What a search with
    `randomization = "fleet"` trains and scores under."""
    fleet = [t for t in twins(store).values() if t.fit.env_id == env_id]
    if not fleet:
        raise RobonasError(
            f'randomization "fleet" needs identified twins of {env_id} robots; none are stored '
            "(record runs with `robonas fleet run --record`, then `robonas identify ROBOT`)"
        )
    out: dict[str, list[float] | list[int]] = {}
    for name in RANGE_PARAMS:
        ranges = [_param_range(t.fit, name) for t in fleet]
        out[name] = [min(lo for lo, _ in ranges), max(hi for _, hi in ranges)]
    delays = [t.fit.action_delay.steps for t in fleet]
    delays += [
        t.fit.action_delay.runner_up
        for t in fleet
        if not t.fit.action_delay.certain and t.fit.action_delay.runner_up is not None
    ]
    out["action_delay"] = [min(delays), max(delays)]
    return out
