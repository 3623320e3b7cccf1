"""Robot back ends, chosen by a spec string `SCHEME:ARGUMENT` from one table, `BACKENDS`:
`sim:PROFILE` (the sim-backed twin of a reality profile) or `serial:URL` (a microcontroller
speaking SERIAL_ROBOT.md over a pyserial URL). The agent builds its robot through it and the
CLI's `--robot` help is written from it.

Back ends are imported only when chosen (gymnasium-registry style), so the serial robot never
imports `sim` and the sim twin is the only module that may. Importing this package needs only
the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

from device_agents.errors import DeviceError
from device_agents.robots.base import Robot


class Backend(NamedTuple):
    """One row of `BACKENDS`."""

    form: str  # how a spec of this scheme is written, with an example
    make: Callable[[str, bool], Robot]  # (the spec's argument, fast) -> the robot
    # True: a simulated stand-in for the robot, computer included (`Robot.compute_time`), that
    # BENCH may build to convert this machine's timings; False: hardware, opened only to run.
    simulated: bool


def _sim_twin(profile: str, fast: bool) -> Robot:
    from device_agents.robots.sim_twin import SimTwin

    return SimTwin(profile, fast=fast)


def _serial_mcu(url: str, fast: bool) -> Robot:
    from device_agents.robots.serial_mcu import SerialRobot

    return SerialRobot(url)  # a physical robot keeps real time whatever `fast` says


BACKENDS: dict[str, Backend] = {
    "sim": Backend("sim:PROFILE (e.g. sim:cartpole-lab-a)", _sim_twin, simulated=True),
    "serial": Backend(
        "serial:URL (e.g. serial:/dev/ttyACM0?baudrate=115200, serial:socket://host:port)",
        _serial_mcu,
        simulated=False,
    ),
}
SPEC_FORMS = tuple(b.form for b in BACKENDS.values())

__all__ = ["BACKENDS", "SPEC_FORMS", "Backend", "Robot", "RobotSpec", "make_robot", "parse_spec"]


@dataclass(frozen=True)
class RobotSpec:
    """A parsed robot spec: its scheme (a key of `BACKENDS`), its argument and its back end."""

    scheme: str
    argument: str
    backend: Backend

    def make(self, fast: bool = False) -> Robot:
        return self.backend.make(self.argument, fast)


def parse_spec(spec: str) -> RobotSpec:
    """`spec` looked up in `BACKENDS`; DeviceError naming the valid forms."""
    forms = "; ".join(SPEC_FORMS)
    if not isinstance(spec, str) or ":" not in spec:
        raise DeviceError(f"robot spec {spec!r} is not valid; use one of: {forms}")
    scheme, _, argument = spec.partition(":")
    if not argument:
        raise DeviceError(f"robot spec {spec!r} lacks its argument; use one of: {forms}")
    backend = BACKENDS.get(scheme)
    if backend is None:
        raise DeviceError(
            f"robot back end {scheme!r} in {spec!r} is unknown; known back ends: "
            f"{', '.join(BACKENDS)}; use one of: {forms}"
        )
    return RobotSpec(scheme, argument, backend)


def make_robot(spec: str, fast: bool = False) -> Robot:
    """Build the robot named by `spec`; `fast` tells a simulated one not to keep real time."""
    return parse_spec(spec).make(fast)
