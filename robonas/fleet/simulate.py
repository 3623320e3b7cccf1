"""A simulated fleet: many local robot agents and the fleet file that names them, for trying
rollouts, health gates and groups without robots (`robonas fleet simulate`).

Each robot is a real agent process (`LocalAgent`: `python -m device_agents serve` on a loopback
TLS port, driving a sim reality profile), so a deploy to it transfers, verifies and runs canary
episodes exactly as on a robot. Agents are named sim-000, sim-001, ...; their reality profiles
cycle through `profiles` and their sites through lab-a, lab-b, and the fleet file
(DIR/fleet.toml, with [credentials]) gives each one its site, kind (the profile's env id) and tags.

Three kinds of robot, by index: healthy ones first, then `slow`, then `failing` (the last ones),
so a rollout's first phases meet healthy robots and its later ones the trouble:

- slow (tag "slow"): the agent runs without `--fast`, so its control loop keeps real time and a
  canary takes as long as on a robot (a cart-pole episode of 500 steps at 50 Hz: 10 s) instead
  of milliseconds. That is the only agent behaviour that adds latency (`serve --help` has no
  delay option); the transfer itself is as fast as the others'.
- failing (tag "failing"): the robot is FAILING_PROFILE, a cart-pole behind five control steps
  (100 ms) plus 15 ms of actuation delay. No packaged reality profile makes a policy trained on
  the nominal cart-pole fail (the worst, cartpole-laggy-c, still lets trained policies balance),
  and sim/ is not this module's to edit, so the profile is written to DIR/reality/failing.toml
  and handed to those agents with `serve --reality-profiles` (the agent's way to load a user's
  robot). A canary fails there when it has a return floor: the deployer's (`deploy
  --min-return`, a rollout's health gate) or the agent's own (`canary_min_return`).

Agents start in parallel threads: each is a Python process whose start is mostly imports, so a
few at a time keep both cores busy. Leans on `robonas.fleet.local_agents` for the processes and
their credentials, `sim.reality` for the profiles' env ids, and the standard library.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from robonas.errors import ConfigError, RobonasError
from robonas.fleet.local_agents import OPERATOR, LocalAgent, local_credentials

DEFAULT_PROFILES = ("cartpole-lab-a", "cartpole-worn-b", "cartpole-laggy-c")
SITES = ("lab-a", "lab-b")
FLEET_FILE = "fleet.toml"
FAILING_PROFILE = "sim-cartpole-failing"
# A simulated robot, written to DIR/reality/failing.toml for the failing agents. Measured with the
# demo's int8 cart-pole policies (trained on the nominal cart-pole; 500 on cartpole-lab-a and
# 443-500 on cartpole-laggy-c): a mean return of 28-35 out of 500 here.
FAILING_PROFILE_TOML = f"""\
# Written by `robonas fleet simulate` (robonas/fleet/simulate.py) for its "failing" agents, which
# load it with `serve --reality-profiles`. A SIMULATED robot, not a measured one.
[{FAILING_PROFILE}]
# a policy trained on the nominal cart-pole cannot balance it
description = "cart-pole behind a congested bus: 5 control steps (100 ms) plus 15 ms of actuation delay"
env_id = "sim/CartPole-v0"
mass_scale = 1.0
friction_scale = 1.2
damping = 0.03
motor_gain = 0.95
obs_noise_std = 0.005
action_delay = 5
actuation_latency_s = 0.015
"""
START_TIMEOUT_S = 120.0  # per agent; 50 starting at once on 2 cores share the CPU
# agents starting at once: on 2 cores 50 agents take 4-5 s with 8 (9 s one at a time; 16 or 50 at
# once are no faster, since each start is CPU-bound imports)
DEFAULT_WORKERS = 8


@dataclass(frozen=True)
class SimulatedRobot:
    """What the fleet file says about one simulated agent besides its link."""

    name: str
    profile: str
    site: str
    kind: str
    tags: tuple[str, ...]

    @property
    def robot(self) -> str:
        return f"sim:{self.profile}"


def _profile_kinds(profiles: Sequence[str]) -> dict[str, str]:
    """Each profile's env id; a name sim does not know is a ConfigError listing the valid ones."""
    from sim.errors import SimError
    from sim.reality import get_profile

    kinds = {}
    for p in profiles:
        if p == FAILING_PROFILE:
            raise ConfigError(f"profile {p!r} is the failing robots' own; ask for it with failing=")
        try:
            kinds[p] = get_profile(p).env_id
        except SimError as e:
            raise ConfigError(f"simulated fleet: {e}") from e
    return kinds


def _count(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"simulated fleet: {what} must be a whole number >= {minimum}, got {value!r}")
    return value


def _why_not_started(agent: LocalAgent, error: BaseException) -> str:
    """`name: the agent's last log line (log: path)`, the agent's own words where it left any."""
    log = agent.state_dir / "agent.log"
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        lines = []
    last = next((ln for ln in reversed(lines) if ln), "") or str(error)
    return f"{agent.name}: {last} (log: {log})"


def _toml_str(value: str) -> str:
    # JSON's string escapes (\", \\, \n, \uXXXX) are all valid in a TOML basic string
    return json.dumps(value)


class SimulatedFleet:
    """`n` local agents under `directory` and DIR/fleet.toml naming them (see the module docstring).

    `trust`: the Ed25519 public key (file or folder) the agents trust; default a key pair made
    once in DIR/signing (`signing_key` is then its private key, for `deploy --key`).
    `canary_min_return`: every agent's own canary floor (`serve --canary-min-return`), so a
    failing robot refuses a policy whatever the deployer asks; None leaves it to the deployer.
    """

    def __init__(
        self,
        n: int,
        directory: str | os.PathLike[str],
        slow: int = 0,
        failing: int = 0,
        profiles: Sequence[str] | None = None,
        *,
        device: str = "x86-host",
        trust: str | os.PathLike[str] | None = None,
        canary_min_return: float | None = None,
        workers: int = DEFAULT_WORKERS,
    ):
        n = _count(n, "the number of agents", 1)
        slow, failing = _count(slow, "slow", 0), _count(failing, "failing", 0)
        if slow + failing > n:
            raise ConfigError(f"simulated fleet: slow ({slow}) + failing ({failing}) is more than {n} agents")
        self.workers = _count(workers, "workers", 1)
        profiles = list(DEFAULT_PROFILES if profiles is None else profiles)
        if not profiles:
            raise ConfigError(
                f"simulated fleet: no reality profiles given; e.g. {','.join(DEFAULT_PROFILES)}"
            )
        kinds = _profile_kinds(profiles)
        from robonas.models.devices import load_device

        load_device(device)  # a bad name is a ConfigError now, not n agent start failures
        if canary_min_return is not None and not math.isfinite(canary_min_return):
            raise ConfigError(
                f"simulated fleet: canary_min_return must be a finite number, got {canary_min_return!r}"
            )
        self.directory = Path(directory).resolve()
        self.keys = self.directory / "keys"
        self.fleet_path = self.directory / FLEET_FILE
        self.failing_profiles = self.directory / "reality" / "failing.toml"
        self.signing_key: Path | None = None
        self.trust = (
            Path(trust).resolve() if trust is not None else self.directory / "signing" / "robonas.pub"
        )
        self._own_trust = trust is None
        if not self._own_trust and not self.trust.exists():
            raise ConfigError(
                f"simulated fleet: trusted key {str(self.trust)!r} does not exist; pass an Ed25519 "
                "public key (robonas keys ...) or leave it out to make one in DIR/signing"
            )
        failing_kind = tomllib.loads(FAILING_PROFILE_TOML)[FAILING_PROFILE]["env_id"]
        self.robots: list[SimulatedRobot] = []
        self.agents: list[LocalAgent] = []
        for i in range(n):
            name = f"sim-{i:03d}"
            is_failing, is_slow = i >= n - failing, n - failing - slow <= i < n - failing
            profile = FAILING_PROFILE if is_failing else profiles[i % len(profiles)]
            tags = ("failing",) if is_failing else ("slow",) if is_slow else ()
            kind = failing_kind if is_failing else kinds[profile]
            self.robots.append(SimulatedRobot(name, profile, SITES[i % len(SITES)], kind, tags))
            extra = ["--reality-profiles", str(self.failing_profiles)] if is_failing else []
            if canary_min_return is not None:
                extra += ["--canary-min-return", repr(float(canary_min_return))]
            self.agents.append(
                LocalAgent(
                    name,
                    f"sim:{profile}",
                    device,
                    self.directory / "agents" / name,
                    self.trust,
                    fast=not is_slow,
                    keys=self.keys,
                    extra_args=extra,
                )
            )

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout_s: float = START_TIMEOUT_S) -> SimulatedFleet:
        """Start every agent (`workers` at a time) and write the fleet file. If any agent does
        not start, all are stopped and one RobonasError names them and their logs."""
        if any(self.running(a.name) for a in self.agents):
            raise RobonasError(f"simulated fleet in {self.directory} is already started")
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._own_trust:
            self._signing_pair()
        # once, here: agents starting in threads would each race to make the fleet CA
        local_credentials(self.keys)
        if any(r.profile == FAILING_PROFILE for r in self.robots):
            self.failing_profiles.parent.mkdir(parents=True, exist_ok=True)
            self.failing_profiles.write_text(FAILING_PROFILE_TOML, encoding="utf-8")
        failed: list[str] = []
        try:
            with ThreadPoolExecutor(max_workers=min(self.workers, len(self.agents))) as pool:
                futures = [(a, pool.submit(a.start, timeout_s)) for a in self.agents]
                for a, f in futures:
                    error = f.exception()
                    if error is not None:
                        failed.append(_why_not_started(a, error))
            if failed:
                raise RobonasError(f"{len(failed)} simulated agent(s) did not start: {'; '.join(failed)}")
            self.write_fleet()
        except BaseException:  # Ctrl-C included: no agent outlives a start that did not finish
            self.stop()
            raise
        return self

    def _signing_pair(self) -> None:
        from device_agents.signing import generate_keypair

        folder = self.directory / "signing"
        key = folder / "robonas.key"
        if not key.exists():  # kept across runs: agents' state trusts what earlier runs signed
            generate_keypair(folder, "robonas")
        self.signing_key = key

    def stop(self) -> None:
        """Stop every running agent (SIGTERM to all first, so they shut down side by side)."""
        for a in self.agents:
            if a.proc is not None and a.proc.poll() is None:
                a.proc.terminate()
        for a in self.agents:
            a.stop()

    def __enter__(self) -> SimulatedFleet:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- one agent ------------------------------------------------------------------------------
    def agent(self, name: str) -> LocalAgent:
        for a in self.agents:
            if a.name == name:
                return a
        raise ConfigError(f"simulated fleet: no agent {name!r}; agents are {[a.name for a in self.agents]}")

    def running(self, name: str) -> bool:
        proc = self.agent(name).proc
        return proc is not None and proc.poll() is None

    def stop_agent(self, name: str) -> None:
        """Stop one agent (the robot goes down); the fleet file still lists it."""
        self.agent(name).stop()

    def start_agent(self, name: str, timeout_s: float = START_TIMEOUT_S) -> LocalAgent:
        """Start a stopped agent again on its own state folder (its slots and history stay). It
        asks for its old port, so the fleet file stays right; if that port has been taken, it
        takes a new one and the fleet file is rewritten."""
        a = self.agent(name)
        if self.running(name):
            raise RobonasError(f"simulated agent {name} is running; stop_agent({name!r}) first")
        old = a.url
        a.port = (urlsplit(old).port or 0) if old else 0
        try:
            a.start(timeout_s)
        except RobonasError:
            if a.port == 0:
                raise
            a.port = 0
            a.start(timeout_s)
        if a.url != old:
            self.write_fleet()
        return a

    # --- the fleet file -------------------------------------------------------------------------
    def write_fleet(self) -> Path:
        """Write DIR/fleet.toml (atomically: a reader sees the old file or the new one)."""
        from device_agents.atomic import atomic_write

        lines = [
            f"# written by `robonas fleet simulate`: {len(self.agents)} local agents under {self.directory}",
            "",
            "[credentials]",
            # relative to this file, so the folder can move with its keys
            f"keys = {_toml_str(os.path.relpath(self.keys, self.fleet_path.parent))}",
            f"operator = {_toml_str(OPERATOR)}",
            "",
        ]
        for a, r in zip(self.agents, self.robots, strict=True):
            if not a.url:
                raise RobonasError(f"simulated agent {a.name} has never started; no link to write")
            lines += [
                "[[agent]]",
                f"name = {_toml_str(a.name)}",
                f"link = {_toml_str(a.url)}",
                f"device = {_toml_str(a.device)}",
                f"robot = {_toml_str(a.robot)}",
                f"site = {_toml_str(r.site)}",
                f"kind = {_toml_str(r.kind)}",
                f"tags = [{', '.join(_toml_str(t) for t in r.tags)}]",
                "",
            ]
        atomic_write(self.fleet_path, "\n".join(lines).encode("utf-8"))
        return self.fleet_path

    def describe(self) -> list[str]:
        """One line per agent: name, link, robot, site, kind, tags, pid."""
        out = []
        for a, r in zip(self.agents, self.robots, strict=True):
            pid = a.proc.pid if a.proc is not None and a.proc.poll() is None else "-"
            tags = ",".join(r.tags) or "-"
            out.append(
                f"{a.name}  {a.url or '-'}  {r.robot}  site={r.site}  kind={r.kind}  tags={tags}  pid={pid}"
            )
        return out


__all__ = [
    "DEFAULT_PROFILES",
    "FAILING_PROFILE",
    "SITES",
    "SimulatedFleet",
    "SimulatedRobot",
]
