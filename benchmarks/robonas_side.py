"""The robonas side of the race, run with robonas's venv: what the store says, and a retrain.

Commands (each prints one JSON object on stdout):

    robonas_side.py timeline STORE_URL STUDY
        every trial (status, start/finish unix times, env steps, asymptotic return, objective,
        learning curve) and the study's best by `robonas.scoring.rank` with its weights artifact
    robonas_side.py retrain STORE_URL STUDY TRIAL_ID SEED OUT_DIR
        trains the trial's architecture again with `train_trial`, on the same settings and budget
        as the search gave it (the TrainSpec `robonas.search.loop.Search._spec` builds, from the
        study's stored config), on another seed

Only robonas's public pieces are used: the Store API, `rank`, `TrainSpec` and `train_trial`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

FINISHED = ("complete", "pruned")


def _ts(t: datetime | None) -> float | None:
    return None if t is None else t.timestamp()


def _study_ranking(config: dict[str, Any]) -> str:
    return str(config.get("search", {}).get("objective", {}).get("ranking", "mean"))


def timeline(store_url: str, study_name: str) -> dict[str, Any]:
    from robonas.scoring import rank
    from robonas.store import Store

    with Store(store_url) as store:
        study = store.get_study(study_name)
        rows = store.trials(study.id)
        trials = []
        for t in rows:
            m = t.metrics
            trials.append(
                {
                    "id": t.id,
                    "seq": t.seq,
                    "arch_id": t.arch_id,
                    "status": t.status,
                    "started_at": _ts(t.started_at),
                    "finished_at": _ts(t.finished_at),
                    "env_steps": t.env_steps,
                    "asymptotic_return": None if m is None else m.asymptotic_return,
                    "objective": None if m is None else m.objective,
                    "origin": getattr(t, "origin", "ask"),
                    # a pruned trial stopped early with the curve it reached: its evaluations count
                    "curve": store.curve(t.id) if t.status in FINISHED else [],
                }
            )
        best: dict[str, Any] | None = None
        ranked = rank(rows, _study_ranking(study.config))
        if ranked:
            b = ranked[0]
            weights = store.artifacts(b.id, "weights")
            # the candidate (arch_id: network and trainer settings) on every seed it was trained on
            seed_returns = [
                t.metrics.asymptotic_return
                for t in rows
                if t.arch_id == b.arch_id
                and t.status == "complete"
                and t.metrics is not None
                and t.metrics.asymptotic_return is not None
            ]
            best = {
                "id": b.id,
                "arch_id": b.arch_id,
                "history": b.arch.history,
                "asymptotic_return": None if b.metrics is None else b.metrics.asymptotic_return,
                "seed_returns": seed_returns,
                "figure": sum(seed_returns) / len(seed_returns) if seed_returns else None,
                "objective": None if b.metrics is None else b.metrics.objective,
                "artifacts": weights[-1].meta if weights else None,
            }
        return {
            "study": study.name,
            "status": study.status,
            "algo": study.config.get("search", {}).get("training", {}).get("algo", "ppo"),
            "trials": trials,
            "best": best,
        }


def _ranges(table: Any, resolved: dict[str, Any]) -> dict[str, Any] | None:
    # as Search._ranges: "fleet" means the ranges fixed at the study's first run
    if table == "fleet":
        return dict(resolved.get("fleet_randomization") or {}) or None
    return dict(table) if isinstance(table, dict) and table else None


def retrain(store_url: str, study_name: str, trial_id: int, seed: int, out_dir: str) -> dict[str, Any]:
    from robonas.search.training import TrainSpec, train_trial
    from robonas.store import Store

    with Store(store_url) as store:
        study = store.get_study(study_name)
        trial = store.get_trial(trial_id)
    c = study.config["search"]
    resolved = study.config.get("resolved") or {}
    # trainer settings the search chose for this candidate (PolicyArch.training, where the space
    # searches them) win over the config's fixed ones, as in Search._spec
    searched = dict(getattr(trial.arch, "training", ()) or ())
    values: dict[str, Any] = {
        "env_id": c["env"]["id"],
        "env_kwargs": dict(c["env"].get("kwargs") or {}),
        "arch": trial.arch,
        "total_steps": int(c["budget"]["steps_per_trial"]),
        "out_dir": str(Path(out_dir).resolve()),
        "return_lo": float(resolved["return_lo"]),
        "return_hi": float(resolved["return_hi"]),
        "return_max": c["env"].get("return_max"),
        "algo": c["training"]["algo"],
        "hyperparams": {**dict(c["training"].get("hyperparams") or {}), **searched},
        "n_envs": int(searched.get("n_envs", c["training"].get("n_envs") or 0)) or None,
        "checkpoints": int(c["budget"]["checkpoints"]),
        "eval_episodes": int(c["budget"]["eval_episodes"]),
        "early_eval_episodes": c["budget"].get("early_eval_episodes"),
        "eval_seed": int(c["budget"]["eval_seed"]),
        "randomization": _ranges(c.get("robustness"), resolved),
        "train_randomization": _ranges(c["training"].get("randomization"), resolved),
        "seed": seed,
    }
    # only what this version's TrainSpec has (early_eval_episodes is newer than the rest)
    known = {f.name for f in dataclasses.fields(TrainSpec)}
    spec = TrainSpec(**{k: v for k, v in values.items() if k in known})
    outcome = train_trial(spec)
    return {
        "trial": trial_id,
        "seed": seed,
        "hyperparams": dict(spec.hyperparams),
        "history": trial.arch.history,
        "algo": spec.algo,
        "total_steps": spec.total_steps,
        "asymptotic_return": outcome.asymptotic_return,
        "curve": outcome.curve,
        "wall_s": outcome.wall_s,
        "artifacts": outcome.artifacts,
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["timeline"] and len(argv) == 3:
        json.dump(timeline(argv[1], argv[2]), sys.stdout)
        return 0
    if argv[:1] == ["retrain"] and len(argv) == 6:
        json.dump(retrain(argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5]), sys.stdout)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
