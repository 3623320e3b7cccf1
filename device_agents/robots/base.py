"""The robot back-end contract: what the control loop drives, whatever sits behind it.

A small ABC (standard library `abc` only), like optuna's samplers: a back end is one file plus a
row in `device_agents.robots.BACKENDS` and a line in the parametrised contract test
(`tests/device_agents/test_robots.py`). numpy is named in annotations only, so importing the
contract (and the back-end table) stays standard library.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


class Robot(abc.ABC):
    """One robot the agent controls at a fixed rate.

    `step(action, latency_s)`: `latency_s` is how long the previous action stayed applied in
    this control period before `action` took over (the inference time of the robot's computer,
    see `compute_time`). A physical robot pays it for real and may ignore the figure; a simulated
    one applies it.
    """

    name: str = "robot"

    @property
    @abc.abstractmethod
    def observation_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def action_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def control_hz(self) -> float: ...

    @abc.abstractmethod
    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start an episode; the first observation (float32, observation_size)."""

    @abc.abstractmethod
    def step(self, action: np.ndarray, latency_s: float = 0.0) -> tuple[np.ndarray, float, bool]:
        """Apply `action` for one control period; (observation, reward, done)."""

    def bind_policy(self, policy: object) -> None:  # noqa: B027  (an optional hook, empty by design)
        """Called once before a run with the policy about to drive the robot (a TFLitePolicy or
        alike). Most robots need nothing from it; a twin emulating its own computer reads the
        policy's cost (`policy.macs`)."""

    def compute_time(self, measured_s: float) -> float:
        """How long this robot's own computer takes for a step measured at `measured_s` on the
        machine running the agent. On a physical robot the agent runs on the robot's computer,
        so the measurement is the answer; a sim twin standing in for a slower computer says
        what that computer would take."""
        return measured_s

    def close(self) -> None:  # noqa: B027  (an optional hook, empty by design)
        """Release the robot (port, simulator). Safe to call twice."""

    def describe(self) -> dict:
        return {
            "name": self.name,
            "observation_size": self.observation_size,
            "action_size": self.action_size,
            "control_hz": self.control_hz,
        }

    def __enter__(self) -> Robot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
