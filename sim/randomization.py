"""Domain randomisation: a validated `RandomizationConfig` of (lo, hi) ranges and four
composable gymnasium wrappers, one per kind of disturbance.

Leans on gymnasium's wrapper classes. Each wrapper has one job and overrides the one method that
does it (`observation`, `action` or `step`); the three that hold a per-episode draw also override
`reset`, which draws it (from the env's seeded `np_random`, after the inner reset, so a whole
stack is deterministic under `reset(seed=...)`) and, for the delay, empties its queue.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, SupportsFloat

import gymnasium
import gymnasium.utils
import numpy as np

from sim.dynamics import Dynamics
from sim.envs.base import substep_control
from sim.errors import SimError

Range = tuple[float, float]
_DYNAMICS_FIELDS = ("mass_scale", "friction_scale", "damping", "motor_gain")


@dataclass(frozen=True)
class RandomizationConfig:
    """Uniform ranges (lo, hi), lo <= hi, drawn once per episode.

    mass_scale, friction_scale, damping, motor_gain: see `sim.Dynamics`.
    obs_noise_std: std of Gaussian noise added to every observation component.
    action_delay: whole control steps (ints) an action waits before it is applied.
    period_jitter: j drawn per episode; each control period is then stretched by a factor
        drawn uniformly from [1 - j, 1 + j] (a fraction of the period, 0 <= j < 1).
    """

    mass_scale: Range = (1.0, 1.0)
    friction_scale: Range = (1.0, 1.0)
    damping: Range = (0.0, 0.0)
    motor_gain: Range = (1.0, 1.0)
    obs_noise_std: Range = (0.0, 0.0)
    action_delay: tuple[int, int] = (0, 0)
    period_jitter: Range = (0.0, 0.0)

    def __post_init__(self) -> None:
        # (field, smallest allowed lo, lo may equal it, largest allowed hi or None)
        limits = {
            "mass_scale": (0.0, False, None),
            "friction_scale": (0.0, False, None),
            "motor_gain": (0.0, False, None),
            "damping": (0.0, True, None),
            "obs_noise_std": (0.0, True, None),
            "action_delay": (0, True, None),
            "period_jitter": (0.0, True, 1.0),
        }
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise SimError(f"randomization {f.name}={value!r} is invalid; give a (lo, hi) pair")
            lo, hi = value
            if f.name == "action_delay":
                if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
                    raise SimError(
                        f"randomization action_delay={value!r} is invalid; give whole steps (ints)"
                    )
            elif not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
                raise SimError(f"randomization {f.name}={value!r} is invalid; give finite numbers")
            if lo > hi:
                raise SimError(f"randomization {f.name}={value!r} is an inverted range; need lo <= hi")
            floor, inclusive, ceiling = limits[f.name]
            if lo < floor or (lo == floor and not inclusive) or (ceiling is not None and hi >= ceiling):
                bound = f"{'>=' if inclusive else '>'} {floor}" + (f" and < {ceiling}" if ceiling else "")
                raise SimError(f"randomization {f.name}={value!r} is out of range; values must be {bound}")
            object.__setattr__(self, f.name, (lo, hi))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RandomizationConfig:
        """Build from a mapping (e.g. a TOML table); unknown keys raise SimError naming the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise SimError(f"unknown randomization key(s) {unknown}; valid keys: {', '.join(valid)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict[str, list[float]]:
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}


def _uniform(rng: np.random.Generator, r: Range) -> float:
    lo, hi = r
    return float(lo) if lo == hi else float(rng.uniform(lo, hi))


def _box(space: gymnasium.spaces.Space[Any], what: str) -> gymnasium.spaces.Box:
    if not isinstance(space, gymnasium.spaces.Box):
        raise SimError(f"{what} needs a Box space, got {space}")
    return space


class DynamicsRandomization(gymnasium.Wrapper, gymnasium.utils.RecordConstructorArgs):
    """Draws a `sim.Dynamics` per episode and sets it on the env (takes effect from the first step)."""

    def __init__(self, env: gymnasium.Env, config: RandomizationConfig) -> None:
        # Recorded so gymnasium can rebuild the stack from env.spec (check_env does).
        gymnasium.utils.RecordConstructorArgs.__init__(self, config=config)
        super().__init__(env)
        self._ranges = {name: getattr(config, name) for name in _DYNAMICS_FIELDS}
        self._control = substep_control(env)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        rng = self.env.unwrapped.np_random
        dynamics = Dynamics(**{name: _uniform(rng, r) for name, r in self._ranges.items()})
        self._control.set_dynamics(dynamics)
        return obs, {**info, "dynamics": dynamics}


class ObservationNoise(gymnasium.ObservationWrapper, gymnasium.utils.RecordConstructorArgs):
    """Adds Gaussian noise (std drawn per episode) to observations, clipped to the space."""

    def __init__(self, env: gymnasium.Env, std: Range) -> None:
        # Recorded so gymnasium can rebuild the stack from env.spec (check_env does).
        gymnasium.utils.RecordConstructorArgs.__init__(self, std=std)
        super().__init__(env)
        self._std_range = std
        self._std = 0.0
        self._space = _box(env.observation_space, "ObservationNoise")

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        self._std = _uniform(self.env.unwrapped.np_random, self._std_range)
        return self.observation(obs), info

    def observation(self, observation: np.ndarray) -> np.ndarray:
        space = self._space
        noise = self.env.unwrapped.np_random.normal(0.0, self._std, size=np.shape(observation))
        return np.clip(observation + noise, space.low, space.high).astype(space.dtype)


class ActionDelay(gymnasium.ActionWrapper, gymnasium.utils.RecordConstructorArgs):
    """Applies each action k whole control steps late (k drawn per episode); the first k steps of
    an episode apply the neutral action (the centre of the action box, zero for [-1, 1])."""

    def __init__(self, env: gymnasium.Env, steps: tuple[int, int]) -> None:
        # Recorded so gymnasium can rebuild the stack from env.spec (check_env does).
        gymnasium.utils.RecordConstructorArgs.__init__(self, steps=steps)
        super().__init__(env)
        self._steps_range = steps
        self.delay_steps = 0
        space = _box(env.action_space, "ActionDelay")
        self._neutral = ((space.low + space.high) / 2).astype(space.dtype)
        self._queue: deque[np.ndarray] = deque()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        lo, hi = self._steps_range
        self.delay_steps = lo if lo == hi else int(self.env.unwrapped.np_random.integers(lo, hi + 1))
        self._queue = deque(self._neutral.copy() for _ in range(self.delay_steps))
        return obs, info

    def action(self, action: np.ndarray) -> np.ndarray:
        self._queue.append(np.array(action, copy=True))
        return self._queue.popleft()


class ControlPeriodJitter(gymnasium.Wrapper, gymnasium.utils.RecordConstructorArgs):
    """Stretches each control period by a factor in [1 - j, 1 + j], j drawn per episode, through
    the env's one-shot `period_scale` (see `sim.envs.base.SubstepControl`)."""

    def __init__(self, env: gymnasium.Env, jitter: Range) -> None:
        # Recorded so gymnasium can rebuild the stack from env.spec (check_env does).
        gymnasium.utils.RecordConstructorArgs.__init__(self, jitter=jitter)
        super().__init__(env)
        self._jitter_range = jitter
        self._jitter = 0.0
        self._control = substep_control(env)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        self._jitter = _uniform(self.env.unwrapped.np_random, self._jitter_range)
        return obs, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        if self._jitter > 0:
            self._control.period_scale = 1.0 + float(
                self.env.unwrapped.np_random.uniform(-self._jitter, self._jitter)
            )
        return self.env.step(action)


def randomize(env: gymnasium.Env, config: RandomizationConfig) -> gymnasium.Env:
    """Wrap `env` in the wrappers `config` asks for (a wrapper whose range is the identity is left
    out). Order, inside out: dynamics, period jitter, action delay, observation noise."""
    nominal = RandomizationConfig()
    if any(getattr(config, n) != getattr(nominal, n) for n in _DYNAMICS_FIELDS):
        env = DynamicsRandomization(env, config)
    if config.period_jitter != nominal.period_jitter:
        env = ControlPeriodJitter(env, config.period_jitter)
    if config.action_delay != nominal.action_delay:
        env = ActionDelay(env, config.action_delay)
    if config.obs_noise_std != nominal.obs_noise_std:
        env = ObservationNoise(env, config.obs_noise_std)
    return env
