"""REINFORCE controller (Zoph & Le 2017, simplified): a factorised softmax policy, one
categorical distribution per decision of `SearchSpace.encode`, trained by policy gradient.

Written by hand in numpy: the policy is a table of logits, so a deep-learning framework would
add nothing but an import. Details:
- each tell is one REINFORCE step on the logits of the decisions active in that arch (inactive
  layer slots had no effect on the reward, so they get no credit);
- the advantage is the reward minus a moving-average baseline, divided by the standard
  deviation of all rewards so far and clipped to +-3, so `lr` does not depend on the scale of
  the objective and one outlier cannot collapse the policy;
- an entropy bonus on every decision keeps the policy from collapsing early;
- a failed or rejected arch (metrics None) gets the worst reward seen so far, which pushes the
  policy away from it (nothing is learned if no reward has been seen yet).
Asks may be outstanding: the step uses the logits current at tell time (slightly off-policy
under parallel workers, as in the original asynchronous controller).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from robonas.errors import ConfigError
from robonas.space import PolicyArch, SearchSpace
from robonas.strategies.base import Pending, Strategy


def _log_softmax(z: NDArray[np.float64]) -> NDArray[np.float64]:
    # log-space, so a saturated choice gives p = 0 with a finite log p (no 0 * -inf = nan)
    shifted = z - z.max()
    return shifted - np.log(np.exp(shifted).sum())


def _softmax(z: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.exp(_log_softmax(z))


class ReinforceController(Strategy):
    name = "reinforce"
    defaults: ClassVar[dict[str, Any]] = {"lr": 0.3, "baseline_decay": 0.9, "entropy": 0.05}

    def __init__(self, space: SearchSpace, seed: int = 0, **options: Any) -> None:
        super().__init__(space, seed, **options)

        def number(key: str) -> float:
            v = self.options[key]
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"strategy.{key}: {v!r} is not a number")
            return float(v)

        if number("lr") <= 0:
            raise ConfigError(f"strategy.lr: {self.options['lr']!r} is not > 0")
        if not 0 <= number("baseline_decay") < 1:
            raise ConfigError(f"strategy.baseline_decay: {self.options['baseline_decay']!r} is not in [0, 1)")
        if number("entropy") < 0:
            raise ConfigError(f"strategy.entropy: {self.options['entropy']!r} is not >= 0")
        self.logits = [np.zeros(n) for n in space.cardinalities()]
        self._pending: Pending[list[int]] = Pending()
        self._baseline: float | None = None
        self._n, self._mean, self._m2 = 0, 0.0, 0.0
        self._worst: float | None = None

    def probabilities(self) -> list[NDArray[np.float64]]:
        return [_softmax(z) for z in self.logits]

    def ask(self) -> PolicyArch:
        vec = [int(self.rng.choice(len(p), p=p)) for p in self.probabilities()]
        arch = self.space.decode(vec)
        self._pending.add(arch, vec)
        return arch

    def tell(self, arch: PolicyArch, metrics: dict[str, float] | None) -> None:
        vec = self._pending.pop(arch)
        if metrics is None:
            if self._worst is None:
                return
            reward = self._worst
        else:
            reward = self.objective(metrics)
            self._worst = reward if self._worst is None else min(self._worst, reward)

        # scale: standard deviation of every reward so far (Welford), robust from the start,
        # unlike a moving variance, which is tiny after two rewards and blows up the step
        self._n += 1
        delta = reward - self._mean
        self._mean += delta / self._n
        self._m2 += delta * (reward - self._mean)
        if self._baseline is None:  # first reward: it is its own baseline, no step
            self._baseline = reward
            return
        std = np.sqrt(self._m2 / (self._n - 1))
        advantage = 0.0 if std == 0.0 else (reward - self._baseline) / std
        advantage = float(np.clip(advantage, -3.0, 3.0))
        decay = self.options["baseline_decay"]
        self._baseline = decay * self._baseline + (1 - decay) * reward

        lr, beta = self.options["lr"], self.options["entropy"]
        active = set(self.space.active_decisions(len(arch.layers)))
        for i, z in enumerate(self.logits):
            logp = _log_softmax(z)
            p = np.exp(logp)
            grad = -beta * p * (logp - (p * logp).sum())  # d entropy / d logits
            if i in active:
                onehot = np.zeros_like(p)
                onehot[vec[i]] = 1.0
                grad += advantage * (onehot - p)  # d log p(choice) / d logits
            z += lr * grad
