"""The sim-backed robot twin: a reality profile (`sim.reality.make_reality`) driven as a robot.

The only device_agents module allowed to import `sim` (and through it gymnasium and pybullet),
and only inside `SimTwin.__init__`, so choosing another back end never loads them. Where they
are not installed (a robot), choosing this back end is one DeviceError saying what to install.

The twin stands in for the robot's computer too (`compute_time`): a step measured at t on this
machine takes `t * compute_scale + macs / compute_macs_per_s` there. The first term scales what
this machine measured (interpreter and Python overhead, with its real jitter); the second is the
arithmetic of the policy's `macs` at the robot's rate, the term that dominates on a
microcontroller and that this machine's SIMD kernels hide (a 2x256 MLP takes 1.6x a 1x64 one
here, about 170x on an MCU running reference kernels). Profiles without those fields are as
fast as this machine. The control loop reports these emulated timings as the robot's (the host
measurement stays in the report as `host_timings_ms`).

Each action takes effect when the robot's computer would have finished computing it: at the
start of its period plus the profile's own actuation latency plus that compute time. Until then
the previous action stays on the motors. An action that is not ready by the end of its period
takes effect in a later one (the motors keep the last ready action meanwhile), and an older
action that is overtaken by a newer ready one is dropped, as on a real controller that always
applies the newest result. `report_extras` adds the latency the twin applied.

Safety: the twin's `kind` is its profile's env id, its action limits are its env's action space
(a Box's low/high; a Discrete's index range), its safe action zeros, and `halt` puts the safe
action on the motors at once (counted as `halts` in `report_extras`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from device_agents.errors import DeviceError
from device_agents.robots.base import Robot

_CAP = 0.999  # of one period: the env takes latencies in [0, dt)


class SimTwin(Robot):
    def __init__(self, profile: str, fast: bool = False, **env_kwargs: Any):
        try:
            from gymnasium import spaces

            from sim.envs.base import substep_control
            from sim.errors import SimError
            from sim.reality import get_profile, make_reality
        except ModuleNotFoundError as e:  # not installed; an ImportError inside `sim` speaks for itself
            raise DeviceError(
                f"robot sim:{profile} needs robonas's host side (Python 3.11+, "
                f"pip install 'robonas[host]'): no module named {e.name!r}"
            ) from e
        try:
            self._profile = get_profile(profile)
            self._env = make_reality(profile, **env_kwargs)
        except SimError as e:
            raise DeviceError(f"robot sim:{profile}: {e}") from e
        self.name = f"sim:{profile}"
        self.fast = fast  # the twin never sleeps itself; the control loop keeps the time
        self._control = substep_control(self._env)
        self._base_latency = float(self._profile.actuation_latency_s)
        self._compute_scale = float(self._profile.compute_scale)
        self._macs_per_s = float(self._profile.compute_macs_per_s)
        self._macs: int | None = None
        self._pending: list[tuple[float, int, np.ndarray]] = []  # (ready time, index, action)
        self._t = 0  # control periods since reset
        self._applied_ms: list[float] = []
        self._stale = 0
        self._dt = float(self._control.dt)
        self._hz = float(self._control.control_hz)
        action_space, obs_space = self._env.action_space, self._env.observation_space
        self._act_shape: tuple[int, ...]
        self._limits: tuple[np.ndarray, np.ndarray]  # the robot's own: the action space's
        if isinstance(action_space, spaces.Discrete):  # one action value: the index
            self._discrete, self._n, self._act_shape = True, int(action_space.n), (1,)
            self._limits = (np.zeros(1, np.float32), np.full(1, self._n - 1, np.float32))
        elif isinstance(action_space, spaces.Box):
            self._discrete, self._n, self._act_shape = False, 0, action_space.shape
            self._limits = (
                np.asarray(action_space.low, np.float32).ravel(),
                np.asarray(action_space.high, np.float32).ravel(),
            )
        else:
            raise DeviceError(f"robot sim:{profile}: action space {action_space} is not a Box or Discrete")
        if not isinstance(obs_space, spaces.Box):
            raise DeviceError(f"robot sim:{profile}: observation space {obs_space} is not a Box")
        self._act_size = int(np.prod(self._act_shape))
        self._current = np.zeros(self._act_size, np.float32)  # what the motors hold
        self._halts = 0
        self._obs_size = int(np.prod(obs_space.shape))
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

    @property
    def kind(self) -> str | None:
        return str(self._profile.env_id)

    def action_limits(self) -> tuple[np.ndarray, np.ndarray] | None:
        return self._limits[0].copy(), self._limits[1].copy()

    def halt(self) -> None:
        """The motors take the safe action at once: pending (late) actions are dropped, so none
        takes effect after the halt. No simulated time passes (the env is not stepped), so it
        is safe after an episode ended and on a closed twin."""
        self._pending.clear()
        self._current = self.safe_action()
        self._halts += 1

    def bind_policy(self, policy: object) -> None:
        macs = getattr(policy, "macs", None)
        if self._macs_per_s > 0 and not isinstance(macs, int):
            raise DeviceError(
                f"robot {self.name} emulates a {self._macs_per_s:.3g} MAC/s computer "
                "and needs the policy's MAC count, which this runtime does not give"
            )
        self._macs = macs if isinstance(macs, int) else None

    def compute_time(self, measured_s: float) -> float:
        arithmetic = (self._macs or 0) / self._macs_per_s if self._macs_per_s > 0 else 0.0
        return max(0.0, float(measured_s)) * self._compute_scale + arithmetic

    def reset(self, seed: int | None = None) -> np.ndarray:
        obs, _ = self._env.reset(seed=None if seed is None else int(seed))
        self._pending.clear()
        self._t = 0
        self._current = np.zeros(self._act_size, np.float32)  # what the motors hold
        return np.asarray(obs, np.float32).ravel()

    def step(self, action: np.ndarray, latency_s: float = 0.0) -> tuple[np.ndarray, float, bool]:
        dt, start = self._dt, self._t * self._dt
        delay = self._base_latency + max(0.0, float(latency_s))  # latency_s: from compute_time
        self._applied_ms.append(delay * 1000.0)
        self._pending.append((start + delay, self._t, np.asarray(action, np.float32).ravel()))
        # The newest action ready before this period ends takes effect, at its ready time.
        ready = [p for p in self._pending if p[0] < start + dt]
        if ready:
            when, index, chosen = max(ready, key=lambda p: p[1])
            self._pending = [p for p in self._pending if p[1] > index]
            hold = min(max(0.0, when - start), _CAP * dt)
        else:
            chosen, hold = self._current, 0.0  # nothing new: the motors keep the last action
            self._stale += 1
        self._control.actuation_latency_s = hold
        self._current = chosen
        self._t += 1
        if self._discrete:
            env_action: Any = int(np.clip(np.rint(chosen[0]), 0, self._n - 1))
        else:
            env_action = chosen.reshape(self._act_shape)
        obs, reward, terminated, truncated, _ = self._env.step(env_action)
        return np.asarray(obs, np.float32).ravel(), float(reward), bool(terminated or truncated)

    def report_extras(self) -> dict[str, Any]:
        """The latency the twin applied (the robot computer's step + the profile's own)."""
        applied = np.asarray(self._applied_ms or [0.0])
        out = {
            "compute_scale": self._compute_scale,
            "compute_macs_per_s": self._macs_per_s,
            "policy_macs": self._macs,
            "applied_latency_ms": {
                "p50": float(np.percentile(applied, 50)),
                "p99": float(np.percentile(applied, 99)),
            },
            "stale_periods": self._stale,
            "halts": self._halts,
        }
        self._applied_ms, self._stale, self._halts = [], 0, 0
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._env.close()
