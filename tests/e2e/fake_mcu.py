"""A fake microcontroller for tests: speaks device_agents/robots/SERIAL_ROBOT.md (version 1.1) on
a pty, with a reality profile (`sim.reality.make_reality`) playing the motors and sensors.

Use in-process (`FakeMCU(profile).start()` -> `.port` is the pty path for `serial:PATH`) or as
a process: `python tests/e2e/fake_mcu.py PROFILE [hz=N] [legacy]` prints the pty path on its
first line, then one line per event (`event <name> <time.monotonic()>`, e.g. `event watchdog
12345.678`), and serves until stdin closes or it is killed. It applies the agent's `latency_us` as
actuation latency on top of the profile's own, like the sim twin does.

What SERIAL_ROBOT.md asks of firmware, it does: stopped on power-up; `R` runs; `S` applies the
safe state, disarms the watchdog and refuses `A` (`E stopped`) until the next `R`; `K <ms>` arms a
heartbeat watchdog (a thread) that every line and every reply restarts and whose expiry applies
the safe state as `S` does; a line it cannot parse while running applies the safe state too. Its
hello names the profile's env id (`kind=`), the env's action space (`low=`/`high=`) and, when
given one, its safe action (`safe=`). `hz=` overrides the rate the hello announces (the physics
keep theirs), so tests can drive it slower; `legacy` speaks protocol 1.0 (a three-number hello,
no `S`/`K`, no states) for backward-compatibility tests.

For tests to look at: `actions` (every action a well-formed `A` line carried, applied or refused,
with `action_times`), `refused` (A lines refused while stopped), `motor` (what the motors hold),
`running`, and `events`: [(time.monotonic(), name)] with names "reset", "stop", "watchdog",
"fault" (the safe state after a parse error while running), "arm", "disarm".
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import sys
import threading
import time
import tty
from collections.abc import Callable, Sequence

import numpy as np


def _fmt(values) -> str:
    return " ".join(format(float(v), ".9g") for v in values)


def _csv(values) -> str:
    return ",".join(format(float(v), ".9g") for v in values)


class FakeMCU:
    def __init__(
        self,
        profile: str = "cartpole-lab-a",
        hz: float | None = None,
        legacy: bool = False,
        safe: Sequence[float] | None = None,
        on_event: Callable[[float, str], None] | None = None,
    ):
        from sim.reality import get_profile, make_reality

        self.profile = get_profile(profile)
        self.env = make_reality(profile)
        self.dt = float(self.env.unwrapped.dt)
        self.hz = float(hz) if hz else float(self.env.unwrapped.control_hz)
        self.obs_size = int(np.prod(self.env.observation_space.shape))
        self.act_size = int(np.prod(self.env.action_space.shape))
        self.kind = str(self.profile.env_id)
        self.low = np.asarray(self.env.action_space.low, np.float64).ravel()
        self.high = np.asarray(self.env.action_space.high, np.float64).ravel()
        self.legacy = legacy
        self._safe_token = safe is not None
        self.safe = np.zeros(self.act_size) if safe is None else np.asarray(safe, np.float64).ravel()
        self.on_event = on_event
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no line editing: bytes pass as they are
        self.port = os.ttyname(self.slave)
        self.lines = 0
        self.errors = 0
        self.refused = 0
        self.actions: list[np.ndarray] = []
        self.action_times: list[float] = []
        self.events: list[tuple[float, str]] = []
        self.motor = self.safe.copy()  # power-up: the safe state
        self.running = False
        self._was_reset = False
        self.watchdog_ms = 0
        self._fed = time.monotonic()
        self._cond = threading.Condition()  # guards the state; wakes the watchdog
        self._closed = False
        self._threads: list[threading.Thread] = []
        # close() wakes the server through this pipe and joins it before closing the pty, so a
        # server blocked in read never reads a later pty that reuses the descriptor number
        self._wake_r, self._wake_w = os.pipe()

    # --- state -----------------------------------------------------------------------------
    def _event(self, name: str) -> None:
        t = time.monotonic()
        self.events.append((t, name))
        if self.on_event is not None:
            self.on_event(t, name)

    def _safe_state(self, reason: str) -> None:
        """What firmware does on S, watchdog expiry or a fault: motors to the safe action,
        stopped, watchdog disarmed."""
        self.motor = self.safe.copy()
        self.running = False
        self.watchdog_ms = 0
        self._event(reason)

    def _feed(self) -> None:
        with self._cond:
            self._fed = time.monotonic()
            self._cond.notify_all()

    def event_times(self, name: str) -> list[float]:
        return [t for t, n in list(self.events) if n == name]

    def hello(self) -> str:
        line = f"H {self.obs_size} {self.act_size} {self.hz:g}"
        if self.legacy:
            return line
        line += f" kind={self.kind} low={_csv(self.low)} high={_csv(self.high)}"
        return line + (f" safe={_csv(self.safe)}" if self._safe_token else "")

    def answer(self, line: str) -> str:
        with self._cond:
            self.lines += 1
            self._fed = time.monotonic()  # every line feeds the watchdog
            reply = self._answer(line)
            if reply.startswith("E") and self.running and not self.legacy and reply != "E stopped":
                self._safe_state("fault")  # a garbled line while running: the host's intent is unknown
            return reply

    def _answer(self, line: str) -> str:
        parts = line.split()
        if not parts:
            self.errors += 1
            return "E empty line"
        kind, args = parts[0], parts[1:]
        try:
            if kind == "H":
                return self.hello()
            if kind == "R":
                obs, _ = self.env.reset(seed=int(args[0]) if args else None)
                self.running = self._was_reset = True
                self._event("reset")
                return f"O 0 0 {_fmt(obs)}"
            if kind == "A":
                if len(args) != 1 + self.act_size:
                    self.errors += 1
                    return f"E A takes latency_us and {self.act_size} values, got {len(args)}"
                latency_us = int(args[0])
                action = np.array([float(v) for v in args[1:]], np.float32)
                self.actions.append(action)
                self.action_times.append(time.monotonic())
                if not self.running and not self.legacy:
                    self.refused += 1
                    return "E stopped"
                self.motor = action.astype(np.float64)
                if not self._was_reset:  # a 1.0 MCU applies an action before any R; no episode to step
                    return f"O 0 0 {_fmt(np.zeros(self.obs_size))}"
                latency = self.profile.actuation_latency_s + latency_us / 1e6
                self.env.unwrapped.actuation_latency_s = min(latency, 0.999 * self.dt)
                obs, reward, term, trunc, _ = self.env.step(action)
                return f"O {float(reward):.9g} {int(term or trunc)} {_fmt(obs)}"
            if kind == "S" and not self.legacy:
                self._safe_state("stop")
                return "S"
            if kind == "K" and not self.legacy:
                if len(args) != 1 or not args[0].isdigit():
                    self.errors += 1
                    return "E K takes one non-negative integer (milliseconds)"
                self.watchdog_ms = int(args[0])
                self._fed = time.monotonic()
                self._cond.notify_all()
                self._event("arm" if self.watchdog_ms else "disarm")
                return f"K {self.watchdog_ms}"
        except (ValueError, IndexError) as e:
            self.errors += 1
            return f"E {e}"
        self.errors += 1
        return f"E unknown command {kind!r}"

    # --- threads ---------------------------------------------------------------------------
    def serve(self) -> None:
        buf = b""
        while True:
            try:
                ready = select.select([self.master, self._wake_r], [], [])[0]
                if self._wake_r in ready:
                    return  # closing
                data = os.read(self.master, 4096)
            except OSError:
                return  # the pty is gone
            if not data:
                return
            buf += data
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                reply = self.answer(raw.decode("ascii", "replace").strip())
                try:
                    os.write(self.master, reply.encode("ascii") + b"\n")
                except OSError:
                    return
                self._feed()  # the timer restarts when a reply is sent: the MCU's own time never counts

    def watch(self) -> None:
        """The heartbeat watchdog: the safe state once `watchdog_ms` pass with no line and no reply."""
        with self._cond:
            while not self._closed:
                if not self.watchdog_ms:
                    self._cond.wait()
                    continue
                left = self._fed + self.watchdog_ms / 1000 - time.monotonic()
                if left <= 0:
                    self._safe_state("watchdog")
                else:
                    self._cond.wait(left)

    def start(self) -> FakeMCU:
        self._threads = [
            threading.Thread(target=self.serve, daemon=True),
            threading.Thread(target=self.watch, daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def close(self) -> None:
        if self._closed:
            return
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        os.write(self._wake_w, b"x")
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(10)
        for fd in (self.slave, self.master, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.env.close()


def main() -> None:
    args = sys.argv[1:]
    profile = args[0] if args and "=" not in args[0] and args[0] != "legacy" else "cartpole-lab-a"
    options = dict(a.split("=", 1) for a in args if "=" in a)
    lines: queue.Queue[str] = queue.Queue()

    def printer() -> None:  # stdout may block (a full pipe): never in the MCU's own threads
        while True:
            print(lines.get(), flush=True)

    mcu = FakeMCU(
        profile,
        hz=float(options["hz"]) if "hz" in options else None,
        legacy="legacy" in args,
        on_event=lambda t, name: lines.put(f"event {name} {t:.6f}"),
    )
    print(mcu.port, flush=True)
    threading.Thread(target=printer, daemon=True).start()
    mcu.start()
    sys.stdin.read()  # serve until the parent closes our stdin (or kills us)
    mcu.close()


if __name__ == "__main__":
    main()
