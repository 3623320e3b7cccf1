"""A fake microcontroller for tests: speaks device_agents/robots/SERIAL_ROBOT.md on a pty, with a
reality profile (`sim.reality.make_reality`) playing the motors and sensors.

Use in-process (`FakeMCU(profile).start()` -> `.port` is the pty path for `serial:PATH`) or as
a process: `python tests/e2e/fake_mcu.py PROFILE` prints the pty path on its first line and
serves until stdin closes or it is killed. It applies the agent's `latency_us` as actuation
latency on top of the profile's own, like the sim twin does.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import tty

import numpy as np


def _fmt(values) -> str:
    return " ".join(format(float(v), ".9g") for v in values)


class FakeMCU:
    def __init__(self, profile: str = "cartpole-lab-a"):
        from sim.reality import get_profile, make_reality

        self.profile = get_profile(profile)
        self.env = make_reality(profile)
        self.dt = float(self.env.unwrapped.dt)
        self.hz = float(self.env.unwrapped.control_hz)
        self.obs_size = int(np.prod(self.env.observation_space.shape))
        self.act_size = int(np.prod(self.env.action_space.shape))
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no line editing: bytes pass as they are
        self.port = os.ttyname(self.slave)
        self.lines = 0
        self.errors = 0
        self._thread: threading.Thread | None = None
        self._obs = np.zeros(self.obs_size)

    def answer(self, line: str) -> str:
        self.lines += 1
        parts = line.split()
        if not parts:
            return "E empty line"
        kind, args = parts[0], parts[1:]
        try:
            if kind == "H":
                return f"H {self.obs_size} {self.act_size} {self.hz:g}"
            if kind == "R":
                obs, _ = self.env.reset(seed=int(args[0]) if args else None)
                return f"O 0 0 {_fmt(obs)}"
            if kind == "A":
                if len(args) != 1 + self.act_size:
                    return f"E A takes latency_us and {self.act_size} values, got {len(args)}"
                latency = self.profile.actuation_latency_s + int(args[0]) / 1e6
                self.env.unwrapped.actuation_latency_s = min(latency, 0.999 * self.dt)
                action = np.array([float(v) for v in args[1:]], np.float32)
                obs, reward, term, trunc, _ = self.env.step(action)
                return f"O {float(reward):.9g} {int(term or trunc)} {_fmt(obs)}"
        except (ValueError, IndexError) as e:
            self.errors += 1
            return f"E {e}"
        self.errors += 1
        return f"E unknown command {kind!r}"

    def serve(self) -> None:
        buf = b""
        while True:
            try:
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

    def start(self) -> FakeMCU:
        self._thread = threading.Thread(target=self.serve, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        for fd in (self.slave, self.master):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.env.close()


def main() -> None:
    mcu = FakeMCU(sys.argv[1] if len(sys.argv) > 1 else "cartpole-lab-a")
    print(mcu.port, flush=True)
    mcu.start()
    sys.stdin.read()  # serve until the parent closes our stdin (or kills us)
    mcu.close()


if __name__ == "__main__":
    main()
