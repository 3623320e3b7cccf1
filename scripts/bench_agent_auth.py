"""What authenticating operators costs: deploys and RUN steps on the agent as it is now (TLS with
client certificates; plain loopback TCP with a signed AUTH challenge) against the agent of an
older commit (no authentication), all measured in the same run on this machine.

    .venv/bin/python scripts/bench_agent_auth.py --baseline-ref ac7ab2d [--deploys 10] [--runs 10]

The baseline is checked out with `git worktree` into a temporary folder and started from there;
every agent is a real `python -m device_agents serve` process on loopback driving the
`cartpole-lab-a` sim twin with `--fast`. Printed: per mode the median deploy time (session set
up, 2 x 128 int8 policy sent, 1-episode canary), the median wall time of a short RUN (1 episode
of 50 steps, session already open), the agent's own step p50 inside those runs, and the time to
open an authenticated session; each as a ratio to the baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agents.link import Link

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _model() -> bytes:
    import numpy as np
    import torch

    from robonas.export.tflite_convert import to_tflite_int8
    from robonas.space import Layer, PolicyArch

    torch.manual_seed(0)
    arch = PolicyArch(obs_dim=5, act_dim=1, layers=(Layer(128, "tanh"), Layer(128, "tanh")))
    calib = np.random.default_rng(0).standard_normal((256, 5)).astype(np.float32)
    return to_tflite_int8(arch.build_actor().eval(), calib)


def _start(python_path: Path, state: Path, pub: Path, extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    cmd = [
        sys.executable,
        "-m",
        "device_agents",
        "serve",
        "--state",
        str(state),
        "--trust",
        str(pub),
        "--robot",
        "sim:cartpole-lab-a",
        "--fast",
        "--id",
        "bench",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(python_path)}
    proc = subprocess.Popen(
        cmd, cwd=python_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"agent did not start: {line!r}")
    return proc, line.split()[-1]


def _measure(
    open_session: Callable[[], Link], model: bytes, key: Ed25519PrivateKey, deploys: int, runs: int
) -> dict[str, float]:
    from device_agents.protocol import Message, MsgType, iter_chunks
    from device_agents.signing import sign_manifest

    seq = int(time.time() * 1000)
    deploy_s, session_s, run_s, step_us = [], [], [], []
    canary = {"episodes": 1, "seed": 0, "max_steps": 50, "min_return": -1e9, "max_miss_rate": 1.0}
    for _ in range(deploys):
        seq += 1
        manifest = {
            "env_id": "sim/CartPole-v0",
            "control_hz": 50.0,
            "history": 1,
            "observation": {"frame_shape": [5], "history": 1, "history_pad": [0.0] * 5},
            "action": {"discrete": False, "shape": [1], "output": "value", "low": [-1.0], "high": [1.0]},
            "sha256": hashlib.sha256(model).hexdigest(),
            "model_size": len(model),
            "sequence": seq,
        }
        sig = sign_manifest(manifest, key)
        t0 = time.perf_counter()
        link = open_session()
        session_s.append(time.perf_counter() - t0)
        begin = {"manifest": manifest, "signature": sig, "size": len(model), "sha256": manifest["sha256"]}
        r = link.request(Message(MsgType.DEPLOY_BEGIN, {**begin, "canary": canary}), timeout_s=60)
        assert r.type == MsgType.ACK, r.header
        for offset, chunk in iter_chunks(model, 16 * 1024):
            assert link.request(Message(MsgType.DEPLOY_CHUNK, {"offset": offset}, chunk)).type == MsgType.ACK
        r = link.request(Message(MsgType.DEPLOY_END, {}), timeout_s=60)
        assert r.type == MsgType.ACK, r.header
        deploy_s.append(time.perf_counter() - t0)
        link.close()
    link = open_session()
    for i in range(runs):
        t0 = time.perf_counter()
        r = link.request(Message(MsgType.RUN, {"episodes": 1, "seed": i, "max_steps": 50}), timeout_s=60)
        run_s.append(time.perf_counter() - t0)
        assert r.type == MsgType.REPORT, r.header
        step_us.append(r.header["timings_ms"]["p50"] * 1000)
    link.close()
    return {
        "session_ms": statistics.median(session_s) * 1000,
        "deploy_ms": statistics.median(deploy_s) * 1000,
        "run_ms": statistics.median(run_s) * 1000,
        "step_p50_us": statistics.median(step_us),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-ref", default="ac7ab2d", help="git ref of the agent to compare with")
    ap.add_argument("--deploys", type=int, default=10)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()

    from device_agents.errors import DeviceError
    from device_agents.link import open_link
    from device_agents.operators import sign_challenge
    from device_agents.protocol import Message, MsgType
    from device_agents.signing import generate_keypair, load_private_key
    from robonas.credentials import make_agent
    from robonas.fleet.local_agents import OPERATOR, local_credentials

    model = _model()
    tmp = Path(tempfile.mkdtemp(prefix="robonas-bench-auth-"))
    priv, pub = generate_keypair(tmp / "signing")
    key = load_private_key(priv)
    creds = local_credentials(tmp / "keys")
    make_agent(tmp / "keys" / "agents", "bench", tmp / "keys")
    baseline = tmp / "baseline"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(baseline), args.baseline_ref],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    procs = []
    results: dict[str, dict[str, float]] = {}
    sessions = ""
    try:
        proc, url = _start(baseline, tmp / "s-base", pub, ["--listen", "tcp://127.0.0.1:0"])
        procs.append(proc)
        results[f"baseline {args.baseline_ref} (no auth)"] = _measure(
            lambda: open_link(url, timeout_s=60), model, key, args.deploys, args.runs
        )
        operators = tmp / "keys" / "operators.json"
        proc, url = _start(
            REPO, tmp / "s-plain", pub, ["--listen", "tcp://127.0.0.1:0", "--operators", str(operators)]
        )
        procs.append(proc)

        def plain_session() -> Link:
            link = open_link(url, timeout_s=60)
            hello = link.request(Message(MsgType.HELLO, {"role": "host", "protocol": 1}))
            answer = sign_challenge(creds.private_key(), hello.header["agent"], hello.header["challenge"])
            assert link.request(Message(MsgType.AUTH, answer)).type == MsgType.ACK
            return link

        results["loopback TCP + AUTH challenge"] = _measure(
            plain_session, model, key, args.deploys, args.runs
        )
        agent_keys = tmp / "keys" / "agents"
        tls_args = [
            "--listen",
            "tls://127.0.0.1:0",
            "--operators",
            str(operators),
            "--tls-cert",
            str(agent_keys / "bench.crt"),
            "--tls-key",
            str(agent_keys / "bench.key"),
            "--tls-ca",
            str(creds.ca),
        ]
        proc, url = _start(REPO, tmp / "s-tls", pub, tls_args)
        procs.append(proc)
        ctx = creds.client_context()
        results["TLS 1.3, client certificates"] = _measure(
            lambda: open_link(url, timeout_s=60, tls=ctx, server_name="bench"),
            model,
            key,
            args.deploys,
            args.runs,
        )
        # sessions held at once: the agent's default bound (8), each answering STATUS while all
        # are open; the next connection is closed by the agent
        held = [open_link(url, timeout_s=10, tls=ctx, server_name="bench") for _ in range(8)]
        rtts = []
        for link in held * 5:
            t0 = time.perf_counter()
            assert link.request(Message(MsgType.STATUS, {})).type == MsgType.STATUS
            rtts.append(time.perf_counter() - t0)
        try:
            extra = open_link(url, timeout_s=5, tls=ctx, server_name="bench")
            extra.request(Message(MsgType.STATUS, {}))
            ninth = "answered"
        except DeviceError:
            ninth = "refused"
        for link in held:
            link.close()
        p50 = statistics.median(rtts) * 1000
        sessions = f"8 TLS sessions held at once, STATUS p50 {p50:.2f} ms; a 9th: {ninth}"
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(baseline)],
            cwd=REPO,
            check=False,
            capture_output=True,
        )
    base = next(iter(results.values()))
    print(f"{'mode':<38}{'session ms':>12}{'deploy ms':>12}{'RUN ms':>10}{'step p50 us':>13}")
    for name, r in results.items():
        print(
            f"{name:<38}{r['session_ms']:>12.2f}{r['deploy_ms']:>12.1f}{r['run_ms']:>10.1f}{r['step_p50_us']:>13.1f}"
        )
    for name, r in list(results.items())[1:]:
        print(
            f"{name}: deploy x{r['deploy_ms'] / base['deploy_ms']:.3f}, "
            f"RUN x{r['run_ms'] / base['run_ms']:.3f}, "
            f"step p50 x{r['step_p50_us'] / base['step_p50_us']:.3f} of the baseline"
        )
    print(sessions)
    print(
        f"(operator {OPERATOR}; {args.deploys} deploys of {len(model)} bytes and {args.runs} RUNs per mode)"
    )


if __name__ == "__main__":
    main()
