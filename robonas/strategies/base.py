"""The ask/tell interface every search strategy implements (a small ABC, as in optuna's samplers).

A strategy proposes architectures (`ask`) and learns from their results (`tell`). Asks may be
outstanding: parallel workers ask several times before telling, and tells arrive in any order.
Given the same seed and the same sequence of ask/tell calls, a strategy returns the same archs,
so a killed search resumes by replaying its recorded calls. Randomness therefore comes only from
`self.rng` (numpy Generator seeded once) or a seeded library sampler, never from global state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict, deque
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from robonas.errors import ConfigError, RobonasError
from robonas.space import PolicyArch, SearchSpace

T = TypeVar("T")


class Strategy(ABC):
    """Ask/tell search over a `SearchSpace`.

    Subclasses set `name` and `defaults` (option name -> default value); unknown options raise
    ConfigError naming the valid ones. `metrics` given to `tell` is None for a failed or
    rejected (over latency budget) candidate, else a dict with "objective" (maximised) and, for
    multi-objective strategies, "predicted_real_return" (maximised) and "p99_ms" (minimised).
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, space: SearchSpace, seed: int = 0, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "none"
            raise ConfigError(
                f"strategy.{unknown[0]}: unknown option for {self.name!r}; valid options: {valid}"
            )
        self.space = space
        self.seed = seed
        self.options: dict[str, Any] = {**self.defaults, **options}
        self.rng = np.random.default_rng(seed)

    @abstractmethod
    def ask(self) -> PolicyArch:
        """Next architecture to evaluate."""

    @abstractmethod
    def tell(self, arch: PolicyArch, metrics: dict[str, float] | None) -> None:
        """Result of an earlier `ask` (None: failed or rejected)."""

    @staticmethod
    def objective(metrics: dict[str, float]) -> float:
        try:
            return float(metrics["objective"])
        except (KeyError, TypeError, ValueError) as e:
            raise RobonasError(f"strategy.tell: metrics {metrics!r} lack a numeric 'objective'") from e


class Pending(Generic[T]):
    """Outstanding asks keyed by arch, first in first out (the same arch may be asked twice)."""

    def __init__(self) -> None:
        self._by_arch: dict[PolicyArch, deque[T]] = defaultdict(deque)

    def add(self, arch: PolicyArch, item: T) -> None:
        self._by_arch[arch].append(item)

    def pop(self, arch: PolicyArch) -> T:
        queue = self._by_arch.get(arch)
        if not queue:
            raise RobonasError(
                f"strategy.tell: {arch.describe()!r} ({arch.arch_id}) was not asked or was told already"
            )
        item = queue.popleft()
        if not queue:
            del self._by_arch[arch]
        return item

    def __len__(self) -> int:
        return sum(len(q) for q in self._by_arch.values())
