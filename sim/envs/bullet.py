"""Reacher, Hopper and HalfCheetah: pybullet_envs_gymnasium's Bullet tasks with what they lack
added around them (a control rate, sub-period actuation latency, period jitter, settable dynamics,
finite observation bounds, software rgb rendering, a DIRECT-mode client per instance).

Leans on pybullet_envs_gymnasium (ReacherBulletEnv, HopperBulletEnv, HalfCheetahBulletEnv) for the
robots, resets and rewards, so rewards stay those of the Bullet locomotion/manipulation tasks.
What is done by hand, and why:
- The robot's `apply_action` only records the command; the scene's `global_step` runs our own
  substep loop (`SubstepControl._run_control_period`), re-applying torques each substep
  (pybullet clears them after every `stepSimulation`). Upstream instead set `numSubSteps` and
  applied torques once, which leaves no place to switch from the previous to the new action
  part-way through a period. The torque formulas are upstream's (power * power_coef * clip(a)
  for walkers, 0.05 * clip(a) for the reacher) times `Dynamics.motor_gain`.
- The scene is built with `timestep = period / n_substeps`, `frame_skip = n_substeps`, so
  `scene.dt` (used by the locomotion progress reward) equals the chosen control period.
- The Reacher upstream takes one 16.5 ms physics step per action; here the same period is split
  into 4 substeps so latency has a resolution finer than a whole step.
- Observations: the locomotion robots clip to +-5 in `calc_state`, so the Box is +-5; the
  reacher's are given finite bounds (below) and clipped. Both are returned as float32.
- Dynamics: mass_scale scales every massive link of the robot (mass and inertia);
  friction_scale scales the lateral friction of the robot's links and of the ground (the reacher
  touches nothing, so it has no effect there); damping adds viscous joint damping (pybullet's
  `jointDamping`); motor_gain scales torques. Applied immediately when set and at every reset.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import gymnasium
import numpy as np

# Before anything else loads pybullet, so that its banner is silenced.
from sim.envs._quiet_bullet import direct_client, pybullet  # isort: skip
from pybullet_envs_gymnasium.env_bases import MJCFBaseBulletEnv
from pybullet_envs_gymnasium.gym_locomotion_envs import WalkerBaseBulletEnv
from pybullet_envs_gymnasium.gym_manipulator_envs import ReacherBulletEnv
from pybullet_envs_gymnasium.robot_locomotors import HalfCheetah, Hopper
from pybullet_envs_gymnasium.robot_manipulators import Reacher
from pybullet_envs_gymnasium.scene_abstract import SingleRobotEmptyScene
from pybullet_envs_gymnasium.scene_stadium import SinglePlayerStadiumScene

from sim.envs.base import SubstepControl, bounded_box, check_render_mode
from sim.errors import SimError

BULLET_PERIOD = 0.0165  # upstream control period of all three tasks
BULLET_HZ = 1.0 / BULLET_PERIOD
MAX_PHYSICS_DT = BULLET_PERIOD / 4  # upstream locomotion substep


# -- robots whose apply_action defers to the env's substep loop ------------------------------


class _DeferredActuation:
    """Mixed in before an upstream robot class. The attributes annotated without a value are the
    upstream robot's, which the env layer reads."""

    command: np.ndarray  # set by apply_action, and to zeros by the env at every reset
    objects: list[Any]  # the robot's pybullet body ids

    def apply_action(self, a: np.ndarray) -> None:
        assert np.isfinite(a).all()
        self.command = np.asarray(a, dtype=np.float64)

    def torque_coefficients(self) -> list[tuple[Any, float]]:
        """(joint, torque per unit action) for each action dimension, in action order."""
        raise NotImplementedError


class _Walker(_DeferredActuation):
    power: float
    ordered_joints: Any  # upstream Joint objects, in action order (upstream: None until loaded)
    body_real_xyz: Sequence[float]

    if TYPE_CHECKING:  # upstream's methods (below this mixin in the MRO), named for the checker

        def calc_state(self) -> np.ndarray: ...

        def calc_potential(self) -> float: ...

    def torque_coefficients(self) -> list[tuple[Any, float]]:
        return [(j, self.power * j.power_coef) for j in self.ordered_joints]


class _Hopper(_Walker, Hopper):
    pass


class _HalfCheetah(_Walker, HalfCheetah):
    pass


class _Reacher(_DeferredActuation, Reacher):
    def torque_coefficients(self) -> list[tuple[Any, float]]:
        return [(self.central_joint, 0.05), (self.elbow_joint, 0.05)]


class _SubsteppedStadium(SinglePlayerStadiumScene):
    def __init__(self, env: _BulletTask, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._env = env

    def global_step(self) -> None:
        self._env._run_control_period(self._env.robot.command)


class _SubsteppedEmpty(SingleRobotEmptyScene):
    def __init__(self, env: _BulletTask, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._env = env

    def global_step(self) -> None:
        self._env._run_control_period(self._env.robot.command)


# -- the shared layer over the upstream envs --------------------------------------------------


class _BulletTask(SubstepControl, MJCFBaseBulletEnv):
    """The layer over an upstream Bullet env class (the subclass names which); see the module
    docstring."""

    # gymnasium's Env declares metadata an instance attribute, upstream's env a ClassVar; gymnasium
    # reads this one before building an env, and each instance replaces it with its own render_fps
    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": BULLET_HZ}  # type: ignore[misc]
    robot: _DeferredActuation
    _obs_high: np.ndarray
    _cam: tuple[float, float, float] = (3.0, 0.0, -20.0)  # distance, yaw, pitch

    def _setup(
        self,
        robot: _DeferredActuation,
        render_mode: str | None,
        control_hz: float,
        base_init: Callable[..., None],
    ) -> None:
        check_render_mode(render_mode)
        self._init_control(control_hz, MAX_PHYSICS_DT)
        # The upstream env classes' own __init__ build a stock robot; call the base with ours.
        base_init(self, robot, render_mode=None)  # never the GUI
        self.render_mode = render_mode
        self.metadata = {**type(self).metadata, "render_fps": self.control_hz}  # type: ignore[misc]  # see above
        self.observation_space = bounded_box(self._obs_high)
        if not isinstance(self.action_space, gymnasium.spaces.Box):
            raise SimError(f"{type(self).__name__}: the robot's action space is not a Box")
        self._action_shape: tuple[int, ...] = self.action_space.shape
        # Captured from the simulation at the first reset (the bodies exist from then on).
        self._nominal_captured = False
        self._links: list[tuple[int, int, tuple[Any, ...]]] = []  # nominal (body, link, dynamics info)
        self._robot_bodies: set[int] = set()
        self._actuation: list[tuple[int, list[int], np.ndarray, list[int]]] = []

    # SubstepControl hooks

    def _sim_ready(self) -> bool:
        return self._nominal_captured

    def _actuate(self, action: np.ndarray) -> None:
        gain = self._dynamics.motor_gain
        for body, joints, coefs, dims in self._actuation:
            forces = gain * coefs * np.clip(action[dims], -1.0, 1.0)
            self._p.setJointMotorControlArray(body, joints, pybullet.TORQUE_CONTROL, forces=forces.tolist())

    def _contact_bodies(self) -> tuple[int, ...]:
        return ()

    def _capture_nominal(self) -> None:
        links: list[tuple[int, int, tuple[Any, ...]]] = []
        for body in list(self.robot.objects) + list(self._contact_bodies()):
            for link in range(-1, self._p.getNumJoints(body)):
                links.append((body, link, self._p.getDynamicsInfo(body, link)))
        self._links = links
        self._robot_bodies = set(self.robot.objects)
        grouped: dict[int, tuple[list[int], list[float], list[int]]] = defaultdict(lambda: ([], [], []))
        for dim, (joint, coef) in enumerate(self.robot.torque_coefficients()):
            joints, coefs, dims = grouped[joint.bodies[joint.bodyIndex]]
            joints.append(joint.jointIndex)
            coefs.append(coef)
            dims.append(dim)
        self._actuation = [(b, j, np.array(c), d) for b, (j, c, d) in grouped.items()]
        self._nominal_captured = True

    def _apply_dynamics(self) -> None:
        if not self._nominal_captured:
            self._capture_nominal()
        d = self._dynamics
        for body, link, info in self._links:
            mass, friction, inertia = info[0], info[1], info[2]
            kwargs: dict[str, Any] = {"lateralFriction": friction * d.friction_scale}
            if body in self._robot_bodies:
                if mass > 0:
                    kwargs["mass"] = mass * d.mass_scale
                    kwargs["localInertiaDiagonal"] = [i * d.mass_scale for i in inertia]
                if link >= 0:
                    kwargs["jointDamping"] = d.damping
            self._p.changeDynamics(body, link, **kwargs)

    # gymnasium API

    # positional seed/options allowed, as upstream's reset allows them
    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if self.physicsClientId < 0:
            # Our own DIRECT client: upstream's default first tries shared memory, which would
            # attach to any GUI server running on the machine.
            self._p = direct_client()
            self._p.resetSimulation()
            self._p.setPhysicsEngineParameter(deterministicOverlappingPairs=1)
            self.physicsClientId = self._p._client
            self.ownsPhysicsClient = True
        obs, info = super().reset(seed=seed, options=options)
        self.robot.command = np.zeros(self._action_shape, dtype=np.float64)
        self._reset_control(self._action_shape[0])
        return self._clip(obs), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(self._action_shape), -1.0, 1.0)
        obs, reward, terminated, truncated, info = super().step(a)
        return self._clip(obs), float(reward), bool(terminated), bool(truncated), info

    def _clip(self, obs: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(obs, dtype=np.float32), -self._obs_high, self._obs_high)

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array" or self.physicsClientId < 0:
            return None
        distance, yaw, pitch = self._cam
        return self._render_rgb(self._camera_target(), distance, yaw, pitch)

    def _camera_target(self) -> Sequence[float]:
        raise NotImplementedError


class _WalkerTask(_BulletTask, WalkerBaseBulletEnv):
    robot: _Walker
    _obs_high_value = 5.0  # calc_state clips to +-5

    def _camera_target(self) -> Sequence[float]:
        return self.robot.body_real_xyz

    def create_single_player_scene(self, bullet_client: Any) -> _SubsteppedStadium:
        self.stadium_scene = _SubsteppedStadium(
            self, bullet_client, gravity=9.8, timestep=self.physics_dt, frame_skip=self.n_substeps
        )
        return self.stadium_scene

    def _contact_bodies(self) -> tuple[int, ...]:
        return tuple(self.stadium_scene.ground_plane_mjcf)

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed, options=options)
        # Upstream computes the reset state and potential before re-adding the floor to the
        # robot's parts, which every later calc_state includes in its mean position; in the
        # first episode of an instance that gives step 1 a spurious progress reward (~0.1).
        # Recomputing here makes every episode, first or not, start from the same numbers.
        state = self.robot.calc_state()
        self.potential = self.robot.calc_potential()
        return self._clip(state), {}


class HopperEnv(_WalkerTask):
    """pybullet_envs_gymnasium's HopperBulletEnv (same reward and termination) with our additions."""

    def __init__(self, render_mode: str | None = None, control_hz: float = BULLET_HZ) -> None:
        self._obs_high = np.full(15, 5.0, dtype=np.float32)
        self._setup(_Hopper(), render_mode, control_hz, WalkerBaseBulletEnv.__init__)


class HalfCheetahEnv(_WalkerTask):
    """pybullet_envs_gymnasium's HalfCheetahBulletEnv (same reward, never terminates) with our additions."""

    def __init__(self, render_mode: str | None = None, control_hz: float = BULLET_HZ) -> None:
        self._obs_high = np.full(26, 5.0, dtype=np.float32)
        self._setup(_HalfCheetah(), render_mode, control_hz, WalkerBaseBulletEnv.__init__)

    def _isDone(self) -> bool:  # upstream's name
        return False


class ReacherEnv(_BulletTask, ReacherBulletEnv):
    """pybullet_envs_gymnasium's ReacherBulletEnv (same reward) with our additions.

    Observation bounds: target x, y within +-0.27 (upstream's TARG_LIMIT); fingertip-to-target
    vector +-1 m; cos/sin +-1; upstream's joint velocities are 0.1 * rad/s, bounded at +-10
    (100 rad/s); the elbow position is scaled to about [-1, 1] upstream, bounded at +-1.5.
    """

    _cam = (0.9, 0.0, -89.0)

    def __init__(self, render_mode: str | None = None, control_hz: float = BULLET_HZ) -> None:
        self._obs_high = np.array([0.27, 0.27, 1.0, 1.0, 1.0, 1.0, 10.0, 1.5, 10.0], dtype=np.float32)
        self._setup(_Reacher(), render_mode, control_hz, MJCFBaseBulletEnv.__init__)

    def create_single_player_scene(self, bullet_client: Any) -> _SubsteppedEmpty:
        return _SubsteppedEmpty(
            self, bullet_client, gravity=0.0, timestep=self.physics_dt, frame_skip=self.n_substeps
        )

    def _camera_target(self) -> Sequence[float]:
        return (0.0, 0.0, 0.0)
