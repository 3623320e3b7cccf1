"""Rollouts to simulated fleets: sequential against parallel, host memory and connections, and
the time from a failed health gate to the phase rolled back.

For each fleet size (default 10 and 50) it starts that many local agents
(`robonas.fleet.simulate.SimulatedFleet`: real agent processes over loopback TLS), then in the
same run:
1. a rollout of artifact v1 with `--concurrency 1` (one robot at a time, as `robonas deploy`),
2. a rollout of artifact v2 with `--concurrency C` (default 16),
and prints both wall times and their ratio, with the host's peak RSS and peak open sockets
during the parallel one (sampled every 5 ms from /proc/self; the sockets include the store's).
Then, on a fleet of 10 with 3
failing robots, a rollout "1,rest" whose pass-rate gate fails in phase 2: the seconds from the
gate's verdict to every updated robot of the phase back on its previous policy.

    .venv/bin/python benchmarks/rollout_bench.py --out /tmp/rollout-bench [--sizes 10,50] [--json]

The artifacts are small random cart-pole MLPs (fp32 TFLite), so the transfer is a few kB: the
figures are dominated by the conversation (TLS, HELLO, STATUS, DEPLOY, the agent's canary
episode), which is what parallel transfers overlap. A random policy balances nowhere, so the
gate's three failing robots are made to fail by their agents' own canary floor (a mean return
no policy reaches) rather than by their dynamics.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Sampler:
    """Peak RSS (MiB) and open sockets of this process while a block runs."""

    def __init__(self) -> None:
        self.rss_mib = 0.0
        self.sockets = 0
        self.rss_before_mib = 0.0
        self.sockets_before = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                self.rss_mib = max(self.rss_mib, int(line.split()[1]) / 1024)
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # closed between the listing and the look
                n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        self.sockets = max(self.sockets, n)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self._sample()

    def __enter__(self) -> Sampler:
        self._sample()
        self.rss_before_mib, self.sockets_before = self.rss_mib, self.sockets
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _artifact(fleet: Any, dest: Path, seed: int) -> Path:
    """A small cart-pole policy (a random 16-unit MLP: the rollout, not its return, is measured),
    signed with the fleet's key."""
    import hashlib

    import torch

    from device_agents.signing import load_private_key
    from robonas.export.artifact import write_artifact
    from robonas.export.tflite_convert import to_tflite_fp32
    from robonas.space import Layer, PolicyArch

    torch.manual_seed(seed)
    arch = PolicyArch(obs_dim=5, act_dim=1, layers=(Layer(16, "tanh"),))
    model = to_tflite_fp32(arch.build_actor().eval(), arch.input_dim)
    manifest = {
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
    return write_artifact(dest, model, manifest, load_private_key(fleet.signing_key))


_SEQUENCE = itertools.count(int(time.time() * 1000))


def _rollout(store: Any, fleet: Any, artifact: Path, **options: Any) -> tuple[Any, float]:
    from robonas.fleet.client import Canary
    from robonas.fleet.inventory import load_inventory
    from robonas.fleet.rollouts import run_rollout, start_rollout

    inventory = load_inventory(fleet.fleet_path)
    t0 = time.perf_counter()
    row = start_rollout(
        store, artifact, inventory, str(fleet.fleet_path), canary=Canary(episodes=1), **options
    )
    row = run_rollout(store, row.id, inventory)
    return row, time.perf_counter() - t0


def measure_size(n: int, out: Path, concurrency: int) -> dict[str, Any]:
    from robonas.fleet.simulate import SimulatedFleet
    from robonas.store import Store

    store = Store(f"sqlite:///{out / f'fleet{n}.db'}")
    t0 = time.perf_counter()
    with SimulatedFleet(n, out / f"fleet{n}") as fleet:
        started_s = time.perf_counter() - t0
        v1 = _artifact(fleet, out / f"v1-{n}", 1)
        v2 = _artifact(fleet, out / f"v2-{n}", 2)
        seq, seq_s = _rollout(store, fleet, v1, phases="100%", concurrency=1)
        with Sampler() as sampled:
            par, par_s = _rollout(store, fleet, v2, phases="100%", concurrency=concurrency)
    assert seq.status == par.status == "complete", (seq.status, par.status)
    return {
        "agents": n,
        "agents_start_s": round(started_s, 2),
        "sequential_s": round(seq_s, 2),
        "parallel_s": round(par_s, 2),
        "concurrency": concurrency,
        "speedup": round(seq_s / par_s, 2),
        "peak_in_flight": par.report.get("peak_concurrency"),
        "host_peak_rss_mib": round(sampled.rss_mib, 1),
        "host_rss_before_mib": round(sampled.rss_before_mib, 1),
        "host_peak_sockets": sampled.sockets,
        "host_sockets_before": sampled.sockets_before,
    }


def measure_rollback(out: Path) -> dict[str, Any]:
    from robonas.fleet.rollouts import Gates
    from robonas.fleet.simulate import SimulatedFleet
    from robonas.store import Store

    store = Store(f"sqlite:///{out / 'gate.db'}")
    fleet = SimulatedFleet(10, out / "gate-fleet", failing=3)
    for agent in fleet.agents[7:]:
        agent.extra_args += ["--canary-min-return", "1e9"]
    with fleet:  # starts the agents (with the floor set above)
        healthy = ",".join(a.name for a in fleet.agents[:7])
        v1 = _artifact(fleet, out / "gate-v1", 1)
        first, _ = _rollout(store, fleet, v1, phases="100%", concurrency=7, agents=healthy)
        assert first.status == "complete", first.status
        # the failing robots refuse it: the gate stops phase 2
        from robonas.fleet.client import Canary
        from robonas.fleet.inventory import load_inventory
        from robonas.fleet.rollouts import run_rollout, start_rollout

        inventory = load_inventory(fleet.fleet_path)
        v2 = _artifact(fleet, out / "gate-v2", 2)
        row = start_rollout(
            store,
            v2,
            inventory,
            str(fleet.fleet_path),
            phases="1,rest",
            concurrency=9,
            canary=Canary(episodes=1),
            gates=Gates(min_pass_rate=1.0),
        )
        row = run_rollout(store, row.id, inventory)
    verdict = row.report["gates"]["1"]
    return {
        "status": row.status,
        "failed_gate": [f["gate"] for f in verdict["failures"]],
        "failed_robots": sorted(r for f in verdict["failures"] for r in f["robots"]),
        "rolled_back": len(verdict.get("rolled_back", [])),
        "gate_to_rolled_back_s": round(verdict.get("gate_to_rolled_back_s", float("nan")), 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="a new or empty folder for fleets and stores")
    ap.add_argument("--sizes", default="10,50", help="fleet sizes, comma-separated")
    ap.add_argument("--concurrency", type=int, default=16, help="robots at once in the parallel rollout")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if any(args.out.iterdir()):
        ap.error(f"--out {args.out} is not empty")
    rows = [measure_size(int(n), args.out, args.concurrency) for n in args.sizes.split(",")]
    gate = measure_rollback(args.out)
    if args.json:
        print(json.dumps({"sizes": rows, "gate": gate}, indent=2))
        return 0
    print(
        "agents  start s  sequential s  parallel s  speed-up  in flight  "
        "host RSS MiB (before)  sockets (before)"
    )
    for r in rows:
        times = f"{r['agents_start_s']:>7.1f}  {r['sequential_s']:>12.2f}  {r['parallel_s']:>10.2f}"
        rss = f"{r['host_peak_rss_mib']:>12.1f} ({r['host_rss_before_mib']:.1f})"
        host = f"{r['peak_in_flight']:>9}  {rss}  {r['host_peak_sockets']:>7} ({r['host_sockets_before']})"
        print(f"{r['agents']:>6}  {times}  {r['speedup']:>7.2f}x  {host}")
    print(
        f"gate: {gate['status']} at {gate['failed_gate']} (robots {', '.join(gate['failed_robots'])}); "
        f"{gate['rolled_back']} robot(s) rolled back {gate['gate_to_rolled_back_s']:.3f} s after the verdict"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
