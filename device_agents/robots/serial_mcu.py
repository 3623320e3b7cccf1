"""The serial robot back end: a microcontroller speaking the line protocol of SERIAL_ROBOT.md.

Leans on pyserial (`serial.serial_for_url`), so the same code drives `/dev/ttyACM0`, a pty,
`socket://host:port` or `rfc2217://`. The protocol is ASCII lines, one request and one reply
each, so it can be typed by hand on a serial console and parsed on an MCU with `strtof`.

Protocol 1.1 adds safety without breaking 1.0 firmware: the hello may name the robot's kind, its
action limits and its safe action (`key=value` tokens after the three numbers); `S` stops (the
firmware applies its safe state) and `K <ms>` arms the firmware's heartbeat watchdog. A 1.0 MCU
answers `E` to `S`; the agent then halts it with `A 0 <safe action>` instead. A lock keeps each
request and its reply together, so a halt from another thread never interleaves with a step.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Any, Callable
from urllib.parse import parse_qsl, urlencode

import numpy as np
import serial

from device_agents.errors import DeviceError
from device_agents.robots.base import Robot

PROTOCOL_VERSION = "1.1"
DEFAULT_BAUDRATE = 115200
DEFAULT_TIMEOUT_S = 2.0
MAX_LINE = 4096  # bytes; a longer reply is a fault, not an observation
_PARAMS: dict[str, Callable[[str], float]] = {"baudrate": int, "timeout": float}
HELLO_KEYS = ("kind", "low", "high", "safe")  # the hello's optional tokens (others are ignored)


class SerialRobotError(DeviceError):
    """The MCU did not answer, answered `E ...`, or answered something unreadable.

    `mcu_error` is the MCU's own message when it answered `E <message>`, else None."""

    def __init__(self, message: str, mcu_error: str | None = None):
        super().__init__(message)
        self.mcu_error = mcu_error


def _fmt(x: float) -> str:
    return format(float(x), ".9g")


def split_kind(url: str) -> tuple[str, str | None]:
    """(the URL without its `kind=` option, that kind or None): `kind` names the robot for the
    agent, so it is taken out before pyserial sees a pyserial URL's options."""
    path, sep, query = url.partition("?")
    if not sep:
        return url, None
    pairs = parse_qsl(query, keep_blank_values=True)
    kinds = [v for k, v in pairs if k == "kind"]
    if not kinds:
        return url, None
    if len(kinds) > 1 or not kinds[0]:
        raise SerialRobotError(f"serial robot {url!r}: give kind= once, with a value (an env id)")
    rest = [(k, v) for k, v in pairs if k != "kind"]
    return (f"{path}?{urlencode(rest, safe='/:')}" if rest else path), kinds[0]


def parse_url(url: str) -> tuple[str, dict[str, Any], float]:
    """(pyserial URL, kwargs, reply timeout) from `PATH?baudrate=N&timeout=S` or a pyserial URL
    (`kind=` is taken out first by `split_kind`)."""
    path, _, query = url.partition("?")
    kwargs: dict[str, Any] = {}
    timeout = DEFAULT_TIMEOUT_S
    if "://" in path and query:
        return url, kwargs, timeout  # pyserial URL handlers parse their own options
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _PARAMS:
            raise SerialRobotError(
                f"serial robot {url!r}: unknown option {key!r}; "
                f"valid: {', '.join(sorted([*_PARAMS, 'kind']))}"
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


def parse_hello(fields: list[str]) -> dict[str, Any]:
    """The hello's fields after `H`: {"obs", "act", "hz", "kind", "low", "high", "safe"}
    (kind/low/high/safe None when absent). ValueError naming what is wrong."""
    if len(fields) < 3:
        raise ValueError("fewer than three numbers")
    obs, act, hz = int(fields[0]), int(fields[1]), float(fields[2])
    if obs < 1 or act < 1 or not (math.isfinite(hz) and hz > 0):
        raise ValueError(f"sizes {obs}/{act} and rate {hz}; all must be positive")
    out: dict[str, Any] = {
        "obs": obs,
        "act": act,
        "hz": hz,
        "kind": None,
        "low": None,
        "high": None,
        "safe": None,
    }
    for token in fields[3:]:
        key, eq, value = token.partition("=")
        if not eq:
            raise ValueError(f"token {token!r} is not key=value")
        if key not in HELLO_KEYS:
            continue  # a later protocol's token: ignored, so newer firmware still talks to us
        if key == "kind":
            if not value:
                raise ValueError("kind= is empty")
            out["kind"] = value
            continue
        try:
            values = np.array([float(v) for v in value.split(",")], np.float32)
        except ValueError:
            raise ValueError(f"{key}= {value!r} is not comma-separated numbers") from None
        if values.size != act:
            raise ValueError(f"{key}= has {values.size} values, the action has {act}")
        if np.any(np.isnan(values)):
            raise ValueError(f"{key}= has NaN")
        out[key] = values
    low, high, safe = out["low"], out["high"], out["safe"]
    if (low is None) != (high is None):
        raise ValueError("low= and high= come together")
    if low is not None and np.any(low > high):
        raise ValueError(f"low= {low.tolist()} exceeds high= {high.tolist()}")
    if safe is not None:
        if not np.all(np.isfinite(safe)):
            raise ValueError("safe= must be finite")
        if low is not None and (np.any(safe < low) or np.any(safe > high)):
            raise ValueError(f"safe= {safe.tolist()} is outside low=/high=")
    return out


class SerialRobot(Robot):
    def __init__(self, url: str, timeout_s: float | None = None):
        self.name = f"serial:{url}"
        url, url_kind = split_kind(url)
        target, kwargs, timeout = parse_url(url)
        self.timeout_s = timeout if timeout_s is None else timeout_s
        self._lock = threading.RLock()  # one request and its reply at a time, whatever the thread
        self._closed = False
        self._has_stop: bool | None = None  # None: not yet asked; False: a protocol 1.0 MCU
        try:
            self._port = serial.serial_for_url(
                target, timeout=self.timeout_s, write_timeout=self.timeout_s, **kwargs
            )
        except (serial.SerialException, ValueError, OSError) as e:
            raise SerialRobotError(f"cannot open serial robot {url!r}: {e}") from e
        self._port.reset_input_buffer()
        try:
            fields = self._request("H", "H")
            try:
                hello = parse_hello(fields)
            except ValueError as e:
                raise SerialRobotError(
                    f"MCU hello {' '.join(fields)!r} is not 'H <obs_size> <action_size> <control_hz> "
                    f"[kind=ENV_ID] [low=A1,...] [high=A1,...] [safe=A1,...]': {e}"
                ) from e
            if url_kind is not None and hello["kind"] is not None and url_kind != hello["kind"]:
                raise SerialRobotError(
                    f"{self.name}: the URL says kind={url_kind}, the MCU says kind={hello['kind']}"
                )
        except SerialRobotError:
            self.close()
            raise
        self._obs, self._act, self._hz = hello["obs"], hello["act"], hello["hz"]
        self._kind: str | None = hello["kind"] or url_kind
        self._low: np.ndarray | None = hello["low"]
        self._high: np.ndarray | None = hello["high"]
        self._safe: np.ndarray | None = hello["safe"]

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
        with self._lock:
            if self._closed:
                raise SerialRobotError(f"{self.name}: the robot is closed")
            return self._exchange(line, expect)

    def _exchange(self, line: str, expect: str) -> list[str]:
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
            message = " ".join(fields)
            raise SerialRobotError(f"{self.name}: MCU error for {line.split()[0]!r}: {message}", message)
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

    # --- safety ------------------------------------------------------------------------------
    @property
    def kind(self) -> str | None:
        return self._kind

    def action_limits(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self._low is None or self._high is None:
            return None
        return self._low.copy(), self._high.copy()

    def safe_action(self) -> np.ndarray:
        return np.zeros(self._act, np.float32) if self._safe is None else self._safe.copy()

    def halt(self) -> None:
        """`S` and its `S` reply: the MCU is in its safe state. A protocol 1.0 MCU answers `E` to
        `S`; it is then sent the safe action (`A 0 ...`, its observation discarded), now and on
        every later halt. Nothing for a closed robot; SerialRobotError when the MCU does not
        confirm."""
        with self._lock:
            if self._closed:
                return
            if self._has_stop is not False:
                try:
                    self._request("S", "S")
                    self._has_stop = True
                    return
                except SerialRobotError as e:
                    if e.mcu_error is None or self._has_stop:
                        raise  # no reply or an unreadable one; or a 1.1 MCU refused its stop
                    self._has_stop = False  # a 1.0 MCU: no stop line
            safe = " ".join(_fmt(x) for x in self.safe_action())
            self._request(f"A 0 {safe}", "O")

    def arm_watchdog(self, timeout_s: float) -> None:
        """`K <timeout_ms>`: the MCU falls to its safe state by itself after `timeout_s` without
        a line (0 disarms). SerialRobotError if the MCU does not echo it (a 1.0 MCU has none)."""
        t = float(timeout_s)
        if not (math.isfinite(t) and t >= 0):
            raise SerialRobotError(f"{self.name}: watchdog timeout {timeout_s!r} is not a duration >= 0")
        ms = max(1, round(t * 1000)) if t > 0 else 0
        try:
            fields = self._request(f"K {ms}", "K")
        except SerialRobotError as e:
            if e.mcu_error is None:
                raise
            raise SerialRobotError(
                f"{self.name}: the MCU has no heartbeat watchdog (it answered 'E {e.mcu_error}' to K; "
                f"firmware speaking SERIAL_ROBOT.md {PROTOCOL_VERSION} has one)",
                e.mcu_error,
            ) from e
        if fields[:1] != [str(ms)]:
            raise SerialRobotError(f"{self.name}: the MCU answered 'K {' '.join(fields)}' to 'K {ms}'")

    def check(self) -> None:
        """The MCU answers its hello again (a device unplugged or a controller gone: an error)."""
        self._request("H", "H")

    def describe(self) -> dict:
        return {**super().describe(), "safe_action": [float(v) for v in self.safe_action()]}

    def close(self) -> None:
        self._closed = True
        port = getattr(self, "_port", None)
        if port is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                port.close()
