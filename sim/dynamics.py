"""Physical parameters that can differ between simulated robots: the `Dynamics` dataclass.

Pure data, no pybullet here, so `import sim` stays cheap. Each env maps the four factors onto
its own bodies (see `sim.envs.base.SubstepBulletEnv.set_dynamics`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sim.errors import SimError


@dataclass(frozen=True)
class Dynamics:
    """Multipliers and additions applied on top of an env's nominal physics.

    mass_scale: multiplies every link mass (and its inertia) of the robot.
    friction_scale: multiplies the nominal friction (contact friction, and the Coulomb joint
        friction of the cart-pole joints).
    damping: viscous joint damping added to every actuated/free joint (N*s/m or N*m*s/rad).
    motor_gain: multiplies the force/torque an action produces.
    """

    mass_scale: float = 1.0
    friction_scale: float = 1.0
    damping: float = 0.0
    motor_gain: float = 1.0

    def __post_init__(self) -> None:
        for name in ("mass_scale", "friction_scale", "motor_gain"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SimError(f"Dynamics.{name}={value!r} is invalid; it must be a finite number > 0")
        if not (math.isfinite(self.damping) and self.damping >= 0):
            raise SimError(f"Dynamics.damping={self.damping!r} is invalid; it must be a finite number >= 0")
