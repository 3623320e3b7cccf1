"""`robonas bench search`: wall time and aggregate env steps/s of one search config at several
worker counts, each in a fresh temporary store, in the same run (the first count is the baseline
the others are compared with)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class SearchBench:
    workers: int
    trials: int
    wall_s: float
    env_steps: int
    steps_per_s: float
    best_objective: float | None
    speedup: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def bench_search(config_path: str, worker_counts: list[int], trials: int | None,
                 steps: int | None) -> list[SearchBench]:
    from robonas.config import load_config
    from robonas.search import Search, SearchPlan
    from robonas.store import Store

    results: list[SearchBench] = []
    for workers in worker_counts:
        cfg = load_config(config_path).with_overrides(trials=trials, steps=steps, workers=workers)
        plan = SearchPlan.build(cfg, "bench")
        with tempfile.TemporaryDirectory(prefix="robonas-bench-") as tmp:
            store = Store(f"sqlite:///{Path(tmp) / 'bench.db'}")
            t0 = time.perf_counter()
            summary = Search(plan, store, workers).run()
            wall = time.perf_counter() - t0
            store.close()
        base = results[0].wall_s if results else wall
        results.append(SearchBench(workers, summary.complete, wall, summary.env_steps,
                                   summary.env_steps / wall, summary.best_objective, base / wall))
    return results
