"""Replaying a robot's recorded episodes in the simulator, window by window: the prediction that
robot-twin identification (`robonas.models.twin_identification`) scores candidate parameters by.

A window is `horizon` consecutive recorded steps. Its replay puts the simulated cart-pole in the
state of the window's first recorded observation, holds what the motors held at that moment,
applies the recorded actions as the candidate robot would have applied them (after its whole-step
delay and sub-period latency, `applied_inputs`) and returns the simulated observations, to compare
with the recorded ones. Open loop: the recorded actions are replayed, the policy is not run.

How an action reaches the motors mirrors the sim twin (`device_agents.robots.sim_twin`) and the
reality profiles (`sim.reality`): the agent's compute latency for step i (recorded, `latency_s`)
plus the robot's own actuation latency decides when within its period the action takes effect (an
action not ready by the end of its period takes effect in a later one; the newest ready action
wins); the robot's bus then delays what took effect by whole steps (`sim.randomization.ActionDelay`,
neutral action 0 meanwhile), and the env holds the previous period's action for the latency
(quantised to physics substeps) before applying the new one.

Leans on pybullet through the sim env (`sim.registry.make`) and on the env's replay hooks
(`set_state_from_observation`, `set_held_action`), imported when a `Replayer` is built, so
importing this module loads neither gymnasium nor pybullet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

# The sim twin caps the hold at this share of a period: the env takes latencies in [0, dt).
HOLD_CAP = 0.999

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class Record:
    """One episode's arrays, validated and in float64: obs (n+1, obs_dim), action (n, act_dim),
    latency_s (n,)."""

    obs: FloatArray
    action: FloatArray
    latency_s: FloatArray

    @property
    def steps(self) -> int:
        return int(self.action.shape[0])


@dataclass(frozen=True)
class Schedule:
    """What the motors did in each recorded period for one candidate delay and latency, per episode:
    `inputs[e][t]` the action the env applied in period t (after the bus delay), `holds[e][t]` how
    long (s) the previous period's action stayed on first. `key` identifies the schedule as the
    simulator sees it (hold counts in substeps and inputs), so equal schedules share a loss."""

    delay: int
    latency_s: float
    inputs: tuple[FloatArray, ...]
    holds: tuple[FloatArray, ...]
    key: bytes


def applied_inputs(
    action: FloatArray, latency_s: FloatArray, delay: int, base_latency_s: float, dt: float
) -> tuple[FloatArray, FloatArray]:
    """(inputs, holds) of one episode: see the module docstring and `SimTwin.step`."""
    n, act_dim = action.shape
    ready_at = base_latency_s + np.maximum(0.0, latency_s)  # within its own period
    if np.all(ready_at < dt):  # every action takes effect in its own period (the common case)
        start = np.arange(n) * dt
        # (start + delay) - start as the twin computes it, rounding included, so that a hold on a
        # half-substep boundary rounds to the same substep count
        chosen, holds = action, np.minimum(np.maximum(0.0, (start + ready_at) - start), HOLD_CAP * dt)
    else:
        chosen, holds = _late_actions(action, latency_s, base_latency_s, dt)
    inputs = np.zeros((n, act_dim))
    if delay < n:
        inputs[delay:] = chosen[: n - delay]
    return inputs, holds


def _late_actions(
    action: FloatArray, latency_s: FloatArray, base_latency_s: float, dt: float
) -> tuple[FloatArray, FloatArray]:
    """`SimTwin.step`'s pending queue, step by step: the chosen action and hold of each period."""
    n, act_dim = action.shape
    chosen = np.zeros((n, act_dim))
    holds = np.zeros(n)
    pending: list[tuple[float, int]] = []  # (ready time, step index)
    current = np.zeros(act_dim)
    for t in range(n):
        start = t * dt
        pending.append((start + base_latency_s + max(0.0, float(latency_s[t])), t))
        ready = [p for p in pending if p[0] < start + dt]
        if ready:
            when, index = max(ready, key=lambda p: p[1])
            pending = [p for p in pending if p[1] > index]
            holds[t] = min(max(0.0, when - start), HOLD_CAP * dt)
            current = action[index]
        chosen[t] = current
    return chosen, holds


class Replayer:
    """Replays windows of recorded episodes in one simulated cart-pole (see the module docstring).

    Built empty for an env id (its sizes and timing are then known), then `load` the records.
    """

    def __init__(self, env_id: str) -> None:
        from gymnasium import spaces

        from sim.envs.base import substep_control  # here: loads gymnasium and the env's pybullet
        from sim.registry import make

        self._gym_env = make(env_id)
        self._env: Any = self._gym_env.unwrapped  # a cart-pole env: it has the state hook
        self._control = substep_control(self._gym_env)
        self._env.reset(seed=0)
        obs_space, act_space = self._gym_env.observation_space, self._gym_env.action_space
        assert isinstance(obs_space, spaces.Box) and isinstance(act_space, spaces.Box)
        self.obs_dim = int(np.prod(obs_space.shape))
        self.act_dim = int(np.prod(act_space.shape))
        self.dt = float(self._control.dt)
        self.physics_dt = float(self._control.physics_dt)
        self.n_substeps = int(self._control.n_substeps)
        self.records: tuple[Record, ...] = ()
        self.windows: tuple[tuple[int, int], ...] = ()
        self.horizon = 0
        self.targets = np.empty((0, 0, self.obs_dim))
        self.simulated_steps = 0

    def load(self, records: Sequence[Record], horizon: int, stride: int, max_windows: int) -> None:
        """Use `records`, cut into windows of `horizon` steps starting every `stride` steps, at
        most `max_windows` of them (evenly spread over all the windows there are)."""
        windows = [(e, s) for e, r in enumerate(records) for s in range(0, r.steps - horizon + 1, stride)]
        if len(windows) > max_windows:
            picks = np.unique(np.round(np.linspace(0, len(windows) - 1, max_windows)).astype(int))
            windows = [windows[i] for i in picks]
        self.records = tuple(records)
        self.windows = tuple(windows)
        self.horizon = int(horizon)
        self.targets = np.empty((len(self.windows), self.horizon, self.obs_dim))
        for w, (e, s) in enumerate(self.windows):
            self.targets[w] = self.records[e].obs[s + 1 : s + 1 + self.horizon]

    def schedule(self, delay: int, latency_s: float) -> Schedule:
        inputs, holds = [], []
        for r in self.records:
            u, h = applied_inputs(r.action, r.latency_s, delay, latency_s, self.dt)
            inputs.append(u)
            holds.append(h)
        counts = [np.minimum(self.n_substeps, np.round(h / self.physics_dt)).astype(np.int16) for h in holds]
        key = b"".join(c.tobytes() for c in counts) + b"|" + b"".join(u.tobytes() for u in inputs)
        return Schedule(delay, float(latency_s), tuple(inputs), tuple(holds), key)

    def predict(self, dynamics: Any, schedule: Schedule, windows: Sequence[int] | None = None) -> FloatArray:
        """Simulated observations (len(windows), horizon, obs_dim) of the given windows (all by
        default) under `dynamics` (a `sim.Dynamics`) and `schedule`."""
        env, k = self._env, self.horizon
        env.set_dynamics(dynamics)
        chosen = range(len(self.windows)) if windows is None else windows
        out = np.empty((len(chosen), k, self.targets.shape[2]))
        for i, w in enumerate(chosen):
            e, s = self.windows[w]
            out[i] = self._roll(self.records[e].obs[s], schedule.inputs[e], schedule.holds[e], s)
        return out

    def predict_from(
        self, dynamics: Any, schedule: Schedule, episode: int, start: int, obs: FloatArray, steps: int
    ) -> FloatArray:
        """Simulated observations of `steps` steps from an arbitrary observation `obs` at step
        `start` of `episode` (for perturbation studies such as the noise estimate)."""
        self._env.set_dynamics(dynamics)
        return self._roll(obs, schedule.inputs[episode], schedule.holds[episode], start, steps)

    def _roll(
        self, obs: FloatArray, inputs: FloatArray, holds: FloatArray, start: int, steps: int | None = None
    ) -> FloatArray:
        env, control = self._env, self._control
        k = self.horizon if steps is None else steps
        env.set_state_from_observation(obs)
        control.set_held_action(inputs[start - 1] if start > 0 else None)
        out = np.empty((k, obs.shape[0]))
        for h in range(k):
            control.actuation_latency_s = float(holds[start + h])
            out[h] = env.step(inputs[start + h])[0]
        self.simulated_steps += k
        return out

    def close(self) -> None:
        self._gym_env.close()
