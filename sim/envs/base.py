"""Control-period machinery shared by every sim env: control rate, sub-period actuation latency,
period jitter, dynamics bookkeeping and software rendering.

Leans on pybullet for physics. The substep loop is written by hand rather than using pybullet's
`numSubSteps`, because pybullet clears applied joint torques after every `stepSimulation` call
and gives no hook between its internal substeps: holding the previous action for part of the
control period (actuation latency) and stretching the period (jitter) both need control at
substep granularity. So each env sets `numSubSteps=1` and calls `stepSimulation` once per
substep, re-applying the actuation each time.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np

from sim.dynamics import Dynamics
from sim.errors import SimError

if TYPE_CHECKING:
    import gymnasium


class SubstepControl:
    """Mixin giving an env a control rate built from physics substeps it steps itself.

    Subclasses call `_init_control` in `__init__`, `_reset_control` after each reset, run one
    control period with `_run_control_period(action)`, and implement `_actuate` (apply one
    action for one substep) and `_apply_dynamics` (push `self.dynamics` into pybullet).
    `self._p` is the env's own `BulletClient`.
    """

    _p: Any

    def _init_control(self, control_hz: float, max_physics_dt: float) -> None:
        if not (isinstance(control_hz, (int, float)) and math.isfinite(control_hz) and control_hz > 0):
            raise SimError(f"control_hz={control_hz!r} is invalid; it must be a finite number > 0")
        self.control_hz = float(control_hz)
        self.dt = 1.0 / self.control_hz
        # Substeps never longer than the env's nominal physics step, and a whole number of them
        # per control period, so the control rate is exactly what was asked for.
        self.n_substeps = max(1, math.ceil(self.dt / max_physics_dt - 1e-9))
        self.physics_dt = self.dt / self.n_substeps
        self._actuation_latency_s = 0.0
        self.period_scale = 1.0  # one-shot: stretches the next control period (set by jitter)
        self._dynamics = Dynamics()
        self._prev_action: np.ndarray | None = None
        self._engine_dt: float | None = None

    # -- public knobs -------------------------------------------------------------------------

    @property
    def actuation_latency_s(self) -> float:
        """Seconds the previous action is held at the start of each control period."""
        return self._actuation_latency_s

    @actuation_latency_s.setter
    def actuation_latency_s(self, value: float) -> None:
        value = float(value)
        if not (math.isfinite(value) and 0.0 <= value < self.dt):
            raise SimError(
                f"actuation_latency_s={value!r} is invalid; it must be in [0, {self.dt:g}) "
                f"(one control period at {self.control_hz:g} Hz); use an action delay of whole "
                "steps for the rest"
            )
        self._actuation_latency_s = value

    @property
    def dynamics(self) -> Dynamics:
        return self._dynamics

    def set_dynamics(self, dynamics: Dynamics) -> None:
        """Use `dynamics` from now on: applied immediately if the simulation exists, and
        re-applied (from the nominal values, never compounded) at every reset."""
        if not isinstance(dynamics, Dynamics):
            raise SimError(f"set_dynamics expects a sim.Dynamics, got {type(dynamics).__name__}")
        self._dynamics = dynamics
        if self._sim_ready():
            self._apply_dynamics()

    def set_held_action(self, action: np.ndarray | None) -> None:
        """Set what the motors hold during the next period's actuation latency: the action the
        previous period applied (None: zero, as after a reset). For replaying a recorded run from
        its middle, e.g. to identify a robot twin; a normal episode never needs it."""
        self._prev_action = None if action is None else np.array(action, dtype=np.float64).reshape(-1)

    # -- hooks for subclasses -----------------------------------------------------------------

    @abstractmethod
    def _sim_ready(self) -> bool:
        """True once the bodies are loaded and dynamics can be applied."""

    @abstractmethod
    def _actuate(self, action: np.ndarray) -> None:
        """Apply `action` (already clipped to the action space) for one physics substep."""

    @abstractmethod
    def _apply_dynamics(self) -> None:
        """Set masses, friction and damping in pybullet from the nominal values and `self.dynamics`."""

    # -- the control period -------------------------------------------------------------------

    def _reset_control(self, action_dim: int) -> None:
        self._prev_action = np.zeros(action_dim, dtype=np.float64)
        self.period_scale = 1.0
        # Scenes reset engine parameters on episode restart, and pybullet turns a motor's force
        # limit into an impulse with the time step current when the motor is set, so the time
        # step must be right before dynamics (friction motors) are applied.
        self._engine_dt = None
        self._set_engine_dt(self.physics_dt)
        self._apply_dynamics()

    def _set_engine_dt(self, sub_dt: float) -> None:
        if self._engine_dt != sub_dt:
            self._p.setPhysicsEngineParameter(fixedTimeStep=sub_dt, numSubSteps=1)
            self._engine_dt = sub_dt
            self._on_engine_dt_changed()

    def _on_engine_dt_changed(self) -> None:
        """Hook: re-issue anything pybullet scaled by the time step (motor force limits)."""

    def _run_control_period(self, action: np.ndarray) -> None:
        sub_dt = self.physics_dt * self.period_scale
        self.period_scale = 1.0
        self._set_engine_dt(sub_dt)
        # Latency is quantised to whole substeps (nearest), never more than the whole period.
        n_hold = min(self.n_substeps, round(self._actuation_latency_s / sub_dt))
        prev = self._prev_action if self._prev_action is not None else np.zeros_like(action)
        for k in range(self.n_substeps):
            self._actuate(prev if k < n_hold else action)
            self._p.stepSimulation()
        self._prev_action = action

    # -- rendering ----------------------------------------------------------------------------

    def _render_rgb(
        self, target: Any, distance: float, yaw: float, pitch: float, width: int = 320, height: int = 240
    ) -> np.ndarray:
        import pybullet  # here: only the env modules import pybullet

        view = self._p.computeViewMatrixFromYawPitchRoll(
            cameraTargetPosition=list(target), distance=distance, yaw=yaw, pitch=pitch, roll=0, upAxisIndex=2
        )
        proj = self._p.computeProjectionMatrixFOV(fov=60, aspect=width / height, nearVal=0.1, farVal=100.0)
        _, _, px, _, _ = self._p.getCameraImage(
            width=width,
            height=height,
            viewMatrix=view,
            projectionMatrix=proj,
            renderer=pybullet.ER_TINY_RENDERER,
        )
        return np.reshape(np.asarray(px, dtype=np.uint8), (height, width, 4))[:, :, :3]


def bounded_box(high: np.ndarray) -> Any:
    """A float32 Box symmetric about zero with finite limits."""
    import gymnasium.spaces

    high = np.asarray(high, dtype=np.float32)
    return gymnasium.spaces.Box(-high, high, dtype=np.float32)


def check_render_mode(render_mode: str | None) -> None:
    if render_mode not in (None, "rgb_array"):
        raise SimError(f"render_mode={render_mode!r} is not supported; valid: None, 'rgb_array'")


def substep_control(env: gymnasium.Env) -> SubstepControl:
    """The sim env under `env`'s wrappers, typed for its control knobs (`dt`, `control_hz`,
    `actuation_latency_s`, `period_scale`, `set_dynamics`); SimError if it is not a sim env."""
    inner = env.unwrapped
    if not isinstance(inner, SubstepControl):
        raise SimError(f"{type(inner).__name__} is not a sim env (it has no SubstepControl)")
    return inner
