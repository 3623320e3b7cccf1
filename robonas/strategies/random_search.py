"""Random search: independent uniform samples of every decision (the baseline to beat)."""

from __future__ import annotations

from robonas.space import PolicyArch
from robonas.strategies.base import Strategy


class RandomSearch(Strategy):
    name = "random"

    def ask(self) -> PolicyArch:
        return self.space.sample(self.rng)

    def tell(self, arch: PolicyArch, metrics: dict[str, float] | None) -> None:
        # nothing to learn; results are kept by the store
        if metrics is not None:
            self.objective(metrics)  # still reject malformed metrics, like the other strategies
