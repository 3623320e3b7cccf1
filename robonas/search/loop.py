"""The search loop: ask a strategy, check latency, train in workers, score, store, tell.

Resumable by construction, and shareable: any number of search processes, on one machine or
many, may work one study in one store. Every ask and every tell gets a number from one per-study
event counter, stored with the trial (`seq` for the ask, `tell_seq` for the tell), and is made
under the study's lock (`Store.study_lock`) after catching up: the strategy is built from its
seed once and fed, in event order, every ask and tell the store holds that it has not seen.
Strategies are deterministic under a seed and a call sequence, so every process's strategy is in
the state the study's history gives, and the ask it makes is the study's next one. The store
refuses an event that is not the next (a process that lost its lock), and the process then
rebuilds its strategy from the store.

Trials are claimed with leases (`Store.claim_trial`, renewed by `claims.LeaseKeeper`): a killed
process's trials run again, once, when its lease lapses (at once, on its own machine), and a live
process's trials are never taken. A trial's result is written only by the process that holds it,
in one transaction with its tell.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from robonas.config import SearchConfig
from robonas.errors import ClaimLost, ConfigError, EventOrderConflict, StoreError
from robonas.metrics import TrialMetrics
from robonas.scoring import (
    CandidateSeeds,
    ScoringContext,
    candidate_seeds,
    rank,
    strategy_view,
    told_view,
    within_budget,
)
from robonas.space import PolicyArch, SearchSpace
from robonas.store import Store, StudyRow, TrialRow

if TYPE_CHECKING:
    from robonas.search.claims import LeaseKeeper
    from robonas.search.executor import Executor, TaskResult
    from robonas.search.pruning import ReportSpec
    from robonas.search.training import TrainSpec
    from robonas.strategies.base import Strategy

TRIAL_FN = "robonas.search.trial_worker:run_trial"
log = logging.getLogger(__name__)
# Seconds an idle process waits between looks at a study other processes are still working.
IDLE_POLL_S = 2.0
# Times an ask or tell is tried again after another process wrote the same event number first.
ORDER_RETRIES = 5
FINISHED = ("complete", "failed", "rejected", "pruned")


@dataclass(frozen=True)
class EnvInfo:
    """What the search needs to know of the env before training anything."""

    obs_dim: int
    act_dim: int
    discrete: bool
    control_hz: float

    @classmethod
    def probe(cls, env_id: str, env_kwargs: dict[str, Any]) -> EnvInfo:
        import gymnasium

        import sim

        env = sim.make(env_id, **env_kwargs)
        try:
            obs_space, act_space = env.observation_space, env.action_space
            if len(obs_space.shape or ()) != 1:
                raise ConfigError(f"env.id: {env_id} has a non-flat observation space {obs_space}")
            discrete = isinstance(act_space, gymnasium.spaces.Discrete)
            if isinstance(act_space, gymnasium.spaces.Discrete):
                act_dim = int(act_space.n)
            else:
                act_dim = int((act_space.shape or (0,))[0])
            obs_dim = int((obs_space.shape or (0,))[0])
            # every sim env states its control rate (sim/envs/base.py)
            return cls(obs_dim, act_dim, discrete, float(env.unwrapped.control_hz))  # type: ignore[attr-defined]
        finally:
            env.close()


@dataclass
class SearchPlan:
    """A validated config turned into the objects the loop uses (nothing written yet)."""

    config: SearchConfig
    study_name: str
    env: EnvInfo
    space: SearchSpace
    scoring_context_args: dict[str, Any]

    @classmethod
    def build(cls, config: SearchConfig, study_name: str) -> SearchPlan:
        from robonas.models.devices import load_device
        from robonas.models.gap_model import HeuristicGapModel
        from robonas.models.latency_model import AnalyticLatencyModel
        from robonas.scoring import ObjectiveWeights
        from robonas.strategies import make_strategy

        config.validate_references()
        if config.training.tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise ConfigError(
                    "training.tensorboard needs TensorBoard: pip install 'robonas[tensorboard]'"
                )
        env = EnvInfo.probe(config.env.id, config.env.kwargs)
        space = SearchSpace.from_config(config.space, env.obs_dim, env.act_dim, start=tuned_start(config))
        make_strategy(config.strategy.name, space, config.strategy.seed, **config.strategy.options)
        try:
            gap_model = HeuristicGapModel(**config.gap)
        except TypeError as e:
            raise ConfigError(f"gap: {e}") from e
        weights = ObjectiveWeights(auc=config.objective.auc, real_return=config.objective.real_return)
        ctx_args = {
            "device": load_device(config.device.profile),
            "latency_model": AnalyticLatencyModel(),
            "gap_model": gap_model,
            "weights": weights,
            "control_hz": env.control_hz,
            "lcb_z": config.objective.lcb_z,
        }
        return cls(config, study_name, env, space, ctx_args)

    def new_strategy(self) -> Strategy:
        from robonas.strategies import make_strategy

        s = self.config.strategy
        return make_strategy(s.name, self.space, s.seed, **s.options)


@dataclass
class SearchSummary:
    study: str
    planned: int
    complete: int
    failed: int
    rejected: int
    best_objective: float | None  # the best candidate's mean over the seeds it was trained on
    best_trial: int | None  # its best seed
    wall_s: float
    env_steps: int
    interrupted: bool = False
    pruned: int = 0
    seed_trials: int = 0  # trials the seed check added (complete)
    best_seeds: int = 0
    best_spread: float | None = None  # std of the best candidate's figure across its seeds
    best_return: float | None = None  # its simulated asymptotic return, mean over its seeds

    @property
    def steps_per_s(self) -> float:
        return self.env_steps / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["steps_per_s"] = self.steps_per_s
        return d


@dataclass
class SearchProgress:
    """Callbacks the CLI hooks a display onto; all optional."""

    on_start: Callable[[int, int], None] = lambda planned, done: None
    on_trial: Callable[[SearchSummary], None] = lambda summary: None
    # one line per finished, failed, pruned or rejected trial (`trial_line`), as it happens
    on_line: Callable[[str], None] = lambda line: None


def trial_line(t: TrialRow) -> str:
    """One line about a trial that ended: what it was, how it did, how long it took."""
    m = t.metrics
    what = f"trial {t.id}{' (seed check)' if t.origin == 'seed' else ''} {t.status}"
    figures = []
    if m is not None and t.status in ("complete", "pruned"):
        figures.append(f"objective {m.objective:.3f}" if m.objective is not None else "objective -")
        if m.asymptotic_return is not None:
            figures.append(f"return {m.asymptotic_return:.1f}")
    if m is not None and m.p99_ms is not None:
        figures.append(f"p99 {m.p99_ms:.3f} ms")
    if t.wall_s is not None:
        figures.append(f"{t.wall_s:.1f} s")
    why = ""
    if t.status in ("failed", "rejected") and t.error:
        why = ": " + t.error.strip().splitlines()[-1][:300]
    return f"{what}  {'  '.join(figures)}  {t.arch.describe()}{why}"


def run_dir_for(store_url: str) -> Path:
    """Artifacts live beside a SQLite store, else under ./runs (studies record their own
    directory now: see robonas.artifact_location)."""
    from robonas.artifact_location import local_store_dir

    return local_store_dir(store_url) or Path("runs").resolve()


class Search:
    """One process's share of the loop over one study; construct, then `run()`.

    `artifact_dir` is where trial files go (the --artifacts flag); None: ROBONAS_ARTIFACTS, the
    config's [artifacts] dir, the study's recorded one, or beside a SQLite store.
    """

    def __init__(
        self,
        plan: SearchPlan,
        store: Store,
        workers: int,
        progress: SearchProgress | None = None,
        artifact_dir: str | None = None,
    ):
        from robonas.search.claims import worker_id

        self.plan = plan
        self.cfg = plan.config
        self.store = store
        self.workers = workers
        self.progress = progress or SearchProgress()
        self.artifact_dir = artifact_dir
        self.run_dir = run_dir_for(store.url) / "studies" / plan.study_name  # set by run()
        self.worker = worker_id()
        self.lease_s = self.cfg.executor.lease_s
        self.strategy = plan.new_strategy()
        self._asked: dict[int, PolicyArch] = {}  # trial id -> arch as the strategy asked it
        self._event = 0  # the next event the strategy has not seen
        # The strategy may hold a call the store refused (a lost lock or claim): rebuild it from
        # the store at the next catch-up.
        self._stale = False
        self._t0 = time.perf_counter()
        self._env_steps_this_run = 0
        # Known once run() has opened the study: its return range, the context that scores new
        # trials (the newest calibrated models).
        self.lo = self.hi = math.nan
        self.random_return: float | None = None
        self._scoring: ScoringContext | None = None
        # the fleet's ranges when the config says randomization = "fleet" (resolved once per study)
        self._fleet_ranges: dict[str, Any] | None = None
        self._executor_now: Executor | None = None
        self._keeper: LeaseKeeper | None = None
        self._log: TextIO | None = None  # the study's search.log, while run() runs
        self._log_handler: logging.Handler | None = None

    @property
    def ctx(self) -> ScoringContext:
        if self._scoring is None:
            raise RuntimeError("Search.ctx is set by run(); call run() first")
        return self._scoring

    # --- study set-up ----------------------------------------------------------------------
    def _open_study(self) -> StudyRow:
        fingerprint = self.cfg.fingerprint()
        try:
            study = self.store.get_study(self.plan.study_name)
        except StoreError:
            try:
                return self.store.create_study(
                    self.plan.study_name,
                    {"search": self.cfg.to_dict(), "fingerprint": fingerprint, "resolved": {}},
                )
            except StoreError:
                # another process created it between our look and our write
                study = self.store.get_study(self.plan.study_name)
        if study.config.get("fingerprint") != fingerprint:
            raise ConfigError(
                f"study {self.plan.study_name!r} exists with a different config (env, space, strategy, "
                "training or device changed); resume it with its own config or pass --study NEW"
            )
        return study

    def _resolve(self, study: StudyRow, key: str, value: Callable[[], Any]) -> Any:
        """A value fixed at the study's first run and recorded in its config (call under the
        study lock, so processes starting together agree on it)."""
        study = self.store.get_study_by_id(study.id)
        resolved = dict(study.config.get("resolved") or {})
        if key not in resolved:
            resolved[key] = value()
            self.store.update_study_config(study.id, {**study.config, "resolved": resolved})
        return resolved[key]

    def _random_return(self) -> float:
        """The random policy's mean return on the evaluation seeds (measured once per study)."""
        from robonas.search.training import random_returns

        arch = PolicyArch.from_dict(
            {"obs_dim": self.plan.env.obs_dim, "act_dim": self.plan.env.act_dim, "layers": [[8, "relu"]]}
        )
        return float(random_returns(self._spec(arch, Path("/nonexistent"), 0.0, 1.0)).mean())

    def _resolve_return_range(self, study: StudyRow) -> tuple[float, float]:
        self.random_return = float(self._resolve(study, "random_return", self._random_return))
        lo = self.cfg.env.return_floor
        if lo is None:
            lo = self.random_return
        if not self.cfg.env.return_target > lo:
            raise ConfigError(
                f"env.return_target: {self.cfg.env.return_target} is not above the floor {lo:.3g} "
                "(random policy's return unless env.return_floor is set)"
            )
        lo = float(self._resolve(study, "return_lo", lambda: lo))
        hi = float(self._resolve(study, "return_hi", lambda: self.cfg.env.return_target))
        # what re-scoring needs later without building the env again
        env = self.plan.env
        known = {"control_hz": env.control_hz, "obs_dim": env.obs_dim, "act_dim": env.act_dim}
        for key, value in {**known, "discrete": env.discrete}.items():
            self._resolve(study, key, functools.partial(_same, value))
        return lo, hi

    def _resolve_fleet_ranges(self, study: StudyRow) -> dict[str, Any] | None:
        """The identified fleet's randomisation ranges, fixed at the study's first run, so a
        resumed study trains and scores under the ranges its first trials had."""
        if not self.cfg.uses_fleet:
            return None
        from robonas.models.twins import fleet_randomization

        return dict(
            self._resolve(
                study, "fleet_randomization", lambda: fleet_randomization(self.store, self.cfg.env.id)
            )
        )

    def _artifact_root(self) -> Path:
        """Where this process writes trial files; checked before the study is touched, so a
        shared store without a shared directory is refused with nothing written."""
        from robonas.artifact_location import artifact_root

        try:
            study = self.store.get_study(self.plan.study_name)
            recorded = (study.config.get("resolved") or {}).get("artifact_dir")
        except StoreError:
            recorded = None
        return artifact_root(self.store.url, self.artifact_dir, self.cfg.artifacts.dir, recorded)

    def _ranges(self, table: dict[str, Any] | str | None) -> dict[str, Any] | None:
        if table == "fleet":
            return self._fleet_ranges
        return dict(table) if isinstance(table, dict) and table else None

    # --- the strategy, shared through the store ------------------------------------------
    @contextmanager
    def _section(self, study: StudyRow) -> Iterator[list[TrialRow]]:
        """Hold the study lock with the strategy caught up; yields the study's trials."""
        with self.store.study_lock(study.id):
            try:
                yield self._catch_up(study)
            except BaseException:
                self._stale = True
                raise

    def _catch_up(self, study: StudyRow) -> list[TrialRow]:
        """Feed the strategy every ask and tell in the store it has not seen, in event order."""
        if self._stale:
            self.strategy = self.plan.new_strategy()
            self._asked, self._event, self._stale = {}, 0, False
        trials = self.store.trials(study.id)
        events: list[tuple[int, int, TrialRow]] = []
        for t in trials:
            if t.seq >= self._event:
                events.append((t.seq, 0, t))
            if t.tell_seq is not None and t.tell_seq >= self._event:
                events.append((t.tell_seq, 1, t))
        events.sort(key=lambda e: (e[0], e[1]))
        for index, kind, t in events:
            if kind == 0 and t.origin == "seed":
                pass  # trained again by the seed check: never asked, never told
            elif kind == 0:
                asked = self.strategy.ask()
                self._asked[t.id] = asked
                if asked != t.arch:
                    # Strategies are deterministic, so a library changed under the study. The
                    # recorded arch is what trains; the strategy is told about its own ask.
                    log.warning(
                        "replay: trial %d was %s, the strategy now asks %s", t.id, t.arch_id, asked.arch_id
                    )
            else:
                self.strategy.tell(self._asked[t.id], told_view(t.metrics, self.cfg.objective.ranking))
            self._event = index + 1
        # Finished but never told (a store written by an older robonas, killed between the two
        # writes; results are told in their own transaction now): tell now.
        untold = [t for t in trials if t.origin == "ask" and t.tell_seq is None and t.status in FINISHED]
        for t in untold:
            self._tell(t.id, t.metrics if t.status in ("complete", "pruned") else None)
        return self.store.trials(study.id) if untold else trials

    def _tell(self, trial_id: int, metrics: TrialMetrics | None) -> None:
        self.strategy.tell(self._asked[trial_id], strategy_view(metrics, self.cfg.objective.ranking))
        self.store.record_tell(trial_id, self._next_event(), ordered=True)

    def _next_event(self) -> int:
        e = self._event
        self._event += 1
        return e

    def _asks_left(self, trials: list[TrialRow]) -> int:
        rejected = sum(t.status == "rejected" for t in trials)
        if rejected >= self.cfg.budget.max_rejections:
            return 0
        planned = sum(t.origin == "ask" and t.status != "rejected" for t in trials)
        return max(0, self.cfg.budget.trials - planned)

    def _in_order(self, step: Callable[[], Any]) -> Any:
        """Run a step that writes numbered events, again after another process wrote first."""
        for attempt in range(ORDER_RETRIES):
            try:
                return step()
            except EventOrderConflict as e:
                if attempt == ORDER_RETRIES - 1:
                    raise
                log.warning("%s; catching up and trying again", e)
        raise AssertionError("unreachable")

    # --- trials ---------------------------------------------------------------------------
    def _spec(
        self,
        arch: PolicyArch,
        out_dir: Path,
        lo: float,
        hi: float,
        seed: int = 0,
        report: ReportSpec | None = None,
    ) -> TrainSpec:
        from robonas.search.training import TrainSpec

        c = self.cfg
        return TrainSpec(
            env_id=c.env.id,
            env_kwargs=dict(c.env.kwargs),
            arch=arch,
            total_steps=c.budget.steps_per_trial,
            out_dir=str(out_dir),
            return_lo=lo,
            return_hi=hi,
            return_max=c.env.return_max,
            algo=c.training.algo,
            # the candidate's searched settings win over the config's fixed ones
            hyperparams={**c.training.hyperparams, **dict(arch.training)},
            n_envs=int(dict(arch.training).get("n_envs", c.training.n_envs)),
            checkpoints=c.budget.checkpoints,
            eval_episodes=c.budget.eval_episodes,
            early_eval_episodes=c.budget.early_eval_episodes,
            eval_seed=c.budget.eval_seed,
            randomization=self._ranges(c.robustness),
            train_randomization=self._ranges(c.training.randomization),
            seed=seed,
            report=report,
            random_return=self.random_return,
            tensorboard=c.training.tensorboard,
        )

    def _report_spec(self, trial: TrialRow) -> ReportSpec:
        """Checkpoints go to the store as they happen; asked trials may be pruned at rungs (the
        seed check's are not: a candidate's extra seeds must be seen whole)."""
        from robonas.search.pruning import ReportSpec, rungs_for

        p = self.cfg.pruning
        rungs: tuple[int, ...] = ()
        if p.kind == "asha" and trial.origin == "ask":
            rungs = rungs_for(self.cfg.budget.checkpoints, p.eta, p.min_rung)
        return ReportSpec(self.store.url, trial.study_id, trial.id, rungs, p.eta, p.grace)

    def _trial_seed(self, trial: TrialRow) -> int:
        # From the ask's ordinal, not its event number: how asks and tells interleave depends
        # on the worker count, and the n-th candidate must train the same way regardless.
        ordinal = sum(t.seq < trial.seq for t in self.store.trials(trial.study_id))
        digest = hashlib.sha256(f"{self.cfg.strategy.seed}:{ordinal}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

    def _submit(self, executor: Executor, trial: TrialRow) -> None:
        """Run a trial this process holds."""
        arch = trial.arch
        # the trial's id, the number every command takes (--trial N) and every line shows
        out_dir = self.run_dir / f"trial-{trial.id:04d}-{arch.arch_id}"
        spec = self._spec(
            arch, out_dir, self.lo, self.hi, seed=self._trial_seed(trial), report=self._report_spec(trial)
        )
        if self._keeper is not None:
            self._keeper.hold(trial.id)
        executor.submit(trial.id, TRIAL_FN, {"spec": spec}, self.cfg.budget.trial_timeout_s)

    def _next_trial(self, study: StudyRow) -> TrialRow | None:
        """A trial for a free worker: one nobody holds (a seed-check trial, or one whose holder is
        gone), else a new ask; None when the study has neither."""
        from robonas.search.claims import holder_is_gone

        claimed = self.store.claim_trial(study.id, self.worker, self.lease_s, lost=holder_is_gone)
        if claimed is not None:
            return claimed

        def ask() -> TrialRow | None:
            with self._section(study) as trials:
                return self._ask_new(study) if self._asks_left(trials) > 0 else None

        result: TrialRow | None = self._in_order(ask)
        return result

    def _ask_new(self, study: StudyRow) -> TrialRow | None:
        """Ask until a candidate fits the latency budget (under the study lock); rejected ones
        are recorded and told. The accepted one is added held by this process."""
        from robonas.scoring import latency_metrics

        rejected = sum(t.status == "rejected" for t in self.store.trials(study.id))
        while rejected < self.cfg.budget.max_rejections:
            arch = self.strategy.ask()
            seq = self._next_event()
            lat = latency_metrics(arch, self.ctx)
            p99 = float(lat.p99_ms or 0.0)
            if not within_budget(p99, self.cfg.device.latency_budget_ms):
                reason = (
                    f"predicted p99 {p99:.3f} ms over the budget "
                    f"{self.cfg.device.latency_budget_ms} ms on {lat.device} "
                    f"({self.ctx.model_versions()['latency_model']})"
                )
                t = self.store.add_trial(
                    study.id, seq, arch, status="rejected", ordered=True, error=reason, metrics=lat
                )
                self._asked[t.id] = arch
                self._tell(t.id, None)
                self._tell_user(t.id)
                rejected += 1
                continue
            t = self.store.add_trial(
                study.id, seq, arch, status="running", ordered=True, worker=self.worker, lease_s=self.lease_s
            )
            self._asked[t.id] = arch
            return t
        return None

    def _seed_round(self, study: StudyRow, trials: list[TrialRow]) -> list[TrialRow]:
        """Trials that train the `seed_check.top` best candidates again on other seeds, until each
        has `seed_check.seeds` (running and failed ones count, so a failing candidate is not
        retried forever). Asked only once every other trial is finished, and a whole round at a
        time, so which candidates are checked does not depend on the worker count: the round's
        results may re-rank the study and bring another candidate into the top, checked next round.
        Added `pending`, for whichever process claims them first.
        """
        check = self.cfg.seed_check
        if check.top == 0 or check.seeds <= 1:
            return []
        new: list[TrialRow] = []
        for best in rank(trials, self.cfg.objective.ranking)[: check.top]:
            tried = sum(
                t.arch_id == best.arch_id and t.status in ("complete", "running", "pending", "failed")
                for t in trials
            )
            for _ in range(check.seeds - tried):
                new.append(
                    self.store.add_trial(study.id, self._next_event(), best.arch, origin="seed", ordered=True)
                )
        return new

    def _idle(self, study: StudyRow) -> str:
        """With no trial running here: "more" (trials to claim or ask), "wait" (other processes
        still run trials, which may finish, or lapse and come back), or "done"."""

        def look() -> str:
            with self._section(study) as trials:
                if any(t.status == "pending" for t in trials) or self._asks_left(trials) > 0:
                    return "more"
                if any(t.status == "running" for t in trials):
                    return "wait"
                # every asked trial is finished: the seed check's next round, if any
                return "more" if self._seed_round(study, trials) else "done"

        state: str = self._in_order(look)
        return state

    def _finish(self, study: StudyRow, result: TaskResult) -> None:
        from robonas.scoring import score

        assert isinstance(result.task_id, int)  # the loop submits trial ids
        trial = self.store.get_trial(result.task_id)
        if not result.ok and result.lost and trial.attempts < self.cfg.executor.max_retries:
            self._run_again(trial, result)
            return
        try:
            if not result.ok:
                self._record_failure(study, trial, result.error or "unknown error", result.wall_s)
                self._tell_user(trial.id)
                return
            outcome: dict[str, Any] = result.value or {}
            try:
                sim = TrialMetrics(
                    auc=outcome["auc"],
                    asymptotic_return=outcome["asymptotic_return"],
                    asymptotic_std=outcome["asymptotic_std"],
                    robustness_return=outcome["robustness_return"],
                    random_return=outcome["random_return"],
                    env_steps=outcome["env_steps"],
                    wall_s=outcome["wall_s"],
                    steps_per_s=outcome["steps_per_s"],
                )
                metrics = score(trial.arch, sim, self.ctx)
            except Exception as e:  # noqa: BLE001  (a scoring bug must not kill the search: record it)
                self._record_failure(study, trial, f"scoring failed: {e!r}\n{traceback.format_exc(limit=3)}")
                self._tell_user(trial.id)
                return
            self._record_weights(trial.id, outcome["artifacts"])
            self._record_result(study, trial, metrics, outcome)
            self._env_steps_this_run += int(outcome["env_steps"])
            self._tell_user(trial.id)
        except ClaimLost as e:
            log.warning("%s", e)  # another process took the trial over and runs it
        finally:
            if self._keeper is not None:
                self._keeper.release(trial.id)

    def _run_again(self, trial: TrialRow, result: TaskResult) -> None:
        """The trial's process died without a result: run it again under the same claim."""
        log.warning(
            "trial %d: %s; running it again (attempt %d of %d)",
            trial.id,
            result.error,
            trial.attempts + 2,
            self.cfg.executor.max_retries + 1,
        )
        try:
            again = self.store.restart_attempt(trial.id, self.worker, self.lease_s)
        except ClaimLost as e:
            log.warning("%s", e)
            return
        assert self._executor_now is not None
        self._submit(self._executor_now, again)

    def _record_failure(
        self, study: StudyRow, trial: TrialRow, error: str, wall_s: float | None = None
    ) -> None:
        if trial.origin != "ask":  # the seed check's trials were never asked: nothing to tell
            self.store.fail_trial(trial.id, error, wall_s=wall_s, worker=self.worker)
            return

        def fail_and_tell() -> None:
            with self._section(study):
                self.strategy.tell(self._asked[trial.id], strategy_view(None, self.cfg.objective.ranking))
                self.store.fail_trial(
                    trial.id, error, wall_s=wall_s, worker=self.worker, tell_seq=self._event
                )
                self._event += 1

        self._in_order(fail_and_tell)

    def _record_result(
        self, study: StudyRow, trial: TrialRow, metrics: TrialMetrics, outcome: dict[str, Any]
    ) -> None:
        # A pruned trial keeps the figures of the curve it reached: the strategy learns it was
        # poor, the ranking leaves it out (it ranks complete trials only).
        status = "pruned" if outcome.get("pruned_at") is not None else "complete"
        args = (trial.id, metrics, outcome["curve"], outcome["wall_s"], outcome["env_steps"], status)
        if trial.origin != "ask":
            self.store.complete_trial(*args, worker=self.worker)
            return

        def complete_and_tell() -> None:
            with self._section(study):
                self.strategy.tell(self._asked[trial.id], strategy_view(metrics, self.cfg.objective.ranking))
                self.store.complete_trial(*args, worker=self.worker, tell_seq=self._event)
                self._event += 1

        self._in_order(complete_and_tell)

    def _tell_user(self, trial_id: int) -> None:
        """The trial's line to the study's log file and to the progress display."""
        line = trial_line(self.store.get_trial(trial_id))
        self._log_line(line)
        self.progress.on_line(line)

    def _log_line(self, line: str) -> None:
        if self._log is not None:
            self._log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def _open_log(self) -> None:
        """`search.log` in the study's folder, appended line by line as the search goes (several
        processes on one study append to the same file: each line is one write). Warnings of
        robonas's loggers (retries, lost claims) go there too."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "search.log"
        self._log = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115  (closed by _close_log)
        self._log_handler = logging.StreamHandler(self._log)
        self._log_handler.setLevel(logging.WARNING)
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("robonas").addHandler(self._log_handler)
        self._log_line(
            f"search process {self.worker} joins study {self.plan.study_name} "
            f"({self.cfg.budget.trials} trials planned, {self.workers} worker(s), {self.cfg.executor.kind})"
        )

    def _close_log(self, how: str) -> None:
        if self._log is None:
            return
        self._log_line(f"search process {self.worker} {how}")
        if self._log_handler is not None:
            logging.getLogger("robonas").removeHandler(self._log_handler)
        self._log.close()
        self._log = None

    def _record_weights(self, trial_id: int, artifacts: dict[str, str]) -> None:
        actor = Path(artifacts["actor"])
        sha = hashlib.sha256(actor.read_bytes()).hexdigest()
        self.store.add_artifact(trial_id, "weights", str(actor.parent), sha, meta=artifacts)

    def summary(self, study: StudyRow, interrupted: bool = False) -> SearchSummary:
        trials = self.store.trials(study.id)
        asked = [t for t in trials if t.origin == "ask"]
        by = {s: [t for t in asked if t.status == s] for s in ("complete", "failed", "rejected", "pruned")}
        candidates = list(candidate_seeds(trials, self.cfg.objective.ranking).values())
        best = candidates[0] if candidates else None
        return SearchSummary(
            study=study.name,
            planned=self.cfg.budget.trials,
            complete=len(by["complete"]),
            failed=len(by["failed"]),
            rejected=len(by["rejected"]),
            pruned=len(by["pruned"]),
            seed_trials=sum(t.origin == "seed" and t.status == "complete" for t in trials),
            best_objective=None if best is None else best.mean,
            best_seeds=0 if best is None else best.seeds,
            best_spread=None if best is None else best.std,
            best_return=None if best is None else _mean_return(best),
            best_trial=None if best is None else best.trials[0].id,
            wall_s=time.perf_counter() - self._t0,
            env_steps=self._env_steps_this_run,
            interrupted=interrupted,
        )

    def _newest_models(self, study: StudyRow, args: dict[str, Any]) -> dict[str, Any]:
        """The plan's scoring arguments with the newest calibrated models, where robots have
        reported: the latency model of the study's device and the study's gap model. New asks
        are then checked against the budget, and new trials scored, as `rescore_study` scores
        the old ones."""
        from robonas.models.gap_calibration import load_gap_model
        from robonas.models.latency_calibration import load_latency_model

        latency = load_latency_model(self.store, args["device"].name)
        gap = load_gap_model(self.store, study.id)
        return {
            **args,
            "latency_model": latency or args["latency_model"],
            "gap_model": gap or args["gap_model"],
        }

    # --- the loop -------------------------------------------------------------------------
    def run(self) -> SearchSummary:
        root = self._artifact_root()
        study = self._open_study()
        self.run_dir = root / "studies" / self.plan.study_name
        with self.store.study_lock(study.id):
            self._resolve(study, "artifact_dir", functools.partial(_same, str(root)))
            self.lo, self.hi = self._resolve_return_range(study)
            self._fleet_ranges = self._resolve_fleet_ranges(study)
        self._scoring = ScoringContext(
            return_lo=self.lo, return_hi=self.hi, **self._newest_models(study, self.plan.scoring_context_args)
        )
        self._open_log()
        try:
            return self._run(study)
        except BaseException as e:
            self._close_log(f"stopped: {type(e).__name__}: {e}")
            raise

    def _run(self, study: StudyRow) -> SearchSummary:
        from robonas.search.claims import LeaseKeeper

        trials = self.store.trials(study.id)
        done = sum(t.status in ("complete", "failed", "pruned") and t.origin == "ask" for t in trials)
        self.progress.on_start(self.cfg.budget.trials, done)
        self.store.set_study_status(study.id, "running")
        executor = self._executor_now = self._executor()
        self._keeper = keeper = LeaseKeeper(self.store, self.worker, self.lease_s).start()
        try:
            while True:
                while executor.running() < executor.capacity:
                    trial = self._next_trial(study)
                    if trial is None:
                        break
                    self._submit(executor, trial)
                if executor.running() == 0:
                    state = self._idle(study)
                    if state == "done":
                        break
                    if state == "wait":
                        time.sleep(IDLE_POLL_S)
                    continue
                for result in executor.poll(timeout=1.0):
                    self._finish(study, result)
                    self.progress.on_trial(self.summary(study))
        except KeyboardInterrupt:
            executor.shutdown(kill=True)
            keeper.stop()
            self.store.release_claims(study.id, self.worker)
            self.store.set_study_status(study.id, "interrupted")
            self._close_log("interrupted (Ctrl-C); the same command resumes")
            return self.summary(study, interrupted=True)
        except BaseException:
            executor.shutdown(kill=True)
            keeper.stop()
            self.store.release_claims(study.id, self.worker)
            raise
        executor.shutdown(kill=False)
        keeper.stop()
        self._rank_by_twins(study)
        self.store.set_study_status(study.id, "complete")
        summary = self.summary(study)
        self._close_log(
            f"done: {summary.complete} complete, {summary.failed} failed, {summary.rejected} rejected"
        )
        return summary

    def _executor(self) -> Executor:
        """Where trials run: worker processes here, or Ray tasks (`[executor] kind`)."""
        e = self.cfg.executor
        if e.kind == "ray":
            from robonas.search.ray_executor import RayExecutor

            return RayExecutor(
                workers=self.workers,
                address=e.address,
                cpus_per_trial=e.cpus_per_trial,
                max_retries=e.max_retries,
            )
        from robonas.search.executor import LocalProcessExecutor

        return LocalProcessExecutor(workers=self.workers)

    def _rank_by_twins(self, study: StudyRow) -> None:
        """Once robots of this env have twins, the study is ranked by the twins' predictions:
        re-score it so the trials this run added are ranked like the others (their twin returns
        are simulated now; the older trials' are cached)."""
        from robonas.errors import RobonasError
        from robonas.models.twins import twins

        if not any(t.fit.env_id == self.cfg.env.id for t in twins(self.store).values()):
            return
        from robonas.models.recalibrate import rescore_study

        try:
            rescore_study(self.store, study.name)
        except RobonasError as e:
            log.warning("%s: not re-ranked by the robots' twins: %s", study.name, e)


def _same(value: Any) -> Any:
    return value


def _mean_return(candidate: CandidateSeeds) -> float | None:
    returns = [r for t in candidate.trials if t.metrics and (r := t.metrics.asymptotic_return) is not None]
    return sum(returns) / len(returns) if returns else None


def tuned_start(config: SearchConfig) -> dict[str, Any]:
    """The tuned values of the searched trainer settings (explicit [training.hyperparams] win)."""
    names = list(config.space.get("training") or {})
    if not names:
        return {}
    from robonas.search.training import tuned_settings

    start = tuned_settings(config.training.algo, config.env.id, names)
    start.update({k: v for k, v in config.training.hyperparams.items() if k in names})
    return start


def default_workers() -> int:
    import os

    return max(1, os.cpu_count() or 1)


def study_name_for(config_path: str | Path, config: SearchConfig, override: str | None) -> str:
    return override or config.study.name or Path(config_path).stem


__all__ = ["EnvInfo", "Search", "SearchPlan", "SearchSummary", "run_dir_for"]
