"""The sim-backed robot twin: a reality profile (`sim.reality.make_reality`) driven as a robot.

The only device_agents module allowed to import `sim` (and through it gymnasium and pybullet),
and only inside `SimTwin.__init__`, so choosing another back end never loads them.

The measured inference time is applied as extra actuation latency on top of the profile's own:
the previous action stays on the motors that long into the period. It is capped just below one
period (the env refuses a latency of a whole period); an inference that overran the period is a
deadline miss, which the control loop counts.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from device_agents.errors import DeviceError
from device_agents.robots.base import Robot

_CAP = 0.999  # of one period: the env takes latencies in [0, dt)


class SimTwin(Robot):
    def __init__(self, profile: str, fast: bool = False, **env_kwargs: Any):
        try:
            from sim.errors import SimError
            from sim.reality import get_profile, make_reality
        except ImportError as e:
            raise DeviceError(
                f"robot sim:{profile} needs the host packages (sim, gymnasium, pybullet): {e}"
            ) from e
        try:
            self._profile = get_profile(profile)
            self._env = make_reality(profile, **env_kwargs)
        except SimError as e:
            raise DeviceError(f"robot sim:{profile}: {e}") from e
        self.name = f"sim:{profile}"
        self.fast = fast  # the twin never sleeps itself; the control loop keeps the time
        u = self._env.unwrapped
        self._base_latency = float(self._profile.actuation_latency_s)
        self._dt = float(u.dt)
        self._hz = float(u.control_hz)
        space = self._env.action_space
        self._discrete = hasattr(space, "n") and not hasattr(space, "low")
        self._n = int(getattr(space, "n", 0))
        self._act_size = 1 if self._discrete else int(np.prod(space.shape))
        self._obs_size = int(np.prod(self._env.observation_space.shape))
        self._closed = False

    @property
    def observation_size(self) -> int:
        return self._obs_size

    @property
    def action_size(self) -> int:
        return self._act_size

    @property
    def control_hz(self) -> float:
        return self._hz

    def reset(self, seed: Optional[int] = None) -> np.ndarray:
        obs, _ = self._env.reset(seed=None if seed is None else int(seed))
        return np.asarray(obs, np.float32).ravel()

    def step(self, action: np.ndarray, latency_s: float = 0.0) -> Tuple[np.ndarray, float, bool]:
        latency = self._base_latency + max(0.0, float(latency_s))
        self._env.unwrapped.actuation_latency_s = min(latency, _CAP * self._dt)
        a = np.asarray(action, np.float32).ravel()
        if self._discrete:
            env_action: Any = int(np.clip(np.rint(a[0]), 0, self._n - 1))
        else:
            env_action = a.reshape(self._env.action_space.shape)
        obs, reward, terminated, truncated, _ = self._env.step(env_action)
        return np.asarray(obs, np.float32).ravel(), float(reward), bool(terminated or truncated)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._env.close()
