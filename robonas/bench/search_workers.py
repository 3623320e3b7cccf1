"""`robonas bench search`: how fast one search config runs at several worker counts on each trial
executor (the local process pool, Ray), every (executor, workers) pair in a fresh temporary store,
all in the same run. The first row measured is the baseline every row's ratios are taken against,
so a comparison never mixes figures from different machines, loads or library versions.

Leans on the search loop itself (`robonas.search.loop.Search`): what is timed is a whole
`Search.run()`, which builds its executor, so a Ray row pays for starting and stopping its local
Ray (or joining the cluster of `RAY_ADDRESS`) exactly as `robonas search --executor ray` does.
That cost is part of the row's wall time on purpose; `first_trial_s` shows where it lands.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class SearchBench:
    """One search: `trials` are the asked trials that completed, `pruned` those stopped early by
    pruning, `seed_trials` the seed check's extra trainings of the best candidates; all three
    trained and count in `trials_per_h` (failed ones do not, nor do their env steps)."""

    executor: str
    workers: int
    trials: int
    pruned: int
    seed_trials: int
    failed: int
    wall_s: float
    first_trial_s: float | None  # search start to the first trial finished (ok or not)
    env_steps: int
    steps_per_s: float
    trials_per_h: float
    best_objective: float | None
    # against the run's first row: its wall time over this one's (above 1: faster)...
    speedup: float
    # ...and this row's throughput over its (above 1: more per unit time)
    trials_per_h_ratio: float
    steps_per_s_ratio: float

    @property
    def trained(self) -> int:
        return self.trials + self.pruned + self.seed_trials

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trained": self.trained}


@dataclass(frozen=True)
class _Measured:
    """One search as measured, before the ratios against the baseline are known."""

    executor: str
    workers: int
    summary: Any  # robonas.search.loop.SearchSummary
    wall_s: float
    first_trial_s: float | None


def _ratio(num: float, den: float) -> float:
    # a baseline that did nothing (every trial failed) has nothing to compare with
    return num / den if den > 0 else float("nan")


def bench_search(
    config_path: str,
    worker_counts: Sequence[int],
    trials: int | None,
    steps: int | None,
    same_archs: bool = True,
    executors: Sequence[str] = ("local",),
    log: Callable[[str], None] = print,
) -> list[SearchBench]:
    """One row per (executor, workers), executors outermost, in the order given; ratios against
    the first row.

    With `same_archs`, the strategy is random search under the config's seed: its asks do not
    depend on results, so every row trains the same architectures in the same order (and each
    trial's training seed comes from its ask's ordinal) and the comparison is like for like (an
    adaptive strategy's asks depend on how tells interleave with asks, which the worker count and
    the executor change)."""
    from robonas.config import load_config
    from robonas.errors import ConfigError

    if not worker_counts or not executors:
        raise ConfigError("bench search needs at least one worker count and one executor")
    base_cfg = load_config(config_path)
    # every override checked (bad executor kind, non-positive counts) before anything is run
    configs = [
        (kind, workers, base_cfg.with_overrides(trials=trials, steps=steps, workers=workers, executor=kind))
        for kind in executors
        for workers in worker_counts
    ]
    measured: list[_Measured] = []
    for kind, workers, cfg in configs:
        if same_archs:
            cfg = cfg.model_copy(
                update={"strategy": cfg.strategy.model_copy(update={"name": "random", "options": {}})}
            )
        measured.append(_run_one(cfg, kind, workers, log))
    return _rows(measured)


def _run_one(cfg: Any, kind: str, workers: int, log: Callable[[str], None]) -> _Measured:
    from robonas.search.loop import Search, SearchPlan, SearchProgress
    from robonas.store import Store

    plan = SearchPlan.build(cfg, "bench")
    first: list[float] = []
    with tempfile.TemporaryDirectory(prefix="robonas-bench-") as tmp:
        store = Store(f"sqlite:///{Path(tmp) / 'bench.db'}")
        t0 = time.perf_counter()

        def on_trial(_summary: Any) -> None:
            if not first:
                first.append(time.perf_counter() - t0)

        try:
            # the trial files stay in the temporary directory whatever ROBONAS_ARTIFACTS says
            search = Search(
                plan, store, workers, progress=SearchProgress(on_trial=on_trial), artifact_dir=tmp
            )
            summary = search.run()
            wall = time.perf_counter() - t0
            errors = [t.error for t in store.trials(store.get_study("bench").id, status="failed")]
        finally:
            store.close()
    for e in errors:
        log(f"bench search: a trial failed on {kind} with {workers} worker(s): {(e or '')[-300:]}")
    return _Measured(kind, workers, summary, wall, first[0] if first else None)


def _rows(measured: list[_Measured]) -> list[SearchBench]:
    rows: list[SearchBench] = []
    for m in measured:
        s = m.summary
        trained = s.complete + s.pruned + s.seed_trials
        steps_per_s = s.env_steps / m.wall_s
        trials_per_h = trained / (m.wall_s / SECONDS_PER_HOUR)
        base = rows[0] if rows else None
        rows.append(
            SearchBench(
                executor=m.executor,
                workers=m.workers,
                trials=s.complete,
                pruned=s.pruned,
                seed_trials=s.seed_trials,
                failed=s.failed,
                wall_s=m.wall_s,
                first_trial_s=m.first_trial_s,
                env_steps=s.env_steps,
                steps_per_s=steps_per_s,
                trials_per_h=trials_per_h,
                best_objective=s.best_objective,
                speedup=1.0 if base is None else _ratio(base.wall_s, m.wall_s),
                trials_per_h_ratio=1.0 if base is None else _ratio(trials_per_h, base.trials_per_h),
                steps_per_s_ratio=1.0 if base is None else _ratio(steps_per_s, base.steps_per_s),
            )
        )
    return rows
