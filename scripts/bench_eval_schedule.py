"""What a trial's evaluations cost, and what the cheaper schedule loses: full against coarse.

Full (the old schedule): every checkpoint evaluated on `eval_episodes` episodes, and the random
policy's return measured again in every trial. Coarse (what a search does now): checkpoints before
the last third of the curve on `early_eval_episodes` episodes (the first of the same seeds), and the
random return measured once per study. Training is the same in both (same seed, evaluation never
touches the learner), so every difference comes from evaluation.

Prints, per candidate, the evaluation env steps of both schedules and the figures a search ranks
by (normalised AUC, asymptotic return), then the totals: evaluation steps as a share of training
steps in each schedule, their ratio, and how far the figures and the ranking moved (Kendall tau of
the candidates' AUC and asymptote between the schedules).

    .venv/bin/python scripts/bench_eval_schedule.py --steps 20000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from scipy.stats import kendalltau

from robonas.space import Layer, PolicyArch

ARCHS = [
    ((16,), "tanh"),
    ((64,), "relu"),
    ((32, 32), "tanh"),
    ((64, 64), "relu"),
    ((128, 64), "tanh"),
    ((16, 16, 16), "relu"),
]


def _train(job: dict[str, Any]) -> dict[str, Any]:
    from robonas.search.training import TrainSpec, train_trial

    widths, act = job["arch"]
    arch = PolicyArch(obs_dim=5, act_dim=1, layers=tuple(Layer(w, act) for w in widths))
    spec = TrainSpec(
        env_id="sim/CartPole-v0",
        arch=arch,
        total_steps=job["steps"],
        out_dir=job["out"],
        return_lo=20.0,
        return_hi=500.0,
        return_max=500.0,
        checkpoints=job["checkpoints"],
        eval_episodes=job["episodes"],
        early_eval_episodes=job["early"],
        random_return=job["random_return"],
        seed=7,
    )
    o = train_trial(spec)
    return {
        "arch": arch.describe(),
        "schedule": job["schedule"],
        "auc": o.auc,
        "asymptote": o.asymptotic_return,
        "eval_steps": o.eval_steps,
        "env_steps": o.env_steps,
        "eval_s": o.eval_s,
        "wall_s": o.wall_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20000, help="training env steps per candidate")
    ap.add_argument("--checkpoints", type=int, default=5)
    ap.add_argument("--episodes", type=int, default=5, help="episodes per full evaluation")
    ap.add_argument("--early", type=int, default=2, help="episodes per early evaluation (coarse)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from robonas.search.training import TrainSpec, random_returns

    probe = TrainSpec(
        env_id="sim/CartPole-v0",
        arch=PolicyArch(obs_dim=5, act_dim=1, layers=(Layer(8, "relu"),)),
        total_steps=1,
        out_dir="/nonexistent",
        return_lo=0.0,
        return_hi=1.0,
        eval_episodes=args.episodes,
    )
    random_return = float(random_returns(probe).mean())
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [
            {
                "arch": arch,
                "schedule": schedule,
                "steps": args.steps,
                "checkpoints": args.checkpoints,
                "episodes": args.episodes,
                "early": early,
                "random_return": rr,
                "out": f"{tmp}/{i}-{schedule}",
            }
            for i, arch in enumerate(ARCHS)
            for schedule, early, rr in (("full", None, None), ("coarse", args.early, random_return))
        ]
        with ProcessPoolExecutor(args.workers) as pool:
            rows = list(pool.map(_train, jobs))
    full = [r for r in rows if r["schedule"] == "full"]
    coarse = [r for r in rows if r["schedule"] == "coarse"]
    summary = {
        "random_return": random_return,
        "full_eval_steps": sum(r["eval_steps"] for r in full),
        "coarse_eval_steps": sum(r["eval_steps"] for r in coarse),
        "train_steps": sum(r["env_steps"] for r in full),
        "eval_s_full": sum(r["eval_s"] for r in full),
        "eval_s_coarse": sum(r["eval_s"] for r in coarse),
        "max_abs_auc_change": max(abs(a["auc"] - b["auc"]) for a, b in zip(full, coarse, strict=True)),
        "max_abs_asymptote_change": max(
            abs(a["asymptote"] - b["asymptote"]) for a, b in zip(full, coarse, strict=True)
        ),
        "kendall_tau_auc": float(kendalltau([r["auc"] for r in full], [r["auc"] for r in coarse])[0]),
        "kendall_tau_asymptote": float(
            kendalltau([r["asymptote"] for r in full], [r["asymptote"] for r in coarse])[0]
        ),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{'candidate':28s} {'sched':7s} {'eval steps':>10s} {'auc':>6s} {'asym':>7s} {'eval s':>7s}")
    for r in rows:
        print(
            f"{r['arch']:28s} {r['schedule']:7s} {r['eval_steps']:10d} {r['auc']:6.3f} "
            f"{r['asymptote']:7.1f} {r['eval_s']:7.2f}"
        )
    f, c, t = summary["full_eval_steps"], summary["coarse_eval_steps"], summary["train_steps"]
    print(
        f"\nevaluation env steps (checkpoints and robustness; the full schedule also re-measures the "
        f"random policy in each trial, counted in eval s): full {f:,} ({f / t:.1%} of training), "
        f"coarse {c:,} ({c / t:.1%}); coarse/full = {c / f:.2f}"
    )
    print(
        f"evaluation seconds: full {summary['eval_s_full']:.1f}, coarse {summary['eval_s_coarse']:.1f}; "
        f"coarse/full = {summary['eval_s_coarse'] / summary['eval_s_full']:.2f}"
    )
    tau_auc, tau_asym = summary["kendall_tau_auc"], summary["kendall_tau_asymptote"]
    print(
        f"largest change: AUC {summary['max_abs_auc_change']:.3f}, asymptote "
        f"{summary['max_abs_asymptote_change']:.1f}; ranking kept (Kendall tau): AUC "
        f"{tau_auc:.2f}, asymptote {tau_asym:.2f}"
        + ("" if all(map(math.isfinite, (tau_auc, tau_asym))) else " (ties)")
    )


if __name__ == "__main__":
    main()
