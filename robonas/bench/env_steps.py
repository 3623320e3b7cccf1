"""`robonas bench env`: raw environment steps per second, against gymnasium's CartPole-v1.

Random actions, one process, timed with `time.perf_counter`. The reference env is measured in
the same run so that the ratio, not the absolute number, is what carries between machines.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

REFERENCE_ENV = "CartPole-v1"


@dataclass(frozen=True)
class EnvBench:
    env_id: str
    steps: int
    seconds: float
    steps_per_s: float
    ratio_to_reference: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_env(env_id: str, steps: int, seed: int = 0) -> EnvBench:
    """Step `env_id` with random actions for `steps` steps, resetting on episode end."""
    import gymnasium

    import sim

    env = sim.make(env_id) if env_id.startswith("sim/") else gymnasium.make(env_id)
    try:
        env.action_space.seed(seed)
        env.reset(seed=seed)
        # Sample the actions up front so that the timing is the env's, not the sampler's.
        actions = [env.action_space.sample() for _ in range(steps)]
        start = time.perf_counter()
        for action in actions:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
        seconds = time.perf_counter() - start
    finally:
        env.close()
    return EnvBench(env_id, steps, seconds, steps / seconds)


def bench_envs(env_ids: list[str], steps: int) -> list[EnvBench]:
    """Measure each env and the reference; ratios are env steps/s over reference steps/s."""
    reference = measure_env(REFERENCE_ENV, steps)
    results = [EnvBench(**{**reference.to_dict(), "ratio_to_reference": 1.0})]
    for env_id in env_ids:
        r = measure_env(env_id, steps)
        results.append(
            EnvBench(**{**r.to_dict(), "ratio_to_reference": r.steps_per_s / reference.steps_per_s})
        )
    return results
