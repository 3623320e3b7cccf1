"""The serial robot back end: a microcontroller speaking the line protocol of SERIAL_ROBOT.md.

Leans on pyserial (`serial.serial_for_url`), so the same code drives `/dev/ttyACM0`, a pty,
`socket://host:port` or `rfc2217://`. The protocol is ASCII lines, one request and one reply
each, so it can be typed by hand on a serial console and parsed on an MCU with `strtof`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable
from urllib.parse import parse_qsl

import numpy as np
import serial

from device_agents.errors import DeviceError
from device_agents.robots.base import Robot

DEFAULT_BAUDRATE = 115200
DEFAULT_TIMEOUT_S = 2.0
MAX_LINE = 4096  # bytes; a longer reply is a fault, not an observation
_PARAMS: dict[str, Callable[[str], float]] = {"baudrate": int, "timeout": float}


class SerialRobotError(DeviceError):
    """The MCU did not answer, answered `E ...`, or answered something unreadable."""


def _fmt(x: float) -> str:
    return format(float(x), ".9g")


def parse_url(url: str) -> tuple[str, dict[str, Any], float]:
    """(pyserial URL, kwargs, reply timeout) from `PATH?baudrate=N&timeout=S` or a pyserial URL."""
    path, _, query = url.partition("?")
    kwargs: dict[str, Any] = {}
    timeout = DEFAULT_TIMEOUT_S
    if "://" in path and query:
        return url, kwargs, timeout  # pyserial URL handlers parse their own options
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _PARAMS:
            raise SerialRobotError(
                f"serial robot {url!r}: unknown option {key!r}; valid: {', '.join(sorted(_PARAMS))}"
            )
        try:
            parsed = _PARAMS[key](value)
        except ValueError as e:
            raise SerialRobotError(f"serial robot {url!r}: bad {key}={value!r}") from e
        if key == "timeout":
            timeout = float(parsed)
        else:
            kwargs[key] = parsed
    if "://" not in path:
        kwargs.setdefault("baudrate", DEFAULT_BAUDRATE)
    return path, kwargs, timeout


class SerialRobot(Robot):
    def __init__(self, url: str, timeout_s: float | None = None):
        target, kwargs, timeout = parse_url(url)
        self.timeout_s = timeout if timeout_s is None else timeout_s
        self.name = f"serial:{url}"
        try:
            self._port = serial.serial_for_url(
                target, timeout=self.timeout_s, write_timeout=self.timeout_s, **kwargs
            )
        except (serial.SerialException, ValueError, OSError) as e:
            raise SerialRobotError(f"cannot open serial robot {url!r}: {e}") from e
        self._port.reset_input_buffer()
        fields = self._request("H", "H")
        try:
            self._obs, self._act, self._hz = int(fields[0]), int(fields[1]), float(fields[2])
        except (IndexError, ValueError) as e:
            self.close()
            raise SerialRobotError(
                f"MCU hello {' '.join(fields)!r} is not 'H <obs_size> <action_size> <control_hz>'"
            ) from e
        if self._obs < 1 or self._act < 1 or not self._hz > 0:
            self.close()
            raise SerialRobotError(
                f"MCU hello gives sizes {self._obs}/{self._act} and rate {self._hz}; all must be positive"
            )

    @property
    def observation_size(self) -> int:
        return self._obs

    @property
    def action_size(self) -> int:
        return self._act

    @property
    def control_hz(self) -> float:
        return self._hz

    # --- the line protocol -----------------------------------------------------------------
    def _readline(self, deadline: float) -> bytes:
        line = bytearray()
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise SerialRobotError(
                    f"{self.name}: no reply line within {self.timeout_s:g} s (got {bytes(line[:60])!r})"
                )
            self._port.timeout = left
            chunk = self._port.read_until(b"\n", MAX_LINE - len(line))
            if not chunk and len(line) == 0 and time.monotonic() >= deadline:
                continue
            line += chunk
            if len(line) >= MAX_LINE and not line.endswith(b"\n"):
                raise SerialRobotError(f"{self.name}: reply longer than {MAX_LINE} bytes")
        return bytes(line)

    def _request(self, line: str, expect: str) -> list[str]:
        try:
            self._port.write((line + "\n").encode("ascii"))
            self._port.flush()
            deadline = time.monotonic() + self.timeout_s
            while True:
                raw = self._readline(deadline)
                try:
                    text = raw.decode("ascii").strip()
                except UnicodeDecodeError:
                    raise SerialRobotError(f"{self.name}: non-ASCII reply {raw[:60]!r}") from None
                if not text or text.startswith("#"):
                    continue  # blank lines and MCU debug comments
                break
        except serial.SerialTimeoutException as e:
            raise SerialRobotError(f"{self.name}: write timed out: {e}") from e
        except (serial.SerialException, OSError) as e:
            raise SerialRobotError(f"{self.name}: serial port failed: {e}") from e
        kind, *fields = text.split()
        if kind == "E":
            raise SerialRobotError(f"{self.name}: MCU error for {line.split()[0]!r}: {' '.join(fields)}")
        if kind != expect:
            raise SerialRobotError(
                f"{self.name}: expected a '{expect} ...' reply to {line.split()[0]!r}, got {text[:80]!r}"
            )
        return fields

    def _observation(self, fields: list[str]) -> tuple[np.ndarray, float, bool]:
        if len(fields) != 2 + self._obs:
            raise SerialRobotError(
                f"{self.name}: observation line has {len(fields)} fields, "
                f"expected 2 + {self._obs} ('O <reward> <done> <o1>...')"
            )
        try:
            reward = float(fields[0])
            done = fields[1] not in ("0", "0.0")
            obs = np.array([float(v) for v in fields[2:]], np.float32)
        except ValueError as e:
            raise SerialRobotError(f"{self.name}: unreadable observation line: {e}") from e
        return obs, reward, done

    def reset(self, seed: int | None = None) -> np.ndarray:
        obs, _, _ = self._observation(self._request(f"R {0 if seed is None else int(seed)}", "O"))
        return obs

    def step(self, action: np.ndarray, latency_s: float = 0.0) -> tuple[np.ndarray, float, bool]:
        a = np.asarray(action, np.float64).ravel()
        if a.size != self._act:
            raise SerialRobotError(f"{self.name}: action has {a.size} values, the MCU takes {self._act}")
        latency_us = max(0, round(float(latency_s) * 1e6))
        line = "A " + str(latency_us) + " " + " ".join(_fmt(x) for x in a)
        return self._observation(self._request(line, "O"))

    def close(self) -> None:
        port = getattr(self, "_port", None)
        if port is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                port.close()
