"""Robot back ends, chosen by a spec string: `sim:PROFILE` (the sim-backed twin of a reality
profile) or `serial:URL` (a microcontroller speaking SERIAL_ROBOT.md over a pyserial URL).

Back ends are imported only when chosen (gymnasium-registry style), so the serial robot never
imports `sim` and the sim twin is the only module that may.
"""

from __future__ import annotations

from device_agents.errors import DeviceError
from device_agents.robots.base import Robot

SPEC_FORMS = (
    "sim:PROFILE (e.g. sim:cartpole-lab-a)",
    "serial:URL (e.g. serial:/dev/ttyACM0?baudrate=115200, serial:socket://host:port)",
)

__all__ = ["SPEC_FORMS", "Robot", "check_spec", "make_robot"]


def check_spec(spec: str) -> str:
    """The back-end kind of `spec` ("sim" or "serial"); DeviceError naming the valid forms."""
    if not isinstance(spec, str) or ":" not in spec:
        raise DeviceError(f"robot spec {spec!r} is not valid; use one of: {'; '.join(SPEC_FORMS)}")
    kind, _, rest = spec.partition(":")
    if not rest:
        raise DeviceError(f"robot spec {spec!r} lacks its argument; use one of: {'; '.join(SPEC_FORMS)}")
    if kind not in ("sim", "serial"):
        raise DeviceError(
            f"robot back end {kind!r} in {spec!r} is unknown; use one of: {'; '.join(SPEC_FORMS)}"
        )
    return kind


def make_robot(spec: str, fast: bool = False) -> Robot:
    """Build the robot named by `spec`; `fast` tells a simulated one not to keep real time."""
    kind = check_spec(spec)
    rest = spec.partition(":")[2]
    if kind == "sim":
        from device_agents.robots.sim_twin import SimTwin

        return SimTwin(rest, fast=fast)
    if kind == "serial":
        from device_agents.robots.serial_mcu import SerialRobot

        return SerialRobot(rest)
    raise AssertionError(kind)  # check_spec lets only the kinds above through
