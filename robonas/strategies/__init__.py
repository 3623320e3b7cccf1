"""Search strategies behind one ask/tell interface (`Strategy`), found by name.

Optuna is imported only when an Optuna-backed strategy is constructed, so importing this package
stays cheap (the CLI lists strategy names without it).
"""

from __future__ import annotations

from typing import Any

from robonas.errors import ConfigError
from robonas.space import SearchSpace
from robonas.strategies.base import Strategy
from robonas.strategies.evolution import RegularizedEvolution
from robonas.strategies.optuna_strategies import NSGA2Strategy, TPEStrategy
from robonas.strategies.random_search import RandomSearch
from robonas.strategies.reinforce import ReinforceController

STRATEGIES: dict[str, type[Strategy]] = {
    "random": RandomSearch,
    "evolution": RegularizedEvolution,
    "reinforce": ReinforceController,
    "tpe": TPEStrategy,
    "nsga2": NSGA2Strategy,
}


def make_strategy(name: str, space: SearchSpace, seed: int = 0, **opts: Any) -> Strategy:
    try:
        cls = STRATEGIES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"strategy.name: {name!r} is not one of {', '.join(STRATEGIES)}") from None
    return cls(space, seed, **opts)


__all__ = [
    "STRATEGIES",
    "NSGA2Strategy",
    "RandomSearch",
    "RegularizedEvolution",
    "ReinforceController",
    "Strategy",
    "TPEStrategy",
    "make_strategy",
]
