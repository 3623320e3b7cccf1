"""Issue 14: the agent on real processes and sockets, each finding of the issue as a test.

Operators (plain loopback TCP: AUTH with a signed challenge; TLS: client certificates), ordered
artifacts, sessions that do not block each other, STOP/SIGTERM/link loss reaching the robot's
safe state (the fake MCU over a pty sees the `S` line), rejected policies, artifacts bound to
their robot, and the agent's own canary floor.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agents.errors import DeviceError
from device_agents.link import open_link
from device_agents.operators import sign_challenge
from device_agents.protocol import Message, MsgType, encode
from device_agents.signing import generate_keypair, load_private_key, sign_manifest
from tests.device_agents.test_agent import (
    EASY,
    OPERATOR,
    REPO,
    AgentProcess,
    authenticate,
    deploy,
    manifest_for,
    operators_file,
    status,
    test_models,
)

pytestmark = pytest.mark.e2e
HZ = 10.0  # the fake MCU's control rate in the stop tests: one period is 100 ms
PERIOD_S = 1.0 / HZ


@pytest.fixture(scope="module")
def signing(tmp_path_factory):
    priv, pub = generate_keypair(tmp_path_factory.mktemp("signing"))
    return load_private_key(priv), pub


@pytest.fixture
def twin_agent(tmp_path, signing):
    pytest.importorskip("sim")
    a = AgentProcess(tmp_path / "state", signing[1], extra=("--canary-episodes", "1"))
    yield a
    a.stop()


@pytest.fixture
def real_time_agent(tmp_path, signing):
    """A twin that keeps real time (50 Hz), so a 1000-episode RUN lasts minutes, not seconds."""
    pytest.importorskip("sim")
    a = AgentProcess(tmp_path / "state-rt", signing[1], fast=False)
    yield a
    a.stop()


def _request(link, mtype: MsgType, header: dict | None = None, payload: bytes = b"") -> Message:
    return link.request(Message(mtype, header or {}, payload), timeout_s=60)


def test_anonymous_sessions_read_status_but_command_nothing(twin_agent, signing):
    key, _ = signing
    good = test_models()["good"]
    m = manifest_for(good)
    with twin_agent.link(key=None) as link:
        assert _request(link, MsgType.STATUS).type == MsgType.STATUS
        refused = {
            "deploy": deploy(link, good, m, sign_manifest(m, key), EASY),
            "run": _request(link, MsgType.RUN, {"episodes": 1, "seed": 0}),
            "rollback": _request(link, MsgType.ROLLBACK),
            "bench": _request(
                link, MsgType.BENCH, {"runs": 5, "size": len(good), "sha256": m["sha256"]}, good
            ),
            "stop": _request(link, MsgType.STOP),
        }
        for what, reply in refused.items():
            assert (reply.type, reply.header["reason"]) == (MsgType.NACK, "unauthenticated"), what
        # a signature by a key the agent does not trust, or over another challenge, is refused
        assert authenticate(link, Ed25519PrivateKey.generate()).header["reason"] == "unknown operator"
        hello = _request(link, MsgType.HELLO, {"role": "host", "protocol": 1})
        stale = sign_challenge(OPERATOR, "test-agent", "b3RoZXIgY2hhbGxlbmdl")
        assert _request(link, MsgType.AUTH, stale).header["reason"] == "bad signature"
        # each challenge is answered once: a replay of a good answer is refused
        good_answer = sign_challenge(OPERATOR, hello.header["agent"], hello.header["challenge"])
        assert _request(link, MsgType.AUTH, good_answer).header["reason"] == "bad challenge"
        assert status(link)["active"] is None


def test_a_status_only_operator_is_forbidden_to_act(tmp_path, signing):
    pytest.importorskip("sim")
    viewer = Ed25519PrivateKey.generate()
    trust = operators_file(tmp_path / "trust", key=viewer, roles=(), name="viewer")
    a = AgentProcess(tmp_path / "state", signing[1], operators=trust)
    try:
        with a.link(key=viewer) as link:
            reply = _request(link, MsgType.RUN, {"episodes": 1, "seed": 0})
            assert (reply.type, reply.header["reason"]) == (MsgType.NACK, "forbidden")
            assert status(link)["you"] == {"operator": "viewer", "roles": ["status"]}
            assert _request(link, MsgType.STOP).type == MsgType.ACK  # any operator may stop
    finally:
        a.stop()


def test_older_artifacts_are_refused_unless_an_operator_asks_to_roll_back(twin_agent, signing):
    key, _ = signing
    models = test_models()
    v1 = manifest_for(models["good"])
    v2 = manifest_for(models["good2"])
    with twin_agent.link() as link:
        assert deploy(link, models["good"], v1, sign_manifest(v1, key), EASY).type == MsgType.ACK
        assert deploy(link, models["good2"], v2, sign_manifest(v2, key), EASY).type == MsgType.ACK
        replay = deploy(link, models["good"], v1, sign_manifest(v1, key), EASY)
        assert (replay.type, replay.header["reason"]) == (MsgType.NACK, "downgrade"), replay.header
        assert status(link)["active_sha256"] == v2["sha256"]
        unordered = manifest_for(models["good"])
        del unordered["sequence"]
        r = deploy(link, models["good"], unordered, sign_manifest(unordered, key), EASY)
        assert r.header["reason"] == "unordered"
        # an explicit downgrade by an operator with the rollback role goes through
        begin = _request(
            link,
            MsgType.DEPLOY_BEGIN,
            {
                "manifest": v1,
                "signature": sign_manifest(v1, key),
                "size": len(models["good"]),
                "sha256": v1["sha256"],
                "canary": EASY,
                "allow_downgrade": True,
            },
        )
        assert begin.type == MsgType.ACK, begin.header
        _request(link, MsgType.DEPLOY_CHUNK, {"offset": 0}, models["good"])
        end = _request(link, MsgType.DEPLOY_END)
        assert end.type == MsgType.ACK and status(link)["active_sha256"] == v1["sha256"]


def test_the_transfer_size_must_be_the_signed_one_and_the_robot_must_match(twin_agent, signing):
    key, _ = signing
    good = test_models()["good"]
    with twin_agent.link() as link:
        m = manifest_for(good)
        r = deploy(link, good, m, sign_manifest(m, key), EASY, size=len(good) + 1)
        assert (r.header["reason"], "signed manifest says") == ("size", "signed manifest says")
        assert "signed manifest says" in r.header["detail"]
        swing = manifest_for(good, env_id="sim/CartPoleSwingUp-v0")
        r = deploy(link, good, swing, sign_manifest(swing, key), EASY)
        assert r.header["reason"] == "mismatch" and "CartPoleSwingUp" in r.header["detail"]
        wide = manifest_for(good, observation={"frame_shape": [7], "history": 1})
        r = deploy(link, good, wide, sign_manifest(wide, key), EASY)
        assert r.header["reason"] == "mismatch"
        assert status(link)["active"] is None


def test_the_agents_canary_floor_and_rejected_stays_rejected(twin_agent, signing):
    key, _ = signing
    models = test_models()
    with twin_agent.link() as link:
        m = manifest_for(models["good"])
        r = deploy(link, models["good"], m, sign_manifest(m, key), dict(EASY, episodes=0))
        assert r.type == MsgType.ACK and len(r.header["canary"]["returns"]) >= 1  # not skipped
        bad = manifest_for(models["nan"])
        r = deploy(link, models["nan"], bad, sign_manifest(bad, key), EASY)
        assert r.header["reason"] == "canary"
        rejected_slot = r.header["slot"]
        st = status(link)
        assert st["slots"][rejected_slot]["state"] == "rejected"
        run = _request(link, MsgType.RUN, {"episodes": 1, "seed": 0, "slot": rejected_slot, "max_steps": 5})
        assert (run.type, run.header["reason"]) == (MsgType.NACK, "rejected")
        ask = {"episodes": 1, "seed": 0, "slot": rejected_slot, "max_steps": 5, "force": True}
        forced = _request(link, MsgType.RUN, ask)
        assert forced.type == MsgType.REPORT
        assert forced.header["stopped"] == "non-finite action" and forced.header["halted"]
    # the state file is lost: the fallback never picks the rejected slot
    twin_agent.stop()
    state = Path(twin_agent.state)
    (state / "state.json").write_text("{not json")
    again = AgentProcess(state, signing[1])
    try:
        with again.link() as link:
            st = status(link)
            assert st["active"] != rejected_slot and st["active_sha256"] == m["sha256"]
    finally:
        again.stop()


def _trickle(url: str, stop: threading.Event) -> None:
    host, port = url[len("tcp://") :].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        frame = encode(MsgType.PING, {"slow": True}, seq=1)
        for b in frame:
            if stop.wait(1.0):
                return
            try:
                sock.sendall(bytes([b]))
            except OSError:
                return


def test_status_answers_while_others_idle_trickle_or_run(real_time_agent, signing):
    twin_agent = real_time_agent
    key, _ = signing
    good = test_models()["good"]
    m = manifest_for(good)
    with twin_agent.link() as link:
        assert deploy(link, good, m, sign_manifest(m, key), EASY).type == MsgType.ACK
    stop = threading.Event()
    idle = open_link(twin_agent.url, timeout_s=5)  # connected, says nothing
    trickler = threading.Thread(target=_trickle, args=(twin_agent.url, stop), daemon=True)
    trickler.start()
    runner = twin_agent.link(timeout_s=300)
    long_run = threading.Thread(
        target=lambda: runner.request(Message(MsgType.RUN, {"episodes": 1000, "seed": 0}), timeout_s=300),
        daemon=True,
    )
    try:
        long_run.start()
        time.sleep(1.0)
        worst = 0.0
        for _ in range(5):
            with twin_agent.link(key=None, timeout_s=5) as probe:
                t0 = time.monotonic()
                st = status(probe)
                worst = max(worst, time.monotonic() - t0)
            assert st["running"] and st["lease"]["what"] == "run"
        assert worst < 1.0, f"STATUS took {worst:.3f} s while others held sessions"  # the bound
        # a second controller is told who holds the robot, instead of waiting
        with twin_agent.link() as other:
            busy = _request(other, MsgType.ROLLBACK)
            assert (busy.type, busy.header["reason"]) == (MsgType.NACK, "busy")
            stopped = _request(other, MsgType.STOP)
            assert stopped.header["stopped"] is True
        long_run.join(timeout=10)
        assert not long_run.is_alive()  # STOP ended the 1000-episode run
    finally:
        stop.set()
        idle.close()
        runner.close()


class _SerialAgent:
    """An agent process driving the fake MCU (in this process) over a pty at HZ, real time."""

    def __init__(self, tmp_path: Path, pub: Path):
        pytest.importorskip("sim")
        from tests.e2e.fake_mcu import FakeMCU

        self.mcu = FakeMCU("cartpole-lab-a", hz=HZ).start()
        self.agent = AgentProcess(
            tmp_path / "state",
            pub,
            robot=f"serial:{self.mcu.port}",
            extra=("--canary-max-miss-rate", "1.0"),
        )

    def deploy_and_start_run(self, key) -> tuple[object, threading.Thread, dict]:
        good = test_models()["good"]
        m = manifest_for(good)
        with self.agent.link() as link:
            r = deploy(link, good, m, sign_manifest(m, key), dict(EASY, episodes=1, max_steps=3))
            assert r.type == MsgType.ACK, r.header
        runner = self.agent.link(timeout_s=300)
        out: dict = {}

        def run() -> None:
            try:
                out["reply"] = runner.request(Message(MsgType.RUN, {"episodes": 5, "seed": 0}), timeout_s=300)
            # the test closes the link under this thread: a LinkError, or pyserial's socket
            # handler finding its socket gone (AttributeError on None)
            except (DeviceError, AttributeError) as e:
                out["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while len(self.mcu.actions) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.mcu.actions) >= 5, "the run did not start"
        return runner, t, out

    def wait_for(self, name: str, after: float, timeout_s: float = 5.0) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            times = [t for t in self.mcu.event_times(name) if t >= after]
            if times:
                return times[0]
            time.sleep(0.002)
        raise AssertionError(f"the MCU saw no {name!r} within {timeout_s} s; events {self.mcu.events[-5:]}")

    def close(self) -> None:
        self.agent.stop()
        self.mcu.close()


def test_stop_reaches_the_safe_state_within_one_control_period(tmp_path, signing):
    s = _SerialAgent(tmp_path, signing[1])
    try:
        runner, t, out = s.deploy_and_start_run(signing[0])
        with s.agent.link() as other:
            sent = time.monotonic()
            ack = _request(other, MsgType.STOP)
        assert ack.header["stopped"] is True
        safe_at = s.wait_for("stop", sent)
        print(f"STOP -> safe state at the MCU: {(safe_at - sent) * 1000:.1f} ms (one period: 100 ms)")
        assert safe_at - sent < PERIOD_S  # the property under test: within one control period
        t.join(10)
        report = out["reply"].header
        assert report["stopped"] == "stop" and report["halted"]
        assert report["steps"] < 5 * 200
        runner.close()
    finally:
        s.close()


def test_a_lost_host_link_halts_the_robot(tmp_path, signing):
    s = _SerialAgent(tmp_path, signing[1])
    try:
        runner, _t, _ = s.deploy_and_start_run(signing[0])
        cut = time.monotonic()
        runner.close()
        safe_at = s.wait_for("stop", cut)
        print(f"link lost -> safe state: {(safe_at - cut) * 1000:.1f} ms")
        assert safe_at - cut < 1.0
    finally:
        s.close()


def test_sigterm_reaches_the_safe_state_and_the_agent_exits(tmp_path, signing):
    s = _SerialAgent(tmp_path, signing[1])
    try:
        runner, _t, _ = s.deploy_and_start_run(signing[0])
        sent = time.monotonic()
        s.agent.proc.send_signal(signal.SIGTERM)
        safe_at = s.wait_for("stop", sent)
        print(f"SIGTERM -> safe state: {(safe_at - sent) * 1000:.1f} ms")
        assert safe_at - sent < PERIOD_S  # within one control period
        assert s.agent.proc.wait(10) == 0
        runner.close()
    finally:
        s.close()


def test_plain_tcp_off_loopback_and_fast_serial_robots_are_refused(tmp_path):
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "device_agents", "serve", "--state", str(tmp_path / "s"), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    out = serve("--robot", "sim:cartpole-lab-a", "--listen", "tcp://0.0.0.0:0")
    assert out.returncode == 2 and "tls://" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = serve("--robot", "serial:loop://", "--fast", "--listen", "tcp://127.0.0.1:0")
    assert out.returncode == 2 and "--fast" in out.stderr
    out = serve("--robot", "sim:cartpole-lab-a", "--listen", "tls://127.0.0.1:0")
    assert out.returncode == 2 and "--tls-cert" in out.stderr


def test_sessions_are_bounded(tmp_path, signing):
    pytest.importorskip("sim")
    a = AgentProcess(tmp_path / "state", signing[1], extra=("--max-sessions", "3"))
    links = []
    try:
        links = [a.link(key=None, timeout_s=5) for _ in range(3)]
        for link in links:
            assert status(link)["agent"] == "test-agent"
        host, port = a.url[len("tcp://") :].rsplit(":", 1)
        extra = socket.create_connection((host, int(port)), timeout=5)
        extra.settimeout(5)
        assert extra.recv(1) == b""  # closed at once: three sessions are open
        extra.close()
        links.pop().close()
        time.sleep(0.5)
        with a.link(key=None, timeout_s=5) as again:
            assert status(again)["agent"] == "test-agent"
    finally:
        for link in links:
            link.close()
        a.stop()


def test_key_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        priv, _ = generate_keypair(tmp_path / "fresh")
    finally:
        os.umask(old)
    assert (priv.stat().st_mode & 0o777) == 0o600
    assert ((tmp_path / "fresh").stat().st_mode & 0o777) == 0o700


def test_fleet_stop_ends_a_long_run(real_time_agent, signing, tmp_path):
    twin_agent = real_time_agent
    import json

    from typer.testing import CliRunner

    from robonas.cli.fleet import fleet_app
    from tests.device_agents.test_agent import credentials_toml

    key, _ = signing
    good = test_models()["good"]
    m = manifest_for(good)
    with twin_agent.link() as link:
        assert deploy(link, good, m, sign_manifest(m, key), EASY).type == MsgType.ACK
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        credentials_toml()
        + f'[[agent]]\nname = "bot"\nlink = "{twin_agent.url}"\ndevice = "x86-host"\n'
        + 'robot = "sim:cartpole-lab-a"\n'
    )
    runner = twin_agent.link(timeout_s=300)
    out: dict = {}
    t = threading.Thread(
        target=lambda: out.update(r=runner.request(Message(MsgType.RUN, {"episodes": 1000, "seed": 0}), 300)),
        daemon=True,
    )
    t.start()
    time.sleep(1.0)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    shown = CliRunner().invoke(fleet_app, ["status", "--fleet", str(fleet), "--json", "--store", url])
    assert shown.exit_code == 0, shown.output
    (row,) = json.loads(shown.output)
    assert row["state"] == "run by tester", row  # who holds the robot, and for what
    result = CliRunner().invoke(fleet_app, ["stop", "--fleet", str(fleet), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [{"agent": "bot", "stopped": True, "error": None}]
    t.join(10)
    assert out["r"].header["stopped"] == "stop" and len(out["r"].header["returns"]) < 1000
    runner.close()


def test_tls_sessions_need_a_fleet_certificate_and_a_trusted_key(tmp_path, signing):
    """Over TLS: no certificate, or one from another CA, fails the handshake; a fleet-CA
    certificate whose key the operators file does not list may read status only."""
    pytest.importorskip("sim")
    from robonas.credentials import find_host_credentials, make_ca, make_operator
    from robonas.fleet.client import AgentClient, AgentRefused, LinkFailure
    from robonas.fleet.local_agents import LocalAgent

    agent = LocalAgent("tls-bot", "sim:cartpole-lab-a", "x86-host", tmp_path / "agent", signing[1]).start()
    try:
        assert agent.url.startswith("tls://")
        with agent.client() as c:
            assert c.status()["you"]["operator"] == "local-operator"
        keys = agent.keys_dir
        make_operator(keys, "stranger", keys)  # signed by the fleet CA, not in operators.json
        stranger = find_host_credentials(keys, "stranger")
        with AgentClient(agent.url, 5.0, name="tls-bot", credentials=stranger) as c:
            you = c.status()["you"]
            assert you["roles"] == ["status"] and you["operator"].startswith("anonymous tls")
            with pytest.raises(AgentRefused) as refused:
                c.run(1, max_steps=5)
            assert refused.value.reason == "unauthenticated"
        other = tmp_path / "other-ca"
        make_ca(other)
        make_operator(other, "mallory", other)
        mallory = find_host_credentials(other, "mallory")
        with (
            pytest.raises(LinkFailure),
            AgentClient(agent.url, 5.0, name="tls-bot", credentials=mallory) as c,
        ):
            c.status()
        # a TLS client without a certificate is refused at the handshake
        import ssl

        from device_agents.tls import client_context

        host, port = agent.url[len("tls://") :].rsplit(":", 1)
        anonymous = client_context(None, None, agent.credentials.ca)
        with (
            socket.create_connection((host, int(port)), timeout=5) as raw,
            pytest.raises((ssl.SSLError, ConnectionError)),
        ):
            tls = anonymous.wrap_socket(raw, server_hostname="tls-bot")
            tls.sendall(encode(MsgType.STATUS, {}, seq=1))
            tls.recv(100)  # TLS 1.3: the server's refusal arrives on the first read
        # plain TCP to a TLS port gets no protocol reply either
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(encode(MsgType.STATUS, {}, seq=1))
            raw.settimeout(5)
            try:
                data = raw.recv(100)
            except ConnectionResetError:
                data = b""
            assert not data.startswith(b"RN")
    finally:
        agent.stop()
