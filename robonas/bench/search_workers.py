"""`robonas bench search`: wall time and aggregate env steps/s of one search config at several
worker counts, each in a fresh temporary store, in the same run (the first count is the baseline
the others are compared with)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SearchBench:
    workers: int
    trials: int
    failed: int
    wall_s: float
    env_steps: int
    steps_per_s: float
    best_objective: float | None
    speedup: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_search(
    config_path: str, worker_counts: list[int], trials: int | None, steps: int | None, same_archs: bool = True
) -> list[SearchBench]:
    """With `same_archs`, the strategy is random search under the config's seed: its asks do not
    depend on results, so every worker count trains the same architectures in the same order
    and the comparison is like for like (an adaptive strategy's asks depend on how tells
    interleave with asks, which the worker count changes)."""
    from robonas.config import load_config
    from robonas.search.loop import Search, SearchPlan
    from robonas.store import Store

    results: list[SearchBench] = []
    for workers in worker_counts:
        cfg = load_config(config_path).with_overrides(trials=trials, steps=steps, workers=workers)
        if same_archs:
            cfg = cfg.model_copy(
                update={"strategy": cfg.strategy.model_copy(update={"name": "random", "options": {}})}
            )
        plan = SearchPlan.build(cfg, "bench")
        with tempfile.TemporaryDirectory(prefix="robonas-bench-") as tmp:
            store = Store(f"sqlite:///{Path(tmp) / 'bench.db'}")
            t0 = time.perf_counter()
            summary = Search(plan, store, workers).run()
            wall = time.perf_counter() - t0
            errors = [t.error for t in store.trials(store.get_study("bench").id, status="failed")]
            store.close()
        for e in errors:
            print(f"bench search: a trial failed with {workers} worker(s): {(e or '')[-300:]}")
        rate = summary.env_steps / wall
        # speed-up in aggregate env steps/s, so that a failed trial does not flatter a run
        base = results[0].steps_per_s if results else rate
        results.append(
            SearchBench(
                workers,
                summary.complete,
                summary.failed,
                wall,
                summary.env_steps,
                rate,
                summary.best_objective,
                rate / base,
            )
        )
    return results
