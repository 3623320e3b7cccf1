"""Start robot agents as local processes (the demo's robots, and the e2e tests').

Each agent is a real `python -m device_agents serve` process on a loopback TLS port with its own
state directory, driving a sim reality profile, secured as a real robot is: a fleet CA, one
certificate per agent, and an operator (`OPERATOR`, every role) whose certificate the host uses;
all made on first use in a keys folder (`local_credentials`). The port is chosen by the agent
(port 0) and read from its "listening on tls://..." line, so many can run side by side; `port`
asks for a given one instead (an agent restarted where the fleet file says it is).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from robonas.errors import RobonasError

if TYPE_CHECKING:
    from robonas.credentials import HostCredentials
    from robonas.fleet.client import AgentClient

REPO = Path(__file__).resolve().parents[2]  # the checkout: robonas/fleet/local_agents.py -> ../..
OPERATOR = "local-operator"  # the operator local agents trust with every role
OPERATORS_FILE = "operators.json"


def local_credentials(keys: Path) -> HostCredentials:
    """The keys folder of a local fleet (made on first use): the fleet CA, the operator's
    certificate and key, and the agents' operators file trusting that operator with every role."""
    from device_agents.operators import ROLES
    from robonas.credentials import CA_NAME, add_operator, find_host_credentials, make_ca, make_operator

    if not (keys / f"{CA_NAME}.crt").exists():
        make_ca(keys)
    if not (keys / f"{OPERATOR}.crt").exists():
        cert, _ = make_operator(keys, OPERATOR, keys)
        add_operator(keys / OPERATORS_FILE, OPERATOR, cert, [r for r in ROLES if r != "status"], replace=True)
    return find_host_credentials(keys, OPERATOR)


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
    keys: Path | None = None  # the local fleet's keys folder (default: beside the state folder)
    extra_args: list[str] = field(default_factory=list)  # more `serve` options
    port: int = 0  # the loopback port to listen on; 0: one the agent picks

    @property
    def keys_dir(self) -> Path:
        return self.keys if self.keys is not None else self.state_dir.parent / "keys"

    @property
    def credentials(self) -> HostCredentials:
        return local_credentials(self.keys_dir)

    def client(self, timeout_s: float = 10.0) -> AgentClient:
        """An authenticated client for this agent (the local operator's certificate)."""
        from robonas.fleet.client import AgentClient

        return AgentClient(
            self.url, timeout_s, name=self.name, credentials=self.credentials, server_name=self.name
        )

    def start(self, timeout_s: float = 60.0) -> LocalAgent:
        from robonas.credentials import make_agent

        self.state_dir.mkdir(parents=True, exist_ok=True)
        creds = self.credentials
        agent_keys = self.keys_dir / "agents"
        if not (agent_keys / f"{self.name}.crt").exists():
            make_agent(agent_keys, self.name, self.keys_dir)
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
            f"tls://127.0.0.1:{self.port}",
            "--tls-cert",
            str(agent_keys / f"{self.name}.crt"),
            "--tls-key",
            str(agent_keys / f"{self.name}.key"),
            "--tls-ca",
            str(creds.ca),
            "--operators",
            str(self.keys_dir / OPERATORS_FILE),
            "--id",
            self.name,
            "--device",
            self.device,
            *(["--fast"] if self.fast else []),
            *self.extra_args,
        ]
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
        return self.url

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.stdout and self.proc.poll() is not None:
            self.proc.stdout.close()  # an agent restarted many times must not leak a pipe each time


def write_fleet(path: Path, agents: list[LocalAgent]) -> Path:
    """A fleet inventory (launch/fleet.toml format) naming the running agents, with the local
    operator's credentials."""
    lines = ["# written by robonas for local agents", ""]
    if agents:
        keys = agents[0].keys_dir.resolve()
        lines += ["[credentials]", f'keys = "{keys}"', f'operator = "{OPERATOR}"', ""]
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
