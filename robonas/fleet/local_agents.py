"""Start robot agents as local processes (the demo's robots, and the e2e tests').

Each agent is a real `python -m device_agents serve` process on a loopback TCP port with its own
state directory, driving a sim reality profile. The port is chosen by the agent (port 0) and read
from its "listening on tcp://..." line, so many can run side by side.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from robonas.errors import RobonasError

REPO = Path(__file__).resolve().parents[2]  # the checkout: robonas/fleet/local_agents.py -> ../..


@dataclass
class LocalAgent:
    name: str
    robot: str  # e.g. "sim:cartpole-lab-a"
    device: str  # device profile name, e.g. "x86-host"
    state_dir: Path
    trust: Path
    fast: bool = True
    url: str = ""
    proc: subprocess.Popen[str] | None = field(default=None, repr=False)

    def start(self, timeout_s: float = 60.0) -> LocalAgent:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "device_agents",
            "serve",
            "--state",
            str(self.state_dir),
            "--trust",
            str(self.trust),
            "--robot",
            self.robot,
            "--listen",
            "tcp://127.0.0.1:0",
            "--id",
            self.name,
            "--device",
            self.device,
        ] + (["--fast"] if self.fast else [])
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        # the child writes its log through its own copy of the descriptor; ours can close
        with open(self.state_dir / "agent.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        stdout = self.proc.stdout
        assert stdout is not None  # stdout=PIPE
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = stdout.readline()
            if not line:
                break
            if line.startswith("listening on "):
                self.url = line.split("listening on ", 1)[1].strip()
                return self
        self.stop()
        raise RobonasError(f"agent {self.name} did not start; see {self.state_dir / 'agent.log'}")

    @property
    def link(self) -> str:
        return self.url.replace("tcp://", "socket://", 1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def write_fleet(path: Path, agents: list[LocalAgent]) -> Path:
    """A fleet inventory (launch/fleet.toml format) naming the running agents."""
    lines = ["# written by robonas for local agents", ""]
    for a in agents:
        lines += [
            "[[agent]]",
            f'name = "{a.name}"',
            f'link = "{a.link}"',
            f'device = "{a.device}"',
            f'robot = "{a.robot}"',
            "",
        ]
    path.write_text("\n".join(lines))
    return path
