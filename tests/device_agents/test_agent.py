"""The agent in its own process (`python -m device_agents serve`), driven over TCP on loopback.

The helpers here (models, manifests, `AgentProcess`, `deploy`) are shared with tests/e2e.
Models: an untrained `PolicyArch` for sim/CartPole-v0 (obs 5, act 1) converted once to int8 and
fp32 and cached on disk (conversion costs ~10 s), plus a model whose output is NaN.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agents.link import open_link
from device_agents.operators import sign_challenge
from device_agents.protocol import Message, MsgType, iter_chunks
from device_agents.signing import generate_keypair, load_private_key, sign_manifest
from tests.device_agents.pty_stream import FdStream

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(
    os.environ.get("ROBONAS_AGENT_TEST_MODELS", Path.home() / ".cache" / "robonas" / "agent-test-models-v1")
)
PROFILE = "cartpole-lab-a"


def test_models() -> dict[str, bytes]:
    """{"good": int8, "good2": fp32 of another net, "nan": fp32 NaN model}, cached on disk."""
    names = ("good", "good2", "nan")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all((CACHE / f"{n}.tflite").exists() for n in names):
            torch = pytest.importorskip("torch")
            from robonas.export.tflite_convert import to_tflite_fp32, to_tflite_int8
            from robonas.space import Layer, PolicyArch

            torch.manual_seed(0)
            arch = PolicyArch(obs_dim=5, act_dim=1, layers=(Layer(16, "tanh"),))
            calib = np.random.default_rng(0).standard_normal((128, 5)).astype(np.float32)
            models = {"good": to_tflite_int8(arch.build_actor().eval(), calib)}
            torch.manual_seed(1)
            arch2 = PolicyArch(obs_dim=5, act_dim=1, layers=(Layer(8, "relu"),))
            models["good2"] = to_tflite_fp32(arch2.build_actor().eval(), 5)

            class NaNPolicy(torch.nn.Module):
                def forward(self, x):
                    return torch.sqrt(-(x * x).sum(-1, keepdim=True) - 1.0)  # sqrt(<0) = NaN

            models["nan"] = to_tflite_fp32(NaNPolicy(), 5)
            for n, data in models.items():
                (CACHE / f"{n}.tflite").write_bytes(data)
    # the test name prefix keeps pytest from collecting this helper as a test
    return {n: (CACHE / f"{n}.tflite").read_bytes() for n in names}


test_models.__test__ = False  # type: ignore[attr-defined]


def _test_credentials():
    """A fleet CA and an operator made once per test process (`robonas keys ca|operator`): the
    host side of the tests authenticates with them, over TLS or with AUTH on plain links."""
    import tempfile

    from robonas.credentials import find_host_credentials, make_ca, make_operator

    folder = Path(tempfile.mkdtemp(prefix="robonas-test-keys-"))
    make_ca(folder)
    make_operator(folder, "tester", folder)
    return find_host_credentials(folder, "tester")


# The operator every test agent trusts with every role; fleet files name CREDENTIALS.keys.
CREDENTIALS = _test_credentials()
OPERATOR: Ed25519PrivateKey = CREDENTIALS.private_key()
ALL_ROLES = ("deploy", "run", "rollback", "bench")
# Signed manifests carry an increasing sequence (the agent refuses older ones): one counter for
# every manifest the tests make, so each is newer than the last.
_SEQUENCE = itertools.count(int(time.time() * 1000))


def operators_file(folder: Path, key: Ed25519PrivateKey = OPERATOR, roles=ALL_ROLES, name="tester") -> Path:
    """The agent's operators JSON trusting `key` with `roles`."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"operators-{name}.json"
    entry = {"name": name, "key": base64.b64encode(raw).decode(), "roles": list(roles)}
    path.write_text(json.dumps({"operators": [entry]}))
    return path


def credentials_toml() -> str:
    """The [credentials] table of a fleet file, so host commands authenticate as OPERATOR."""
    return f'[credentials]\nkeys = "{CREDENTIALS.key.parent}"\noperator = "tester"\n\n'


def authenticate(link, key: Ed25519PrivateKey = OPERATOR) -> Message:
    """HELLO for the challenge, AUTH with it signed by `key`; the AUTH reply."""
    hello = link.request(Message(MsgType.HELLO, {"role": "host", "protocol": 1}))
    assert hello.type == MsgType.HELLO, hello.header
    answer = sign_challenge(key, hello.header["agent"], hello.header["challenge"])
    return link.request(Message(MsgType.AUTH, answer))


def manifest_for(model: bytes, **extra) -> dict:
    m = {
        "format_version": 1,
        "env_id": "sim/CartPole-v0",
        "control_hz": 50.0,
        "history": 1,
        "observation": {
            "frame_shape": [5],
            "history": 1,
            "history_order": "oldest_first",
            "history_pad": [0.0] * 5,
        },
        "action": {"discrete": False, "shape": [1], "output": "value"},
        "sha256": hashlib.sha256(model).hexdigest(),
        "model_size": len(model),
        "sequence": next(_SEQUENCE),
    }
    m.update(extra)
    return m


class AgentProcess:
    """`python -m device_agents serve ...` with the given python; `url` once it is ready."""

    def __init__(
        self,
        state: Path,
        pub: Path,
        robot: str = f"sim:{PROFILE}",
        python: str = sys.executable,
        extra=(),
        env: dict | None = None,
        operators: Path | None = None,
        fast: bool = True,
    ):
        self.state = Path(state)
        operators = operators or operators_file(Path(state).parent / f"{Path(state).name}-trust")
        cmd = [
            python,
            "-m",
            "device_agents",
            "serve",
            "--state",
            str(state),
            "--trust",
            str(pub),
            "--robot",
            robot,
            "--listen",
            "tcp://127.0.0.1:0",
            # a serial robot keeps real time; a sim twin too when the test needs runs that last
            *(["--fast"] if fast and robot.startswith("sim:") else []),
            "--id",
            "test-agent",
            "--operators",
            str(operators),
            *extra,
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, **(env or {})),
        )
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"agent did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.url = line.split()[-1]

    def link(self, timeout_s: float = 60.0, key: Ed25519PrivateKey | None = OPERATOR):
        """A link to the agent, authenticated as `key`'s operator (None: anonymous)."""
        link = open_link(self.url, timeout_s=timeout_s)
        if key is not None:
            r = authenticate(link, key)
            assert r.type == MsgType.ACK, r.header
        return link

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def deploy(
    link,
    model: bytes,
    manifest: dict,
    signature: str | None,
    canary: dict,
    chunk_size: int = 1024,
    size: int | None = None,
) -> Message:
    begin = link.request(
        Message(
            MsgType.DEPLOY_BEGIN,
            {
                "manifest": manifest,
                "signature": signature,
                "size": len(model) if size is None else size,
                "sha256": manifest["sha256"],
                "canary": canary,
            },
        )
    )
    if begin.type != MsgType.ACK:
        return begin
    for offset, chunk in iter_chunks(model, chunk_size):
        r = link.request(Message(MsgType.DEPLOY_CHUNK, {"offset": offset}, chunk))
        assert r.type == MsgType.ACK, r.header
    return link.request(Message(MsgType.DEPLOY_END, {}), timeout_s=120)


def status(link) -> dict:
    r = link.request(Message(MsgType.STATUS, {}))
    assert r.type == MsgType.STATUS, r.header
    return r.header


EASY = {"episodes": 2, "seed": 0, "min_return": -1e9, "max_miss_rate": 1.0, "max_steps": 100}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    priv, pub = generate_keypair(d)
    other_priv, _ = generate_keypair(d, name="stranger")
    return load_private_key(priv), pub, load_private_key(other_priv)


@pytest.fixture(scope="module")
def agent(tmp_path_factory, keys):
    pytest.importorskip("sim")
    state = tmp_path_factory.mktemp("agent-state")
    a = AgentProcess(state, keys[1], extra=("--max-model-bytes", "100000"))
    yield a, state
    a.stop()


def test_hello_ping_status_on_a_fresh_agent(agent):
    a, _ = agent
    with a.link() as link:
        hello = link.request(Message(MsgType.HELLO, {"role": "host", "protocol": 1}))
        assert hello.type == MsgType.HELLO
        assert hello.header["role"] == "agent" and hello.header["agent"] == "test-agent"
        assert hello.header["slots"] == ["a", "b"]
        pong = link.request(Message(MsgType.PING, {"n": 42}))
        assert pong.type == MsgType.PONG and pong.header == {"n": 42}
        st = status(link)
        assert st["active"] is None and st["uptime_s"] > 0
        run = link.request(Message(MsgType.RUN, {"episodes": 1, "seed": 0}))
        assert run.type == MsgType.NACK and run.header["reason"] == "no policy"
        bad = link.request(Message(MsgType.RUN, {"seed": 0}))
        assert bad.type == MsgType.NACK and bad.header["reason"] == "bad header"


def test_deploy_canary_reject_rollback_and_refusals(agent, keys):
    a, _state = agent
    key, _, stranger = keys
    models = test_models()
    good, good2, nan = models["good"], models["good2"], models["nan"]
    mg, mg2, mn = manifest_for(good), manifest_for(good2), manifest_for(nan)
    with a.link() as link:
        t0 = time.monotonic()
        r = deploy(link, good, mg, sign_manifest(mg, key), EASY)
        print(f"deploy over TCP incl. canary: {time.monotonic() - t0:.2f} s")
        assert r.type == MsgType.ACK, r.header
        assert r.header["active"] == "a" and r.header["canary"]["nonfinite_actions"] == 0
        assert len(r.header["canary"]["returns"]) == 2
        st = status(link)
        assert st["active"] == "a" and st["slots"]["a"]["verified"]
        assert st["active_sha256"] == mg["sha256"]

        # NaN model: NACKed by the canary, the old one stays
        r = deploy(link, nan, mn, sign_manifest(mn, key), EASY)
        assert r.type == MsgType.NACK and r.header["reason"] == "canary", r.header
        assert "NaN" in r.header["detail"] and r.header["canary"]["nonfinite_actions"] > 0
        assert status(link)["active_sha256"] == mg["sha256"]

        # return below the threshold: NACKed
        strict = dict(EASY, min_return=1e9)
        r = deploy(link, good2, mg2, sign_manifest(mg2, key), strict)
        assert r.type == MsgType.NACK and "mean return" in r.header["detail"]
        assert status(link)["active_sha256"] == mg["sha256"]

        # a second good model is promoted, then rolled back
        r = deploy(link, good2, mg2, sign_manifest(mg2, key), EASY)
        assert r.type == MsgType.ACK and r.header["active"] == "b"
        r = link.request(Message(MsgType.ROLLBACK, {}))
        assert r.type == MsgType.ACK and r.header["active"] == "a"
        assert status(link)["active_sha256"] == mg["sha256"]

        # refusals: each NACKed, nothing changes
        before = status(link)
        tampered = bytearray(good)
        tampered[len(tampered) // 2] ^= 0x01
        mg3 = manifest_for(good)  # newer than anything deployed: refused for the bytes alone
        cases = {
            "unsigned": deploy(link, good2, mg2, None, EASY),
            "tampered": deploy(link, bytes(tampered), mg3, sign_manifest(mg3, key), EASY),
            "stranger": deploy(link, good2, mg2, sign_manifest(mg2, stranger), EASY),
            "oversize": deploy(link, good2, mg2, sign_manifest(mg2, key), EASY, size=200000),
        }
        reasons = {k: (v.type, v.header["reason"]) for k, v in cases.items()}
        assert reasons == {
            "unsigned": (MsgType.NACK, "unsigned"),
            "tampered": (MsgType.NACK, "sha256 mismatch"),
            "stranger": (MsgType.NACK, "bad signature"),
            "oversize": (MsgType.NACK, "size"),
        }
        after = status(link)
        assert after["slots"] == before["slots"] and after["active"] == before["active"]

        # RUN and BENCH on the active slot
        rep = link.request(
            Message(
                MsgType.RUN, {"episodes": 2, "seed": 5, "max_steps": 50, "thresholds": {"min_return": -1.0}}
            )
        )
        assert rep.type == MsgType.REPORT and rep.header["passed"]
        assert rep.header["slot"] == "a" and rep.header["sha256"] == mg["sha256"]
        assert rep.header["timings_ms"]["p99"] > 0 and len(rep.header["returns"]) == 2
        bench = link.request(Message(MsgType.BENCH, {"runs": 200}))
        assert bench.type == MsgType.REPORT and bench.header["bench"]["runs"] == 200
        print(
            f"agent step p50/p99 {rep.header['timings_ms']['p50'] * 1000:.1f}/"
            f"{rep.header['timings_ms']['p99'] * 1000:.1f} us; bench step p50/p99 "
            f"{bench.header['bench']['step_us']['p50']:.1f}/"
            f"{bench.header['bench']['step_us']['p99']:.1f} us"
        )


def test_protocol_misuse_is_nacked_and_a_cut_deploy_changes_nothing(agent, keys):
    a, _ = agent
    key = keys[0]
    good2 = test_models()["good2"]
    m = manifest_for(good2)
    with a.link() as link:
        before = status(link)
        r = link.request(Message(MsgType.DEPLOY_CHUNK, {"offset": 0}, b"x"))
        assert r.header["reason"] == "no transfer"
        assert (
            link.request(
                Message(
                    MsgType.DEPLOY_BEGIN,
                    {
                        "manifest": m,
                        "signature": sign_manifest(m, key),
                        "size": len(good2),
                        "sha256": m["sha256"],
                    },
                )
            ).type
            == MsgType.ACK
        )
        r = link.request(Message(MsgType.DEPLOY_CHUNK, {"offset": 7}, b"abc"))
        assert r.header["reason"] == "offset" and r.header["next_offset"] == 0
        r = link.request(Message(MsgType.DEPLOY_END, {}))
        assert r.header["reason"] == "size"
        link.request(Message(MsgType.DEPLOY_CHUNK, {"offset": 0}, good2[:500]))
        assert link.request(Message(MsgType.ACK, {})).header["reason"] == "unexpected"
    # the link drops mid-deploy; a new connection finds the agent as it was
    with a.link() as link:
        after = status(link)
        assert after["transfer"] is None
        assert after["slots"] == before["slots"] and after["active"] == before["active"]
    assert a.alive()


def test_cli_errors_are_one_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_agents",
            "serve",
            "--state",
            str(tmp_path),
            "--robot",
            "bogus",
            "--listen",
            "tcp://127.0.0.1:0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 2 and "sim:PROFILE" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_deploy_over_a_pty_link(tmp_path, keys):
    """The agent serves `--link /dev/pts/N` (a serial line); the host holds the master end."""
    import tty

    from device_agents.link import Link

    pytest.importorskip("sim")
    key, pub, _ = keys
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    cmd = [
        sys.executable,
        "-m",
        "device_agents",
        "serve",
        "--state",
        str(tmp_path / "s"),
        "--trust",
        str(pub),
        "--robot",
        f"sim:{PROFILE}",
        "--link",
        path,
        "--fast",
        "--operators",
        str(operators_file(tmp_path / "trust")),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("serving on ")
        link = Link(FdStream(master, timeout=None), timeout_s=30.0, baudrate=115200)
        assert authenticate(link).type == MsgType.ACK
        good = test_models()["good"]
        m = manifest_for(good)
        t0 = time.monotonic()
        r = deploy(link, good, m, sign_manifest(m, key), EASY, chunk_size=16 * 1024)
        print(f"deploy over pty incl. canary: {time.monotonic() - t0:.2f} s")
        assert r.type == MsgType.ACK and r.header["active"] == "a", r.header
        assert status(link)["active_sha256"] == m["sha256"]
    finally:
        proc.terminate()
        proc.wait(10)
        os.close(slave)
        os.close(master)


@pytest.mark.slow
def test_agent_in_the_robot_venv_with_the_serial_robot(tmp_path, keys):
    """numpy<2 + tflite_runtime, no torch/pybullet/gymnasium: deploy + RUN against the fake MCU."""
    from tests.device_agents.robot_venv import RobotVenvError, robot_python

    try:
        python = str(robot_python())
    except RobotVenvError as e:
        pytest.skip(str(e))
    key, pub, _ = keys
    mcu = subprocess.Popen(
        [sys.executable, "tests/e2e/fake_mcu.py", PROFILE],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    agent = None
    try:
        port = mcu.stdout.readline().strip()
        assert port.startswith("/dev/")
        agent = AgentProcess(
            tmp_path / "s",
            pub,
            robot=f"serial:{port}?baudrate=115200",
            python=python,
            env={"ROBONAS_TFLITE_RUNTIME": "tflite_runtime"},
        )
        with agent.link() as link:
            st = status(link)
            assert st["runtime"]["name"] == "tflite_runtime"
            good = test_models()["good"]
            m = manifest_for(good)
            r = deploy(link, good, m, sign_manifest(m, key), EASY)
            assert r.type == MsgType.ACK, r.header
            rep = link.request(
                Message(MsgType.RUN, {"episodes": 2, "seed": 1, "max_steps": 60}), timeout_s=120
            )
            assert rep.type == MsgType.REPORT, rep.header
            assert rep.header["runtime"] == "tflite_runtime"
            assert rep.header["robot"].startswith("serial:") and rep.header["steps"] > 0
            assert rep.header["nonfinite_actions"] == 0
            print(
                f"robot venv: step p50/p99 {rep.header['timings_ms']['p50'] * 1000:.1f}/"
                f"{rep.header['timings_ms']['p99'] * 1000:.1f} us over {rep.header['steps']} steps"
            )
    finally:
        if agent is not None:
            agent.stop()
        mcu.stdin.close()
        mcu.wait(10)


def test_bench_on_a_twin_reports_its_emulated_computer(tmp_path, keys):
    """BENCH on a sim twin answers for the robot's computer, as RUN does: this machine's step
    time x compute_scale + the model's MACs at the twin's MAC rate (cartpole-mcu-slow: 100x and
    5e5 MAC/s); this machine's own figures stay in `host_step_us`."""
    a = AgentProcess(tmp_path / "state", keys[1], robot="sim:cartpole-mcu-slow")
    try:
        model = test_models()["good"]  # 5 -> 16 -> 1: 96 MACs
        with a.link() as link:
            r = link.request(
                Message(
                    MsgType.BENCH,
                    {"runs": 300, "size": len(model), "sha256": hashlib.sha256(model).hexdigest()},
                    model,
                )
            )
        assert r.type == MsgType.REPORT, r.header
        bench = r.header["bench"]
        assert bench["macs"] == 96
        for k in ("p50", "p99", "max"):
            want = bench["host_step_us"][k] * 100.0 + 96 / 5e5 * 1e6
            assert bench["step_us"][k] == pytest.approx(want, rel=1e-9)
    finally:
        a.stop()


def test_agent_drives_a_robot_described_in_the_users_own_profile_file(tmp_path, keys):
    """`--reality-profiles FILE`: a sim twin of a robot no packaged file names."""
    pytest.importorskip("sim")
    robots = tmp_path / "robots.toml"
    robots.write_text(
        "[my-bench-cartpole]\n"
        'description = "described by its user"\nenv_id = "sim/CartPole-v0"\n'
        "mass_scale = 1.2\nfriction_scale = 1.5\ndamping = 0.01\nmotor_gain = 0.9\n"
        "obs_noise_std = 0.0\naction_delay = 1\nactuation_latency_s = 0.002\n"
    )
    good = test_models()["good"]
    manifest = manifest_for(good)
    env = {"ROBONAS_REALITY_PROFILES": ""}
    for extra, expect in (((), MsgType.ERROR), (("--reality-profiles", str(robots)), MsgType.ACK)):
        a = AgentProcess(
            tmp_path / f"s{len(extra)}", keys[1], robot="sim:my-bench-cartpole", extra=extra, env=env
        )
        try:
            with a.link() as link:
                r = deploy(link, good, manifest, sign_manifest(manifest, keys[0]), EASY)
            assert r.type == expect, r.header
            if expect == MsgType.ERROR:  # the canary could not build the robot: it names the profile
                assert "my-bench-cartpole" in r.header["detail"]
            else:
                assert len(r.header["canary"]["returns"]) == 2
        finally:
            a.stop()
