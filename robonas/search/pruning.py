"""Asynchronous successive halving (ASHA, Li et al. 2020) on the checkpoints trials already report.

A running trial writes each checkpoint evaluation to the store as it happens (`Reporter`), and at
a rung (a checkpoint ordinal, see `rungs_for`) it compares itself with every other trial of the
study that reached the same rung: it goes on only if it is in the top 1/eta of them. Nothing waits
for anyone: a trial decides with what the store holds when it gets there, which is what makes the
halving asynchronous and lets it compose with any strategy and any number of workers.

Why written here rather than with Optuna's `SuccessiveHalvingPruner`: Optuna's pruners read
intermediate values from an Optuna storage, and robonas's trials live in robonas's store (with
the curve points the reports and views already use). The rule itself is a few lines:

- the value at rung n is the mean of the first n checkpoint returns (an area under the curve so
  far, so one unlucky evaluation does not decide),
- with fewer than `grace` trials at a rung (itself included), everyone goes on (there is nothing
  to halve yet),
- else the trial goes on when its value is at least the k-th best, k = max(1, count // eta).
The final checkpoint is never a rung: a trial that got there is complete.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from robonas.errors import ConfigError

if TYPE_CHECKING:
    from robonas.store import Store


@dataclass(frozen=True)
class ReportSpec:
    """Where a running trial reports its checkpoints, and where it may be stopped (picklable)."""

    store_url: str
    study_id: int
    trial_id: int
    rungs: tuple[int, ...] = ()  # checkpoint ordinals (1-based) with a decision; () records only
    eta: int = 3
    grace: int = 3


def rungs_for(checkpoints: int, eta: int, min_rung: int = 1) -> tuple[int, ...]:
    """Checkpoint ordinals at checkpoints/eta, checkpoints/eta^2, ... (rounded, at least 1),
    geometric in training steps as in successive halving; never the last checkpoint, and none
    before `min_rung` (an off-policy learner such as SAC shows nothing in its first thousands of
    steps: judging it there would be judging noise)."""
    if not isinstance(eta, int) or eta < 2:
        raise ConfigError(f"pruning.eta: {eta!r} is not an integer >= 2")
    rungs: set[int] = set()
    k = 1
    while checkpoints / eta**k >= 0.5:
        rungs.add(max(1, round(checkpoints / eta**k)))
        k += 1
    return tuple(sorted(r for r in rungs if min_rung <= r < checkpoints))


def rung_value(means: Sequence[float], rung: int) -> float:
    """The figure compared at a rung: mean of the first `rung` checkpoint returns."""
    return float(sum(means[:rung]) / rung)


def promote(value: float, rivals: Sequence[float], eta: int, grace: int) -> bool:
    """True when a trial with `value` at a rung goes on, given the other trials' values there."""
    count = len(rivals) + 1
    if count < grace:
        return True
    k = max(1, count // eta)
    kth_best = sorted([value, *rivals], reverse=True)[k - 1]
    return value >= kth_best or math.isclose(value, kth_best)


class Reporter:
    """The running trial's side: write each checkpoint, decide at rungs. Opens the store lazily
    in the worker process (a Store is not picklable and must not cross processes)."""

    def __init__(self, spec: ReportSpec) -> None:
        self.spec = spec
        self._store: Store | None = None

    def report(self, means: Sequence[tuple[int, float, float]]) -> bool:
        """Record the newest point of the curve so far; False when the trial should stop here."""
        from robonas.store import Store

        if self._store is None:
            # a shared store that is restarting mid-trial is waited for, not a failed trial
            self._store = Store(self.spec.store_url, wait_to_open=True)
        store = self._store
        step, mean, std = means[-1]
        store.add_curve_point(self.spec.trial_id, step, mean, std)
        rung = len(means)
        if rung not in self.spec.rungs:
            return True
        rivals = [
            rung_value([p[1] for p in points], rung)
            for tid, points in store.curves(self.spec.study_id).items()
            if tid != self.spec.trial_id and len(points) >= rung
        ]
        return promote(rung_value([p[1] for p in means], rung), rivals, self.spec.eta, self.spec.grace)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
