"""Fresh-seed evaluation of one trained policy, the same for both tools of the race.

Run with the python of the venv the policy was trained in (robonas's venv for a robonas trial,
so its custom SB3 policy class unpickles; the rl-zoo3 venv for an rl-zoo3 model):

    race_eval.py --model M.zip --obs-norm obs_norm.npz --history H ...   (robonas artifacts)
    race_eval.py --model M.zip --vecnormalize vecnormalize.pkl ...        (rl-zoo3 files)

Each episode runs alone in one environment, reset with seed `seed0 + i`, under the training
observation statistics frozen (no reward normalisation: returns are the env's own), with the
deterministic policy, for the env's full horizon. The "upright" test reads the pole angle the
cart-pole envs report in `info["theta"]` (sim/envs/cartpole.py; theta = 0 upright): an episode is
upright when cos(theta) > --cos-min for at least --hold-share of the last --hold-steps steps of
the horizon (steps after an early termination, i.e. the cart leaving the rail, count as not
upright). Prints one JSON object.

Leans on stable-baselines3 (PPO/SAC loading, DummyVecEnv, VecNormalize, VecFrameStack), gymnasium
and the repository's `sim` package, nothing from robonas, so it runs in either venv.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import numpy as np


def _build_venv(args: argparse.Namespace) -> Any:
    import gymnasium
    from stable_baselines3.common.vec_env import DummyVecEnv, VecFrameStack, VecNormalize

    import sim  # noqa: F401  (registers the sim/* ids)

    kwargs = json.loads(args.env_kwargs)
    venv: Any = DummyVecEnv([lambda: gymnasium.make(args.env, **kwargs)])
    if args.vecnormalize:
        venv = VecNormalize.load(args.vecnormalize, venv)
    elif args.obs_norm:
        stats = np.load(args.obs_norm)
        venv = VecNormalize(
            venv,
            training=False,
            norm_obs=True,
            norm_reward=False,
            clip_obs=float(stats["clip_obs"]),
            epsilon=float(stats["epsilon"]),
        )
        venv.obs_rms.mean = np.asarray(stats["mean"], dtype=np.float64)
        venv.obs_rms.var = np.asarray(stats["var"], dtype=np.float64)
        venv.obs_rms.count = float(stats["count"])
    if isinstance(venv, VecNormalize):
        venv.training = False  # statistics frozen at what training left
        venv.norm_reward = False  # the env's own rewards
    if args.history > 1:
        # robonas's order: normalise each observation, then stack oldest first, zero-padded
        venv = VecFrameStack(venv, args.history)
    return venv


def _load_model(path: str, algo: str) -> Any:
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.base_class import BaseAlgorithm

    cls: type[BaseAlgorithm] = PPO if algo == "ppo" else SAC
    return cls.load(path, device="cpu")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    model = _load_model(args.model, args.algo)
    venv = _build_venv(args)
    import gymnasium

    horizon = int(gymnasium.spec(args.env).max_episode_steps or 0)
    if horizon <= args.hold_steps:
        raise SystemExit(f"{args.env}: horizon {horizon} is not longer than --hold-steps {args.hold_steps}")
    first_held = horizon - args.hold_steps
    returns, lengths, upright_steps = [], [], []
    for i in range(args.episodes):
        venv.seed(args.seed0 + i)
        obs = venv.reset()
        total, held = 0.0, 0
        for t in range(horizon):
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, done, infos = venv.step(action)
            total += float(reward[0])
            if t >= first_held and math.cos(float(infos[0]["theta"])) > args.cos_min:
                held += 1
            if done[0]:
                break
        returns.append(total)
        lengths.append(t + 1)
        upright_steps.append(held)
    venv.close()
    upright = [h >= args.hold_share * args.hold_steps for h in upright_steps]
    mean = float(np.mean(returns))
    return {
        "model": args.model,
        "seeds": [args.seed0, args.seed0 + args.episodes - 1],
        "returns": returns,
        "lengths": lengths,
        "upright_steps": upright_steps,
        "mean": mean,
        "std": float(np.std(returns)),
        "upright": int(sum(upright)),
        "episodes": args.episodes,
        "solved": bool(sum(upright) >= args.solved_episodes and mean >= args.solved_return),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="SB3 .zip")
    p.add_argument("--algo", default="ppo", choices=["ppo", "sac"])
    p.add_argument("--env", default="sim/CartPoleSwingUp-v0")
    p.add_argument("--env-kwargs", default="{}", help="JSON object of gymnasium.make keyword arguments")
    p.add_argument("--vecnormalize", help="rl-zoo3's vecnormalize.pkl")
    p.add_argument("--obs-norm", help="robonas's obs_norm.npz")
    p.add_argument("--history", type=int, default=1, help="observation history (robonas arch)")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--seed0", type=int, default=50_000, help="first episode seed (not used by either tool)")
    p.add_argument("--hold-steps", type=int, default=200, help="the last steps the pole must be held up")
    p.add_argument("--hold-share", type=float, default=0.9, help="share of those steps upright")
    p.add_argument("--cos-min", type=float, default=0.95, help="upright: cos(theta) above this")
    p.add_argument("--solved-episodes", type=int, default=18, help="upright episodes needed")
    p.add_argument("--solved-return", type=float, default=400.0, help="mean return needed")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.vecnormalize and args.obs_norm:
        print("give --vecnormalize or --obs-norm, not both", file=sys.stderr)
        return 2
    json.dump(evaluate(args), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
