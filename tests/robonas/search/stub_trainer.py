"""A stand-in for `train_trial` that the search loop runs in its worker processes (imported by
name, like executor_tasks): it trains nothing, but reports a scripted learning curve through the
real `Reporter` (so pruning decides on the real store) and returns what `run_trial` returns.

The curve depends on the first layer's width, so a test can make some architectures learners
and others not:
- 8 or less: cannot learn (flat at the random return),
- 64: "lucky": the candidate's first training reaches 480, every later seed collapses to 120,
- anything else: learns steadily to 150 + 4 * width (16 -> 214, 32 -> 278, 48 -> 342).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from robonas.search.curves import asymptote, auc_normalised
from robonas.search.pruning import Reporter
from robonas.search.training import TrainSpec

RANDOM_RETURN = 20.0


def _final_return(spec: TrainSpec) -> float:
    width = spec.arch.layers[0].width
    if width <= 8:
        return RANDOM_RETURN
    if width == 64:
        marker = Path(spec.out_dir).parent / f"seen-{spec.arch.arch_id}"
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return 120.0
        return 480.0
    return 150.0 + 4.0 * width


def run_trial(payload: dict[str, Any]) -> dict[str, Any]:
    spec: TrainSpec = payload["spec"]
    Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
    final = _final_return(spec)
    reporter = Reporter(spec.report) if spec.report is not None else None
    curve: list[tuple[int, float, float]] = []
    pruned_at = None
    for k in range(1, spec.checkpoints + 1):
        step = math.ceil(spec.total_steps * k / spec.checkpoints)
        mean = RANDOM_RETURN + (final - RANDOM_RETURN) * (1 - math.exp(-3 * k / spec.checkpoints))
        curve.append((step, mean, 1.0))
        if reporter is not None and not reporter.report(curve):
            pruned_at = k
            break
    if reporter is not None:
        reporter.close()
    actor = Path(spec.out_dir) / "actor.pt"
    actor.write_bytes(spec.arch.to_json().encode())
    steps = [p[0] for p in curve]
    means = [p[1] for p in curve]
    a, a_std = asymptote(steps, means, ceiling=spec.return_max)
    return {
        "env_id": spec.env_id,
        "algo": spec.algo,
        "arch_id": spec.arch.arch_id,
        "curve": [list(p) for p in curve],
        "auc": auc_normalised(steps, means, spec.return_lo, spec.return_hi),
        "asymptotic_return": a,
        "asymptotic_std": a_std,
        "robustness_return": None,
        "random_return": RANDOM_RETURN,
        "env_steps": steps[-1],
        "wall_s": 0.01,
        "steps_per_s": steps[-1] / 0.01,
        "eval_s": 0.0,
        "artifacts": {"actor": str(actor)},
        "pruned_at": pruned_at,
        "eval_steps": 0,
        "seed": spec.seed,
    }
