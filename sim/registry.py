"""The sim env ids, their gymnasium registrations, and `make`, the validating factory.

Leans on gymnasium's registry (`gymnasium.register` with "module:Class" entry-point strings), so
registering imports neither pybullet nor the env modules; they load on first `gymnasium.make`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gymnasium

from sim.errors import SimError

if TYPE_CHECKING:
    from sim.randomization import RandomizationConfig

BULLET_HZ = 1.0 / 0.0165  # upstream Bullet tasks' control rate (kept equal to sim.envs.bullet)

# id -> (entry point, max_episode_steps, default kwargs)
_SPECS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "sim/CartPole-v0": ("sim.envs.cartpole:CartPoleEnv", 500, {"control_hz": 50.0}),
    "sim/CartPoleSwingUp-v0": ("sim.envs.cartpole:CartPoleSwingUpEnv", 500, {"control_hz": 50.0}),
    "sim/Reacher-v0": ("sim.envs.bullet:ReacherEnv", 150, {"control_hz": BULLET_HZ}),
    "sim/Hopper-v0": ("sim.envs.bullet:HopperEnv", 1000, {"control_hz": BULLET_HZ}),
    "sim/HalfCheetah-v0": ("sim.envs.bullet:HalfCheetahEnv", 1000, {"control_hz": BULLET_HZ}),
}

ENV_IDS: tuple[str, ...] = tuple(_SPECS)


def register_all() -> None:
    """Register every sim env with gymnasium (idempotent)."""
    for env_id, (entry_point, max_steps, kwargs) in _SPECS.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(
                id=env_id, entry_point=entry_point, max_episode_steps=max_steps, kwargs=dict(kwargs)
            )


def check_env_id(env_id: str) -> str:
    if env_id not in _SPECS:
        raise SimError(f"unknown env id {env_id!r}; valid ids: {', '.join(ENV_IDS)}")
    return env_id


def make(
    env_id: str, *, randomization: RandomizationConfig | dict[str, Any] | None = None, **kwargs: Any
) -> gymnasium.Env:
    """Build a sim env by id, optionally wrapped in domain randomisation.

    randomization: None, a `RandomizationConfig`, or a dict for `RandomizationConfig.from_dict`.
    kwargs go to `gymnasium.make` (e.g. control_hz, render_mode, max_episode_steps).
    """
    check_env_id(env_id)
    register_all()
    env = gymnasium.make(env_id, **kwargs)
    if randomization is not None:
        from sim.randomization import RandomizationConfig, randomize  # here: loaded when used

        if isinstance(randomization, dict):
            randomization = RandomizationConfig.from_dict(randomization)
        elif not isinstance(randomization, RandomizationConfig):
            raise SimError(
                f"randomization={randomization!r} is invalid; "
                "give a dict or a sim.randomization.RandomizationConfig"
            )
        env = randomize(env, randomization)
    return env
