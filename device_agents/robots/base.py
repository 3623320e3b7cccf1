"""The robot back-end contract: what the control loop drives, whatever sits behind it.

A small ABC (standard library `abc` only), like optuna's samplers: a back end is one file plus a
row in `device_agents.robots.BACKENDS` and a line in the parametrised contract test
(`tests/device_agents/test_robots.py`). numpy is named in annotations only (and imported inside
the one default that builds an array), so importing the contract (and the back-end table) stays
standard library.

Safety (issue 14): every robot says what it is (`kind`, the env id an artifact's manifest names),
its own actuator limits (`action_limits`), its safe action (`safe_action`), and can be put in its
safe state at once (`halt`) and told to fall to it by itself if the agent goes silent
(`arm_watchdog`). The defaults suit a back end that knows none of this: no kind, no limits, a zero
safe action, a halt and a watchdog that do nothing. A back end for hardware overrides `halt` (a
no-op halt leaves the motors on their last action) and, where the firmware can, `arm_watchdog`.
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
        """Release the robot (port, simulator). Safe to call twice. It does not halt: the
        control loop halts at the end of every run, and a serial robot's firmware falls to its
        safe state by its own watchdog."""

    # --- safety ------------------------------------------------------------------------------
    @property
    def kind(self) -> str | None:
        """What robot this is, as the env id an artifact's manifest names in `env_id` (e.g.
        "sim/CartPoleSwingUp-v0"); None when the back end cannot tell."""
        return None

    def action_limits(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The robot's own actuator limits, (low, high) float32 arrays of `action_size` values
        (a discrete robot: the index range); None when unknown. The control loop clips every
        action to these and to the manifest's."""
        return None

    def safe_action(self) -> np.ndarray:
        """The action that puts the robot in its safe state (float32, `action_size`); zeros
        unless the back end knows better (a brake, a parking position)."""
        import numpy as np  # here, not at the top: the contract stays importable without numpy

        return np.zeros(self.action_size, np.float32)

    def halt(self) -> None:  # noqa: B027  (an optional hook, empty by design)
        """Put the robot in its safe state now. Safe to call when nothing runs and more than once;
        does nothing for a robot already closed. Raises DeviceError when the robot cannot confirm
        its safe state (it answered wrongly, or not at all)."""

    def check(self) -> None:  # noqa: B027  (an optional hook, empty by design)
        """Raise DeviceError unless the robot itself answers now (a real robot: its controller;
        a simulated one always does). Called for STATUS, never while a run drives the robot."""

    def arm_watchdog(self, timeout_s: float) -> None:  # noqa: B027  (an optional hook, empty by design)
        """Ask the robot to fall to its safe state by itself if the agent goes silent for
        `timeout_s` (0 disarms). A robot with no such watchdog does nothing."""

    def describe(self) -> dict:
        limits = self.action_limits()

        def finite(values: np.ndarray) -> list[float | None]:  # JSON has no inf: None is "none"
            return [float(v) if abs(float(v)) != float("inf") else None for v in values]

        return {
            "name": self.name,
            "kind": self.kind,
            "observation_size": self.observation_size,
            "action_size": self.action_size,
            "control_hz": self.control_hz,
            "action_low": None if limits is None else finite(limits[0]),
            "action_high": None if limits is None else finite(limits[1]),
        }

    def __enter__(self) -> Robot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
