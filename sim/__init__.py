"""Simulated robots for robonas: gymnasium environments on pybullet, domain randomisation and
reality profiles (simulated stand-ins for physical robots).

Importing `sim` is cheap: it registers the env ids with gymnasium by entry-point string and
imports no pybullet; env modules load on the first `gymnasium.make("sim/...")` or `sim.make`.

    import sim
    env = sim.make("sim/CartPole-v0", randomization={"mass_scale": (0.8, 1.2)})
"""

from __future__ import annotations

from sim.dynamics import Dynamics
from sim.errors import SimError
from sim.registry import ENV_IDS, make, register_all

register_all()

__all__ = ["ENV_IDS", "Dynamics", "SimError", "make"]
