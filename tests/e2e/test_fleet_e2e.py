"""End to end: the host's fleet commands against real agents in their own processes
(`python -m device_agents serve`), over TCP on loopback and over a pty pair paced at 115200 baud.

Artifacts are untrained cartpole policies (obs 5, act 1, `sim/CartPole-v0`), converted with
robonas.export.tflite_convert, written and signed with robonas.export.artifact, and indexed in a fresh store
the way `robonas export` indexes them. The agents run the sim twin with `--fast` (no sleeping
between control ticks) so that canary episodes take milliseconds; the timings they report are
still real interpreter timings on this CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import numpy as np
import pytest

from tests.device_agents.test_agent import CREDENTIALS, credentials_toml, operators_file

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
BAUD = 115200
# Tolerance of the timing comparison: the agent's in-loop step p50 (the sim steps in between,
# which evicts caches) against a bench of the same model in a tight loop. Both are microsecond
# figures on a shared 2-core machine, so the check is a factor, with an absolute floor.
TIMING_FACTOR = 3.0
TIMING_FLOOR_MS = 0.03


# ----------------------------------------------------------------------------- fixtures
def _artifact(tmp: Path, store, trial_id: int, seed: int, key: Path) -> Path:
    import torch

    from robonas.export.artifact import build_manifest, write_artifact
    from robonas.export.tflite_convert import to_tflite_int8
    from robonas.space import Layer, PolicyArch

    torch.manual_seed(seed)
    arch = PolicyArch(obs_dim=5, act_dim=1, layers=(Layer(128, "tanh"), Layer(128, "tanh")))
    module = arch.build_actor().eval()
    calib = np.random.default_rng(seed).standard_normal((256, 5)).astype(np.float32)
    model = to_tflite_int8(module, calib)
    spaces = {
        "env_id": "sim/CartPole-v0",
        "observation": {
            "shape": [5],
            "low": [-4.8, -20.0, -1.0, -1.0, -40.0],
            "high": [4.8, 20.0, 1.0, 1.0, 40.0],
        },
        "action": {"discrete": False, "shape": [1], "low": [-1.0], "high": [1.0], "transform": "clip"},
    }
    manifest = build_manifest(
        model=model,
        study="fleet-e2e",
        trial=trial_id,
        arch=arch,
        spaces=spaces,
        frame_mean=np.zeros(5),
        control_hz=50.0,
        parity={},
        precision="int8",
    )
    d = write_artifact(tmp / f"art-{seed}", model, manifest, key)
    store.add_artifact(trial_id, "tflite-int8", str(d), hashlib.sha256(model).hexdigest(), meta=manifest)
    return d


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from device_agents.signing import generate_keypair
    from robonas.space import Layer, PolicyArch
    from robonas.store import Store

    tmp = tmp_path_factory.mktemp("fleet")
    private, public = generate_keypair(tmp / "keys")
    url = f"sqlite:///{tmp / 'store.db'}"
    store = Store(url)
    study = store.create_study("fleet-e2e", {})
    t1 = store.add_trial(study.id, 0, PolicyArch(4, 1, (Layer(8, "tanh"),)))
    t2 = store.add_trial(study.id, 1, PolicyArch(4, 1, (Layer(16, "tanh"),)))
    arts = (_artifact(tmp, store, t1.id, 1, private), _artifact(tmp, store, t2.id, 2, private))
    yield {
        "tmp": tmp,
        "public": public,
        "private": private,
        "store_url": url,
        "store": store,
        "arts": arts,
        "trials": (t1.id, t2.id),
    }
    store.close()


class AgentProc:
    """`python -m device_agents serve ...` in its own process."""

    def __init__(self, state: Path, public: Path, name: str, where: list[str]):
        cmd = [
            PY,
            "-m",
            "device_agents",
            "serve",
            "--state",
            str(state),
            "--trust",
            str(public),
            "--robot",
            "sim:cartpole-lab-a",
            "--fast",
            "--id",
            name,
            "--device",
            "x86-host",
            "--operators",
            str(operators_file(state.parent / f"{name}-trust")),
            *where,
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        line = self.proc.stdout.readline().strip()  # "listening on URL" / "serving on URL"
        if not line:
            raise RuntimeError(f"agent did not start: {self.proc.stderr.read()[-2000:]}")
        self.url = line.split(" on ", 1)[1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class PtyPair:
    """Two ptys joined by relay threads that pace bytes at BAUD (8N1: 10 bits a byte), as a
    USB serial cable would; a pty alone ignores the baud rate and moves bytes instantly."""

    def __init__(self) -> None:
        self.fds = [os.openpty(), os.openpty()]  # (master, slave) each
        for _m, s in self.fds:
            tty.setraw(s)  # no echo, no line editing, before either end opens its side
        self.paths = [os.ttyname(s) for _m, s in self.fds]
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._pump, args=(self.fds[a][0], self.fds[b][0]), daemon=True)
            for a, b in ((0, 1), (1, 0))
        ]
        for t in self.threads:
            t.start()

    def _pump(self, src: int, dst: int) -> None:
        while not self.stop.is_set():
            r, _, _ = select.select([src], [], [], 0.1)
            if not r:
                continue
            try:
                data = os.read(src, 1024)
            except OSError:
                time.sleep(0.05)  # the slave end is closed for now (the agent reopens it)
                continue
            time.sleep(len(data) * 10 / BAUD)
            os.write(dst, data)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(2)
        for m, s in self.fds:
            os.close(m)
            os.close(s)


class CuttingProxy:
    """TCP proxy to the agent that cuts its first connection after `cut_after` host bytes."""

    def __init__(self, target: str, cut_after: int, cuts: int = 1):
        host, port = target.split("://", 1)[1].rsplit(":", 1)
        self.target = (host, int(port))
        self.cut_after, self.cuts_left = cut_after, cuts
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            cut = self.cut_after if self.cuts_left > 0 else None
            self.cuts_left -= 1
            threading.Thread(target=self._pipe, args=(client, upstream, cut), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket, cut: int | None) -> None:
        sent = 0
        try:
            while True:
                data = a.recv(4096)
                if not data:
                    break
                if cut is not None and sent + len(data) >= cut:
                    b.sendall(data[: cut - sent])  # half a frame reaches the agent
                    break
                b.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.sock.close()


def _cli():
    import typer

    from robonas.cli.fleet import deploy_command, fleet_app

    app = typer.Typer()
    app.command("deploy")(deploy_command)
    app.add_typer(fleet_app, name="fleet")
    return app


def _invoke(args: list[str]):
    from typer.testing import CliRunner

    return CliRunner().invoke(_cli(), args)


def _fleet_file(tmp: Path, name: str, agents: dict[str, str]) -> Path:
    f = tmp / f"{name}.toml"
    f.write_text(
        credentials_toml()
        + "".join(
            f'[[agent]]\nname = "{n}"\nlink = "{u}"\ndevice = "x86-host"\n'
            f'robot = "sim:cartpole-lab-a"\ntimeout_s = 5.0\n\n'
            for n, u in agents.items()
        )
    )
    return f


def _sha(art: Path) -> str:
    return json.loads((art / "manifest.json").read_text())["sha256"]


# ----------------------------------------------------------------------------- tests
def test_tcp_deploy_canary_reports_bench_rollback_run_status(world):
    tmp, store = world["tmp"], world["store"]
    art1, art2 = world["arts"]
    agents = {
        n: AgentProc(tmp / f"state-{n}", world["public"], n, ["--listen", "tcp://127.0.0.1:0"])
        for n in ("twin-a", "twin-b")
    }
    try:
        fleet = _fleet_file(tmp, "tcp", {n: a.url for n, a in agents.items()})
        base = ["--fleet", str(fleet), "--store", world["store_url"]]

        r = _invoke(["deploy", str(art1), *base, "--canary", "1", "--episodes", "2", "--json"])
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert out["ok"] and out["canary_names"] == ["twin-a"]
        for robot in out["robots"]:
            d = robot["deploy"]
            assert robot["status"] == "ok" and d["active"] == d["slot"]
            assert d["canary"]["episodes"] == 2 and len(d["canary"]["returns"]) == 2
        tcp_deploy_s = out["robots"][0]["deploy"]["total_s"]

        # every deploy and canary report is in the store, tied to the artifact and trial
        art1_id = out["artifact_id"]
        assert store.get_artifact(art1_id).trial_id == world["trials"][0]
        deps = store.deployments(artifact_id=art1_id)
        assert sorted((d.device, d.status) for d in deps) == [("twin-a", "ok"), ("twin-b", "ok")]
        canaries = store.device_reports(kind="canary", artifact_id=art1_id)
        assert len(canaries) == 2
        payload = canaries[0].payload
        t = payload["timings_ms"]
        assert 0 < t["p50"] <= t["p90"] <= t["p99"] and payload["steps"] > 0
        assert payload["sha256"] == _sha(art1) and payload["host"]["passed"] is True
        assert {d.name for d in store.devices()} == {"twin-a", "twin-b"}

        # the agent's step timings match `robonas-agent bench` on the same model
        from robonas.fleet.client import AgentClient

        with AgentClient(agents["twin-a"].url, 10.0, name="twin-a", credentials=CREDENTIALS) as c:
            agent_bench = c.bench("active", runs=2000)
        cli = subprocess.run(
            [PY, "-m", "device_agents", "bench", str(art1 / "policy.tflite"), "--runs", "2000", "--json"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        cli_p50_ms = json.loads(cli.stdout)["step_us"]["p50"] / 1000
        agent_bench_p50_ms = agent_bench["bench"]["step_us"]["p50"] / 1000
        loop_p50_ms = t["p50"]
        for name, v in (("agent BENCH", agent_bench_p50_ms), ("control loop", loop_p50_ms)):
            assert (
                abs(v - cli_p50_ms) < TIMING_FLOOR_MS or 1 / TIMING_FACTOR < v / cli_p50_ms < TIMING_FACTOR
            ), (name, v, cli_p50_ms)

        # second artifact, then `fleet rollback` returns twin-a to the first one
        r = _invoke(["deploy", str(art2), *base, "--episodes", "1", "--json"])
        assert r.exit_code == 0, r.output
        slot2 = json.loads(r.stdout)["robots"][0]["deploy"]["active"]
        r = _invoke(
            [
                "fleet",
                "rollback",
                "--fleet",
                str(fleet),
                "--agent",
                "twin-a",
                "--store",
                world["store_url"],
                "--json",
            ]
        )
        assert r.exit_code == 0, r.output
        rb = json.loads(r.stdout)
        assert rb["before"]["active"] == slot2 and rb["after"]["active"] != slot2
        assert rb["after"]["sha256"] == _sha(art1)
        assert store.deployments(device="twin-a")[-1].status == "rollback"

        # fresh run reports, stored against the artifact each robot now runs
        r = _invoke(
            [
                "fleet",
                "run",
                "--fleet",
                str(fleet),
                "--episodes",
                "2",
                "--seed",
                "7",
                "--store",
                world["store_url"],
                "--json",
            ]
        )
        assert r.exit_code == 0, r.output
        runs = {row["name"]: row for row in json.loads(r.stdout)}
        assert runs["twin-a"]["report"]["sha256"] == _sha(art1)
        assert runs["twin-b"]["report"]["sha256"] == _sha(art2)
        stored = {x.device: x for x in store.device_reports(kind="run")}
        assert stored["twin-a"].artifact_id == art1_id
        assert stored["twin-b"].payload["host"]["seed"] == 7
        assert len(stored["twin-b"].payload["returns"]) == 2

        r = _invoke(["fleet", "status", "--fleet", str(fleet), "--store", world["store_url"], "--json"])
        assert r.exit_code == 0, r.output
        status = {row["name"]: row for row in json.loads(r.stdout)}
        assert status["twin-a"]["sha256"] == _sha(art1) and status["twin-a"]["reachable"]
        assert status["twin-b"]["last_report"]["kind"] == "run"
        # a human-readable table too, and bad input is one line and exit 2
        assert (
            "twin-a"
            in _invoke(["fleet", "status", "--fleet", str(fleet), "--store", world["store_url"]]).stdout
        )
        bad = _invoke(["deploy", str(art1), *base, "--agents", "nope"])
        assert bad.exit_code == 2 and "unknown agent 'nope'" in bad.output
        print(
            f"\nTCP deploy of {(art1 / 'policy.tflite').stat().st_size} B + 2 canary episodes:"
            f" {tcp_deploy_s:.3f} s; step p50 loop {loop_p50_ms:.4f} ms, agent bench "
            f"{agent_bench_p50_ms:.4f} ms, CLI bench {cli_p50_ms:.4f} ms"
        )
        print("stored canary report:", json.dumps(payload, sort_keys=True)[:1500])
    finally:
        for a in agents.values():
            a.stop()


def test_link_cut_mid_deploy_keeps_previous_policy_and_retry_succeeds(world):
    from robonas.fleet.client import AgentClient
    from robonas.fleet.deploy import rollout
    from robonas.fleet.inventory import load_inventory

    tmp, store = world["tmp"], world["store"]
    art1, art2 = world["arts"]
    agent = AgentProc(tmp / "state-cut", world["public"], "cut", ["--listen", "tcp://127.0.0.1:0"])
    proxies = []
    try:
        direct = _fleet_file(tmp, "direct", {"cut": agent.url})
        r = _invoke(
            ["deploy", str(art1), "--fleet", str(direct), "--store", world["store_url"], "--episodes", "1"]
        )  # the rich progress and table path
        assert r.exit_code == 0, r.output
        assert "cut" in r.stdout and "canary" in r.stdout and "ok" in r.stdout
        size = (art2 / "policy.tflite").stat().st_size
        assert size > 20_000  # several chunks, so the cut lands inside the transfer

        proxies.append(CuttingProxy(agent.url, cut_after=20_000, cuts=1))
        inv = load_inventory(_fleet_file(tmp, "cut", {"cut": proxies[-1].url}))
        res = rollout(art2, inv, episodes=1, store=store, retries=0)
        robot = res.get("cut")
        assert robot.status == "link-failure" and robot.attempts == 1
        assert "deploy chunk" in robot.detail and "cut" in robot.detail
        with AgentClient(agent.url, 5.0, name="cut", credentials=CREDENTIALS) as c:
            assert c.status()["active_sha256"] == _sha(art1)  # still the previous policy
        assert store.deployments(device="cut")[-1].status == "link-failure"

        proxies.append(CuttingProxy(agent.url, cut_after=20_000, cuts=1))
        inv = load_inventory(_fleet_file(tmp, "cut2", {"cut": proxies[-1].url}))
        res = rollout(art2, inv, episodes=1, store=store, retries=1)
        robot = res.get("cut")
        assert robot.status == "ok" and robot.attempts == 2 and len(robot.errors) == 1
        with AgentClient(agent.url, 5.0, name="cut", credentials=CREDENTIALS) as c:
            assert c.status()["active_sha256"] == _sha(art2)
    finally:
        for p in proxies:
            p.close()
        agent.stop()


def test_pty_serial_deploy_at_115200(world):
    from robonas.fleet.deploy import rollout
    from robonas.fleet.inventory import load_inventory

    tmp, store = world["tmp"], world["store"]
    art1 = world["arts"][0]
    pty = PtyPair()
    agent = AgentProc(
        tmp / "state-pty", world["public"], "serial", ["--link", f"{pty.paths[0]}?baudrate={BAUD}"]
    )
    try:
        inv = load_inventory(_fleet_file(tmp, "pty", {"serial": f"{pty.paths[1]}?baudrate={BAUD}"}))
        res = rollout(art1, inv, episodes=2, store=store)
        robot = res.get("serial")
        assert robot.status == "ok", (robot.reason, robot.detail)
        d = robot.deploy
        size = (art1 / "policy.tflite").stat().st_size
        # the transfer cannot beat the wire: size x 10 bits / 115200 baud
        assert d["transfer_s"] >= size * 10 / BAUD * 0.9
        reports = store.device_reports(device="serial", kind="canary")
        assert reports and reports[-1].payload["timings_ms"]["p50"] > 0
        print(
            f"\npty 115200 deploy of {size} B: transfer {d['transfer_s']:.2f} s "
            f"(wire minimum {size * 10 / BAUD:.2f} s), total with canary {d['total_s']:.2f} s"
        )
    finally:
        agent.stop()
        pty.close()
