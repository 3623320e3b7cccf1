"""Regularised (aging) evolution, Real et al. 2019, "Regularized Evolution for Image Classifier
Architecture Search". Written by hand with numpy: the algorithm is a dozen lines.

Until `population` results have come back, asks are random samples. Then each ask draws
`sample` members of the population uniformly without replacement, mutates the best one (one
decision, `SearchSpace.mutate`) and returns the child. Every result joins the population and
the oldest member leaves, so an arch survives only by having good offspring, not by one lucky
score. Failed or rejected candidates (metrics None) never join. A told arch that was never
asked (e.g. a warm start from an earlier study) joins like any other.
"""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar

from robonas.errors import ConfigError
from robonas.space import PolicyArch, SearchSpace
from robonas.strategies.base import Strategy


class RegularizedEvolution(Strategy):
    name = "evolution"
    defaults: ClassVar[dict[str, Any]] = {"population": 20, "sample": 5}

    def __init__(self, space: SearchSpace, seed: int = 0, **options: Any) -> None:
        super().__init__(space, seed, **options)
        population, sample = self.options["population"], self.options["sample"]
        if not isinstance(population, int) or population < 2:
            raise ConfigError(f"strategy.population: {population!r} is not an integer >= 2")
        if not isinstance(sample, int) or not 1 <= sample <= population:
            raise ConfigError(f"strategy.sample: {sample!r} is not an integer in 1..{population}")
        self.population: deque[tuple[PolicyArch, float]] = deque(maxlen=population)
        self._filled = False
        self._asks = 0

    def ask(self) -> PolicyArch:
        if not self._filled:
            arch = self.space.sample(self.rng)
            self._asks += 1
            # the first candidate trains with the tuned trainer settings
            return self.space.at_start(arch) if self._asks == 1 else arch
        picks = self.rng.choice(len(self.population), size=self.options["sample"], replace=False)
        # ties go to the earliest-picked index so the choice is a function of rng only
        parent = max((self.population[int(i)] for i in picks), key=lambda m: m[1])[0]
        return self.space.mutate(parent, self.rng)

    def tell(self, arch: PolicyArch, metrics: dict[str, float] | None) -> None:
        if metrics is None:
            return
        self.population.append((arch, self.objective(metrics)))  # deque drops the oldest
        if len(self.population) == self.population.maxlen:
            self._filled = True
