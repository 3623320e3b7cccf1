"""Cart-pole balance and swing-up on pybullet_data's `cartpole.urdf`, with a control rate,
actuation latency, settable dynamics and a bounded observation space.

Written by hand rather than reusing pybullet_envs_gymnasium's InvertedPendulum envs: those load a
different MJCF robot (`inverted_pendulum.xml`) and declare unbounded observations, while the
robot twin here must be the URDF cart-pole with finite, clipped observation limits that an int8
export can be calibrated against.

Physics: a prismatic slider (cart, 1 kg) and a free hinge (pole, 0.1 kg, 1 m; pybullet computes
its inertia from the collision box, about that of a thin rod). The default velocity motors are
replaced by zero-target velocity motors with a small force limit, which is how pybullet models
Coulomb joint friction; `Dynamics.friction_scale` scales those limits. The action is a force on
the slider, `a * max_force * motor_gain`, applied with TORQUE_CONTROL every substep.

Observation: [x, x_dot, cos(theta), sin(theta), theta_dot], theta = 0 with the pole upright,
clipped to finite bounds.
"""

from __future__ import annotations

import math
import os
from typing import Any, SupportsFloat

import gymnasium
import numpy as np

# Before anything else loads pybullet, so that its banner is silenced.
from sim.envs._quiet_bullet import direct_client, pybullet  # isort: skip
import pybullet_data

from sim.envs.base import SubstepControl, bounded_box, check_render_mode
from sim.errors import SimError

SLIDER, HINGE = 0, 1
CART_LINK, POLE_LINK = 0, 1
# Nominal Coulomb friction of the rail (N) and the pole hinge (N*m), scaled by friction_scale.
SLIDER_FRICTION = 0.05
HINGE_FRICTION = 0.0005
MAX_PHYSICS_DT = 1.0 / 240.0
VEL_LIMIT = 20.0  # m/s, bound of x_dot in the observation
ANG_VEL_LIMIT = 40.0  # rad/s, bound of theta_dot in the observation


class CartPoleEnv(SubstepControl, gymnasium.Env):
    """Balance the pole: +1 per step alive; ends when |theta| > theta_threshold or |x| > x_threshold."""

    # each instance replaces it with its own render_fps; gymnasium declares it an instance dict
    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}  # noqa: RUF012

    def __init__(
        self,
        render_mode: str | None = None,
        control_hz: float = 50.0,
        max_force: float = 10.0,
        x_threshold: float = 2.4,
        theta_threshold: float = 12 * math.pi / 180,
    ) -> None:
        check_render_mode(render_mode)
        self.render_mode = render_mode
        self._init_control(control_hz, MAX_PHYSICS_DT)
        self.metadata = {**type(self).metadata, "render_fps": self.control_hz}
        self.max_force = float(max_force)
        self.x_threshold = float(x_threshold)
        self.theta_threshold = float(theta_threshold)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)
        self._obs_high = np.array(
            [2 * self.x_threshold, VEL_LIMIT, 1.0, 1.0, ANG_VEL_LIMIT], dtype=np.float32
        )
        self.observation_space = bounded_box(self._obs_high)

        # One physics client per env instance, so many envs can live in one process.
        self._p = direct_client()
        self._build_world()
        self._nominal = {link: self._p.getDynamicsInfo(self._body, link) for link in (CART_LINK, POLE_LINK)}

    def _build_world(self) -> None:
        # Rebuilt at every reset (about a millisecond) so no solver or motor state carries over
        # from the last episode: same seed and actions, same trajectory.
        self._p.resetSimulation()
        self._p.setPhysicsEngineParameter(deterministicOverlappingPairs=1)
        self._p.setGravity(0, 0, -9.8)
        self._body = self._p.loadURDF(
            os.path.join(pybullet_data.getDataPath(), "cartpole.urdf"), [0, 0, 0], useFixedBase=True
        )
        for link in (CART_LINK, POLE_LINK):
            # pybullet's default 0.04 link damping would hide the joint damping we control.
            self._p.changeDynamics(self._body, link, linearDamping=0.0, angularDamping=0.0)

    # -- SubstepControl hooks -----------------------------------------------------------------

    def _sim_ready(self) -> bool:
        return True

    def _actuate(self, action: np.ndarray) -> None:
        force = float(action[0]) * self.max_force * self._dynamics.motor_gain
        self._p.setJointMotorControl2(self._body, SLIDER, pybullet.TORQUE_CONTROL, force=force)

    def _apply_dynamics(self) -> None:
        d = self._dynamics
        for link, info in self._nominal.items():
            mass, inertia = info[0], info[2]
            self._p.changeDynamics(
                self._body,
                link,
                mass=mass * d.mass_scale,
                localInertiaDiagonal=[i * d.mass_scale for i in inertia],
                jointDamping=d.damping,
            )
        self._on_engine_dt_changed()

    def _on_engine_dt_changed(self) -> None:
        # Friction motors: pybullet stores force * time step, so re-issue them when the step changes.
        for joint, friction in ((SLIDER, SLIDER_FRICTION), (HINGE, HINGE_FRICTION)):
            self._p.setJointMotorControl2(
                self._body,
                joint,
                pybullet.VELOCITY_CONTROL,
                targetVelocity=0.0,
                force=friction * self._dynamics.friction_scale,
            )

    # -- gymnasium API ------------------------------------------------------------------------

    def _initial_state(self) -> np.ndarray:
        """x, x_dot, theta, theta_dot at reset, drawn from the env's seeded RNG."""
        return self.np_random.uniform(-0.05, 0.05, size=4)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        x, x_dot, theta, theta_dot = self._initial_state()
        self._build_world()
        self._p.resetJointState(self._body, SLIDER, float(x), float(x_dot))
        self._p.resetJointState(self._body, HINGE, float(theta), float(theta_dot))
        self._reset_control(action_dim=1)
        return self._observe(), {}

    def step(self, action: Any) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(1), -1.0, 1.0)
        self._run_control_period(a)
        x, _, theta, _ = self._state()
        obs = self._observe()
        terminated = self._terminated(x, theta)
        reward = self._reward(x, theta, a)
        return obs, reward, terminated, False, {"theta": theta, "x": x}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        x = self._state()[0]
        return self._render_rgb(target=(x, 0.0, 0.5), distance=4.0, yaw=0.0, pitch=-10.0)

    def close(self) -> None:
        if getattr(self, "_p", None) is not None:
            self._p.disconnect()
            self._p = None

    def set_state_from_observation(self, obs: Any) -> None:
        """Put the cart and pole in the state an observation [x, x_dot, cos, sin, theta_dot]
        describes (theta = atan2(sin, cos)), without a reset: the world, the dynamics and the held
        action stay as they are. For replaying a recorded run from any of its observations
        (robot-twin identification); a normal episode never needs it."""
        values = np.asarray(obs, dtype=np.float64).reshape(-1)
        if values.shape != (5,) or not np.all(np.isfinite(values)):
            raise SimError(
                f"a cart-pole state needs 5 finite observation values [x, x_dot, cos, sin, theta_dot], "
                f"got {values.size} ({values.tolist()!r})"
            )
        x, x_dot, cos_theta, sin_theta, theta_dot = (float(v) for v in values)
        self._p.resetJointState(self._body, SLIDER, x, x_dot)
        self._p.resetJointState(self._body, HINGE, math.atan2(sin_theta, cos_theta), theta_dot)

    # -- task definition ----------------------------------------------------------------------

    def _state(self) -> tuple[float, float, float, float]:
        x, x_dot = self._p.getJointState(self._body, SLIDER)[:2]
        theta, theta_dot = self._p.getJointState(self._body, HINGE)[:2]
        return x, x_dot, theta, theta_dot

    def _observe(self) -> np.ndarray:
        x, x_dot, theta, theta_dot = self._state()
        obs = np.array([x, x_dot, math.cos(theta), math.sin(theta), theta_dot], dtype=np.float32)
        return np.clip(obs, -self._obs_high, self._obs_high)

    def _terminated(self, x: float, theta: float) -> bool:
        wrapped = math.remainder(theta, 2 * math.pi)
        return bool(abs(x) > self.x_threshold or abs(wrapped) > self.theta_threshold)

    def _reward(self, x: float, theta: float, action: np.ndarray) -> float:
        return 1.0


class CartPoleSwingUpEnv(CartPoleEnv):
    """Swing the pole up from hanging and hold it: reward (1 + cos theta)/2 minus small cart-position
    and force penalties (so it lies in about [-0.02, 1]); no termination on angle, only when the cart
    leaves the rail (|x| > x_threshold), which forfeits the remaining non-negative rewards.

    (1 + cos theta)/2 rather than cos theta keeps the per-step reward non-negative, so ending the
    episode early by running off the rail never pays.
    """

    def __init__(
        self,
        render_mode: str | None = None,
        control_hz: float = 50.0,
        max_force: float = 10.0,
        x_threshold: float = 2.4,
    ) -> None:
        super().__init__(
            render_mode=render_mode,
            control_hz=control_hz,
            max_force=max_force,
            x_threshold=x_threshold,
            theta_threshold=math.inf,
        )

    def _initial_state(self) -> np.ndarray:
        state = self.np_random.uniform(-0.05, 0.05, size=4)
        state[2] += math.pi  # hanging down
        return state

    def _terminated(self, x: float, theta: float) -> bool:
        return bool(abs(x) > self.x_threshold)

    def _reward(self, x: float, theta: float, action: np.ndarray) -> float:
        upright = 0.5 * (1.0 + math.cos(theta))
        return float(upright - 0.01 * (x / self.x_threshold) ** 2 - 0.01 * float(action[0]) ** 2)
