"""Reality profiles: named, fixed parameter sets that play the physical robot in tests and demos.

THESE ARE SIMULATED STAND-INS, NOT MEASUREMENTS OF REAL ROBOTS. Each profile is a sim env with
dynamics the search never sees (masses, friction, damping, motor gain), sensor noise, whole-step
action delay and sub-period actuation latency, so that a deployed policy meets a gap on a machine
with no robot. The figures are data in `sim/reality_profiles.toml`, not code.

Robots are user data too: `$ROBONAS_REALITY_PROFILES` names more TOML files (or folders of
them), separated like PATH, in the same format, so a user describes a robot without editing the
installed package. A user profile may not reuse a packaged or another file's name: a silent
shadow would make two machines disagree about the same robot.

Leans on the standard library's tomllib (Python 3.11+, like the rest of the host side) and on
`sim.randomization` with degenerate (x, x) ranges: a profile is a randomisation that always
draws the same values, so its noise comes from the env's seeded RNG and a profile is the same
every time it is built and reset with the same seed.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import gymnasium

from sim.dynamics import Dynamics
from sim.envs.base import substep_control
from sim.errors import SimError
from sim.registry import check_env_id, make


@dataclass(frozen=True)
class RealityProfile:
    name: str
    description: str
    env_id: str
    mass_scale: float
    friction_scale: float
    damping: float
    motor_gain: float
    obs_noise_std: float
    action_delay: int
    actuation_latency_s: float
    # How many times slower the stand-in robot's on-board computer is than the machine running
    # the agent: the robot twin multiplies the measured inference time by it before the action
    # takes effect (see device_agents/robots/sim_twin.py). 1.0: as fast as this machine.
    compute_scale: float = 1.0
    # The stand-in robot computer's int8 arithmetic rate (multiply-accumulates per second), for a
    # robot whose cost grows with the network rather than with interpreter overhead (an MCU
    # without SIMD kernels): the twin adds the policy's MACs / this rate. 0: no such term.
    compute_macs_per_s: float = 0.0

    @property
    def dynamics(self) -> Dynamics:
        return Dynamics(self.mass_scale, self.friction_scale, self.damping, self.motor_gain)

    def randomization(self) -> dict[str, Any]:
        """The profile as a degenerate randomisation config (every range is a single value)."""
        d = self.dynamics
        return {
            "mass_scale": (d.mass_scale, d.mass_scale),
            "friction_scale": (d.friction_scale, d.friction_scale),
            "damping": (d.damping, d.damping),
            "motor_gain": (d.motor_gain, d.motor_gain),
            "obs_noise_std": (self.obs_noise_std, self.obs_noise_std),
            "action_delay": (self.action_delay, self.action_delay),
        }


PROFILES_ENV = "ROBONAS_REALITY_PROFILES"
PACKAGED = "reality_profiles.toml"


def _parse(text: str, origin: str) -> dict[str, RealityProfile]:
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SimError(f"reality profiles {origin}: not valid TOML: {e}") from e
    expected = {f.name for f in fields(RealityProfile)} - {"name"}
    optional = {"compute_scale", "compute_macs_per_s"}
    profiles = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise SimError(f"reality profiles {origin}: {name!r} is not a table of profile keys")
        missing, unknown = expected - optional - set(entry), set(entry) - expected
        if missing or unknown:
            raise SimError(
                f"reality profile {name!r} in {origin}: missing {sorted(missing)}, "
                f"unknown {sorted(unknown)}; expected keys {sorted(expected)}"
            )
        check_env_id(entry["env_id"])
        profile = RealityProfile(name=name, **entry)
        profile.dynamics  # noqa: B018  (validates the values)
        if not (isinstance(profile.compute_scale, (int, float)) and profile.compute_scale >= 1.0):
            raise SimError(
                f"reality profile {name!r}: compute_scale={profile.compute_scale!r} "
                "must be a number >= 1 (times slower than this machine)"
            )
        rate = profile.compute_macs_per_s
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate >= 0.0):
            raise SimError(
                f"reality profile {name!r}: compute_macs_per_s={rate!r} must be a "
                "number >= 0 (0: no arithmetic cost term)"
            )
        profiles[name] = profile
    return profiles


def user_profile_files(value: str | None = None) -> tuple[Path, ...]:
    """The user's profile files named by `value` (default: $ROBONAS_REALITY_PROFILES)."""
    value = os.environ.get(PROFILES_ENV, "") if value is None else value
    files: list[Path] = []
    for part in filter(None, value.split(os.pathsep)):
        path = Path(part).expanduser()
        if path.is_dir():
            files.extend(sorted(path.glob("*.toml")))
        elif path.is_file():
            files.append(path)
        else:
            raise SimError(f"${PROFILES_ENV}: {part!r} is neither a TOML file nor a folder of them")
    return tuple(files)


@lru_cache(maxsize=8)
def _load(user_files: tuple[Path, ...] = ()) -> dict[str, RealityProfile]:
    text = resources.files("sim").joinpath(PACKAGED).read_text(encoding="utf-8")
    profiles = _parse(text, PACKAGED)
    origin = dict.fromkeys(profiles, PACKAGED)
    for path in user_files:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise SimError(f"reality profiles {path}: cannot read: {e}") from e
        for name, profile in _parse(text, str(path)).items():
            if name in profiles:
                raise SimError(
                    f"reality profile {name!r} in {path} reuses a name from {origin[name]}; "
                    "give the robot a name of its own"
                )
            profiles[name], origin[name] = profile, str(path)
    return profiles


def _profiles() -> dict[str, RealityProfile]:
    return _load(user_profile_files())


def list_profiles() -> list[str]:
    """Names of the reality profiles, sorted."""
    return sorted(_profiles())


def get_profile(name: str) -> RealityProfile:
    profiles = _profiles()
    if name not in profiles:
        raise SimError(f"unknown reality profile {name!r}; valid profiles: {', '.join(sorted(profiles))}")
    return profiles[name]


def make_reality(name: str, **kwargs: Any) -> gymnasium.Env:
    """Build the env of profile `name` with its hidden dynamics, noise, delay and latency.

    kwargs go to `gymnasium.make` (render_mode, control_hz, ...); `randomization` is not allowed,
    the profile is the randomisation.
    """
    profile = get_profile(name)
    if "randomization" in kwargs:
        raise SimError("make_reality does not take randomization=; a reality profile fixes every parameter")
    env = make(profile.env_id, randomization=profile.randomization(), **kwargs)
    substep_control(env).actuation_latency_s = profile.actuation_latency_s
    return env
