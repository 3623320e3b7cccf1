"""How much actuation delay does each trained policy of a study tolerate?

Runs every complete trial's trained actor (torch, from the weights training wrote; nothing is
exported or stored) on a reality profile's robot twin with a fixed extra delay per action, and
prints the mean return per delay. This is the measurement behind the `cartpole-mcu-slow` profile:
on the six policies of a `launch/cartpole-mcu.toml` search, on `cartpole-lab-a`, every one
returned at most 31 with 150 ms of delay, while at 40 ms they kept 71-100% of their no-delay
return; so a network whose inference takes 150 ms there fails whatever it learnt.

    .venv/bin/python scripts/delay_tolerance.py STUDY [--store URL] [--profile cartpole-lab-a]
        [--delays-ms 0,20,40,60,80,100,150,200] [--episodes 5]
"""

from __future__ import annotations

import argparse

import numpy as np

from device_agents.robots.sim_twin import SimTwin
from robonas.export.trial_export import DeployableActor, trial_weights
from robonas.store import Store


def tolerance(
    actor: DeployableActor, profile: str, delays_ms: list[float], episodes: int, max_steps: int = 1000
) -> list[float]:
    twin = SimTwin(profile)
    try:
        means = []
        for delay in delays_ms:
            returns = []
            for ep in range(episodes):
                obs, total, done, steps = twin.reset(100 + ep), 0.0, False, 0
                while not done and steps < max_steps:
                    obs, reward, done = twin.step(actor.act(obs), delay / 1000.0)
                    total, steps = total + reward, steps + 1
                returns.append(total)
            means.append(float(np.mean(returns)))
        return means
    finally:
        twin.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study")
    p.add_argument("--store", default=None, help="SQLAlchemy URL (default: ROBONAS_STORE or runs/robonas.db)")
    p.add_argument("--profile", default="cartpole-lab-a", help="reality profile of the twin")
    p.add_argument("--delays-ms", default="0,20,40,60,80,100,150,200")
    p.add_argument("--episodes", type=int, default=5)
    a = p.parse_args()
    delays = [float(x) for x in a.delays_ms.split(",")]
    store = Store(a.store)
    study = store.get_study(a.study)
    print("trial  arch" + " " * 30 + "".join(f"{d:>7.0f}ms" for d in delays))
    for trial in store.trials(study.id, status="complete"):
        arch = trial.arch
        if arch.history != 1:
            print(f"{trial.id:5d}  {arch.describe():32s}  skipped: history {arch.history} > 1")
            continue
        w = trial_weights(store, trial)
        actor = DeployableActor.from_files(w["actor"], w["obs_norm"], w["spaces"], arch)
        means = tolerance(actor, a.profile, delays, a.episodes)
        print(f"{trial.id:5d}  {arch.describe():32s}  " + "".join(f"{m:9.0f}" for m in means))


if __name__ == "__main__":
    main()
