"""robonas against rl-zoo3 + Optuna, side by side on one env, one wall budget, one worker count.

    .venv/bin/python benchmarks/race_rlzoo.py --config launch/swingup.toml --wall-min 25 \
        --workers 2 --out /tmp/race
    .venv/bin/python benchmarks/race_rlzoo.py --smoke --out /tmp/race-smoke   (plumbing, ~4 min)

What it does, in order:

1. Builds rl-zoo3's venv if it is missing (python3.11 -m venv; torch first, pinned, so pip takes
   the CPU wheel instead of a multi-GB CUDA build; then rl_zoo3, optuna, pybullet, gymnasium and
   pandas, which rl-zoo3's end-of-study report needs). The repository's `sim` package reaches it
   through PYTHONPATH (sim needs only numpy, gymnasium and pybullet) and `--gym-packages sim`.
2. Starts both searches at the same moment as subprocesses with the same worker count:
   `robonas search CONFIG --workers N` into OUT/robonas.db, and `rl_zoo3.train -optimize` (TPE
   sampler, median pruner, `--n-jobs N`) with the same env steps per trial, the same number of
   evaluations per trial and evaluation episodes, into OUT/zoo_trials and the Optuna journal
   OUT/zoo_optuna.log. rl-zoo3 runs through benchmarks/zoo_side.py, which only records each
   evaluation's wall time and the VecNormalize statistics of each trial's best model (see there).
   At the wall budget both get SIGINT (Ctrl-C: robonas records an interrupted study), then
   SIGTERM, then SIGKILL after grace periods.
3. Time-to-return: every evaluation either tool made, as (wall time since the start, mean
   return). robonas stores a trial's learning curve when the trial ends, without times, so a
   checkpoint's time is placed by interpolation of its env steps between the trial's start and
   finish; rl-zoo3's are the recorded times. race.json also has robonas's times taken at trial
   ends (when the figures reached the store), the conservative reading.
4. Picks each tool's best (robonas: `robonas.scoring.rank` of the study; rl-zoo3: Optuna's best
   trial) and evaluates it on fresh seeds (50000.. by default, used by neither tool) with
   benchmarks/race_eval.py in its own venv: mean return, upright episodes, solved or not.
5. Retrains both bests once on a new seed, at the same time, with the same settings and budget
   (robonas: `train_trial` via benchmarks/robonas_side.py; rl-zoo3: rl_zoo3.train with the best
   trial's hyperparameters as `-params`), and evaluates the retrained policies the same way.
6. Prints one table and writes OUT/race.json.

Runs with the standard library only; robonas is reached through its CLI and the helper scripts
run by robonas's venv python (--robonas-python), rl-zoo3 through its venv's python.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ZOO_TORCH = "torch==2.13.0"  # the CPU wheel; installed before anything that depends on torch
ZOO_PACKAGES = ("rl_zoo3==2.9.2", "optuna", "pybullet", "gymnasium", "pandas")
DEFAULT_ZOO_VENV = Path.home() / ".cache" / "robonas-bench" / "rlzoo-venv"
SMOKE = {"wall_min": 1.5, "steps": 8192}


# --- configuration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Race:
    """What both tools are given, read from the robonas config plus the flags."""

    config: Path
    env_id: str
    env_kwargs: dict[str, Any]
    algo: str
    steps: int  # env steps per trial, both tools
    checkpoints: int  # evaluations per trial, both tools
    eval_episodes: int  # episodes per evaluation, both tools
    n_envs: int
    workers: int
    wall_s: float
    study: str


def read_race(args: argparse.Namespace) -> Race:
    import tomllib  # here: ruff sorts it as stdlib or third-party depending on its target version

    path = Path(args.config)
    if not path.is_absolute():
        path = (Path.cwd() / path) if (Path.cwd() / path).exists() else REPO / path
    try:
        cfg = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(f"--config {args.config}: {e}") from e
    try:
        env, budget = cfg["env"], cfg["budget"]
        training = cfg.get("training", {})
        return Race(
            config=path,
            env_id=str(env["id"]),
            env_kwargs=dict(env.get("kwargs", {})),
            algo=str(training.get("algo", "ppo")),
            steps=int(args.steps or budget["steps_per_trial"]),
            checkpoints=int(budget.get("checkpoints", 5)),
            eval_episodes=int(budget.get("eval_episodes", 5)),
            n_envs=int(training.get("n_envs", 4)),
            workers=int(args.workers),
            wall_s=float(args.wall_min) * 60.0,
            study=args.study,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"--config {path}: missing or bad entry {e}") from e


# --- subprocesses -------------------------------------------------------------------------------
class Job:
    """A subprocess in its own process group, output to a log file, stopped as Ctrl-C would."""

    def __init__(self, name: str, cmd: Sequence[str], log: Path, env: dict[str, str] | None = None):
        self.name, self.cmd, self.log_path = name, list(cmd), log
        self._log: TextIO = open(log, "w")  # noqa: SIM115  (closed in wait/stop)
        self._log.write("$ " + " ".join(self.cmd) + "\n")
        self._log.flush()
        self.popen = subprocess.Popen(
            self.cmd,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own group: signals reach its workers, not us
        )

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text()


def stop_all(jobs: Sequence[Job], grace_s: float) -> dict[str, str]:
    """SIGINT, then SIGTERM after grace_s, then SIGKILL after 10 s more; how each one ended."""
    how: dict[str, str] = {}
    for sig, label, wait_s in (
        (signal.SIGINT, "SIGINT", grace_s),
        (signal.SIGTERM, "SIGTERM", 10.0),
        (signal.SIGKILL, "SIGKILL", 10.0),
    ):
        live = [j for j in jobs if j.running()]
        for j in live:
            j.signal(sig)
        deadline = time.time() + wait_s
        for j in live:
            if j.wait(max(0.0, deadline - time.time())) is not None:
                how[j.name] = f"stopped by {label} (exit {j.popen.returncode})"
    for j in jobs:
        how.setdefault(j.name, f"finished by itself (exit {j.popen.returncode})")
        j.wait(0)
    return how


def earlier_result(log: Path) -> dict[str, Any]:
    """What `run_side_by_side` returned for a command that ran before (its .out beside its log)."""
    out = log.with_suffix(".out")
    lines = out.read_text().strip().splitlines() if out.exists() else []
    try:
        result: dict[str, Any] = json.loads(lines[-1])
        return result
    except (IndexError, ValueError):
        return {"exit": 0, "stdout": str(out)} if lines or out.exists() else {"error": f"no {out}"}


def run_side_by_side(jobs: dict[str, tuple[list[str], Path, dict[str, str]]]) -> dict[str, Any]:
    """Run commands at the same time; each result is the JSON object a command printed last on
    stdout, {"exit": 0, "stdout": path} for one that printed something else, or {"error": ...}."""
    started = {}
    for name, (cmd, log, env) in jobs.items():
        out = log.with_suffix(".out")
        with open(log, "w") as err, open(out, "w") as stdout:
            started[name] = (
                subprocess.Popen(
                    cmd,
                    cwd=REPO,
                    env={**os.environ, **env},
                    stdout=stdout,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                ),
                out,
                log,
            )
    results: dict[str, Any] = {}
    for name, (popen, out, log) in started.items():
        code = popen.wait()
        text = out.read_text().strip()
        if code != 0 or not text:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            results[name] = {"error": f"exit {code}; see {log}:\n{tail}"}
            continue
        try:
            results[name] = json.loads(text.splitlines()[-1])
        except ValueError:
            results[name] = {"exit": code, "stdout": str(out)}
    return results


# --- the rl-zoo3 venv ---------------------------------------------------------------------------
def zoo_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1"}


def ensure_zoo_venv(venv: Path, python311: str, log: Path) -> Path:
    """The venv's python, after building the venv if it is missing or was built with other pins."""
    python = venv / "bin" / "python"
    marker = venv / "race-pins.json"
    pins = {"torch": ZOO_TORCH, "packages": list(ZOO_PACKAGES)}
    if not (python.exists() and marker.exists() and json.loads(marker.read_text()) == pins):
        print(f"building the rl-zoo3 venv at {venv} (log: {log})", flush=True)
        if venv.exists():
            shutil.rmtree(venv)
        venv.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            for cmd in (
                [python311, "-m", "venv", str(venv)],
                [str(python), "-m", "pip", "install", ZOO_TORCH],
                [str(python), "-m", "pip", "install", *ZOO_PACKAGES],
            ):
                f.write("$ " + " ".join(cmd) + "\n")
                f.flush()
                if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode != 0:
                    raise SystemExit(f"building the rl-zoo3 venv failed at: {' '.join(cmd)} (see {log})")
        marker.write_text(json.dumps(pins))
    check = subprocess.run(
        [str(python), "-m", "rl_zoo3.train", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, **zoo_env()},
        check=False,
    )
    if check.returncode != 0:
        raise SystemExit(f"{python} -m rl_zoo3.train --help failed:\n{check.stderr[-2000:]}")
    return python


# --- the race -----------------------------------------------------------------------------------
def robonas_command(args: argparse.Namespace, race: Race, out: Path) -> list[str]:
    cli = Path(args.robonas_python).parent / "robonas"
    cmd = [str(cli), "search", str(race.config), "--workers", str(race.workers)]
    cmd += ["--store", f"sqlite:///{out / 'robonas.db'}", "--study", race.study]
    if args.steps:
        cmd += ["--steps", str(race.steps)]
    if args.robonas_trials:
        cmd += ["--trials", str(args.robonas_trials)]
    return cmd


def zoo_command(args: argparse.Namespace, race: Race, out: Path, zoo_python: Path) -> list[str]:
    cmd = [str(zoo_python), str(HERE / "zoo_side.py"), "train"]
    cmd += ["--algo", race.algo, "--env", race.env_id, "--gym-packages", "sim", "-conf", str(args.zoo_conf)]
    cmd += ["-optimize", "--n-jobs", str(race.workers), "--sampler", "tpe", "--pruner", "median"]
    cmd += ["--n-trials", str(args.zoo_trials), "--n-timesteps", str(race.steps)]
    cmd += ["--n-evaluations", str(race.checkpoints), "--eval-episodes", str(race.eval_episodes)]
    cmd += ["--optimization-log-path", str(out / "zoo_trials")]
    cmd += ["--storage", str(out / "zoo_optuna.log"), "--study-name", race.study]
    cmd += ["--num-threads", "1", "--device", "cpu", "-f", str(out / "zoo_logs"), "--no-optim-plots"]
    cmd += ["--seed", str(args.zoo_seed), "--verbose", "1"]
    return cmd + zoo_env_kwargs(race)


def zoo_env_kwargs(race: Race) -> list[str]:
    if not race.env_kwargs:
        return []
    return ["--env-kwargs", *(f"{k}:{v!r}" for k, v in race.env_kwargs.items())]


def robonas_timeline(args: argparse.Namespace, out: Path, study: str) -> dict[str, Any]:
    cmd = [
        args.robonas_python,
        str(HERE / "robonas_side.py"),
        "timeline",
        f"sqlite:///{out / 'robonas.db'}",
        study,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-2000:], "trials": [], "best": None}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def zoo_evaluations(out: Path) -> list[dict[str, Any]]:
    points = []
    for path in sorted((out / "zoo_trials").glob("trial_*/eval_times.jsonl")):
        trial = int(path.parent.name.split("_")[1])
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                points.append({**json.loads(line), "trial": trial})
    return points


def zoo_study(zoo_python: Path, out: Path, study: str, algo: str) -> list[dict[str, Any]]:
    log = out / "zoo_optuna.log"
    if not log.exists():
        return []
    cmd = [str(zoo_python), str(HERE / "zoo_side.py"), "study", str(log), study, algo]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **zoo_env()}, check=False)
    if done.returncode != 0:
        print(f"warning: reading the Optuna study failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
        return []
    trials: list[dict[str, Any]] = json.loads(done.stdout)
    return trials


def progress_line(args: argparse.Namespace, out: Path, race: Race, t0: float) -> str:
    rob = robonas_timeline(args, out, race.study)
    complete = [t for t in rob.get("trials", []) if t["status"] == "complete"]
    rob_best = max((p[1] for t in complete for p in t["curve"]), default=None)
    zoo = zoo_evaluations(out)
    zoo_best = max((p["mean"] for p in zoo), default=None)
    return (
        f"[{(time.time() - t0) / 60:5.1f} min] robonas: {len(complete)} trials done, best eval "
        f"{fmt(rob_best)} | rl-zoo3: {len({p['trial'] for p in zoo})} trials evaluated, "
        f"{len(zoo)} evaluations, best eval {fmt(zoo_best)}"
    )


def run_race(args: argparse.Namespace, race: Race, out: Path, zoo_python: Path) -> dict[str, Any]:
    rob_cmd = robonas_command(args, race, out)
    zoo_cmd = zoo_command(args, race, out, zoo_python)
    print(f"race: {race.env_id}, {race.workers} workers each, {race.wall_s / 60:.1f} min wall", flush=True)
    print("  robonas: " + " ".join(rob_cmd), flush=True)
    print("  rl-zoo3: " + " ".join(zoo_cmd), flush=True)
    t0 = time.time()
    jobs = [
        Job("robonas", rob_cmd, out / "robonas_search.log", {"PYTHONUNBUFFERED": "1"}),
        Job("rl-zoo3", zoo_cmd, out / "zoo_search.log", zoo_env()),
    ]
    try:
        next_report = t0 + args.progress_s
        while time.time() - t0 < race.wall_s and any(j.running() for j in jobs):
            time.sleep(min(2.0, max(0.0, t0 + race.wall_s - time.time())))
            if time.time() >= next_report:
                print(progress_line(args, out, race, t0), flush=True)
                next_report += args.progress_s
    finally:
        t_stop = time.time()
        ended = stop_all(jobs, args.grace_s)
    meta = {
        "t0": t0,
        "t_stop": t_stop,
        "wall_s": race.wall_s,
        "ended": ended,
        "commands": {"robonas": rob_cmd, "rl-zoo3": zoo_cmd},
    }
    (out / "race_meta.json").write_text(json.dumps(meta, indent=2))
    for name, how in ended.items():
        print(f"  {name}: {how}", flush=True)
    return meta


# --- time-to-return -----------------------------------------------------------------------------
def robonas_points(timeline: dict[str, Any], t0: float, at_trial_end: bool) -> list[dict[str, Any]]:
    points = []
    for t in timeline.get("trials", []):
        finished = t["status"] in ("complete", "pruned")
        if not finished or not t["curve"] or t["started_at"] is None or t["finished_at"] is None:
            continue
        span, steps = t["finished_at"] - t["started_at"], max(1, t["env_steps"] or t["curve"][-1][0])
        for step, mean, _std in t["curve"]:
            when = t["finished_at"] if at_trial_end else t["started_at"] + span * min(1.0, step / steps)
            points.append({"t": when - t0, "mean": mean, "trial": t["id"], "steps": step})
    return sorted(points, key=lambda p: p["t"])


def zoo_points(evaluations: list[dict[str, Any]], t0: float) -> list[dict[str, Any]]:
    points = [
        {"t": e["t"] - t0, "mean": e["mean"], "trial": e["trial"], "steps": e["timesteps"]}
        for e in evaluations
    ]
    return sorted(points, key=lambda p: p["t"])


def first_time(points: list[dict[str, Any]], level: float, wall_s: float) -> float | None:
    for p in points:
        if p["t"] <= wall_s and p["mean"] >= level:
            return float(p["t"])
    return None


def best_so_far(points: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(t, best mean so far) at each improvement."""
    curve: list[tuple[float, float]] = []
    for p in points:
        if not curve or p["mean"] > curve[-1][1]:
            curve.append((round(p["t"], 1), p["mean"]))
    return curve


def ratio(zoo_t: float | None, rob_t: float | None, wall_s: float) -> dict[str, Any]:
    """rl-zoo3's time over robonas's (above 1: robonas sooner); a bound when one never got there."""
    if zoo_t is not None and rob_t is not None:
        return {"value": zoo_t / max(rob_t, 1e-9), "bound": None}
    if rob_t is not None:
        return {"value": wall_s / max(rob_t, 1e-9), "bound": "at least"}  # zoo: not within the wall
    if zoo_t is not None:
        return {"value": zoo_t / wall_s, "bound": "at most"}
    return {"value": None, "bound": None}


# --- bests, fresh seeds, retrains ---------------------------------------------------------------
def eval_args(args: argparse.Namespace, race: Race) -> list[str]:
    a = ["--env", race.env_id, "--algo", race.algo, "--episodes", str(args.episodes)]
    a += ["--seed0", str(args.seed0), "--solved-return", str(args.solved_return)]
    if race.env_kwargs:
        a += ["--env-kwargs", json.dumps(race.env_kwargs)]
    return a


def robonas_eval_cmd(
    args: argparse.Namespace, race: Race, artifacts: dict[str, str], history: int
) -> list[str]:
    cmd = [args.robonas_python, str(HERE / "race_eval.py"), "--model", artifacts["sb3_model"]]
    return [*cmd, "--obs-norm", artifacts["obs_norm"], "--history", str(history), *eval_args(args, race)]


def zoo_eval_cmd(
    args: argparse.Namespace, race: Race, zoo_python: Path, model: Path, stats: Path | None
) -> list[str]:
    cmd = [str(zoo_python), str(HERE / "race_eval.py"), "--model", str(model)]
    if stats is not None:
        cmd += ["--vecnormalize", str(stats)]
    return cmd + eval_args(args, race)


def zoo_best(trials: list[dict[str, Any]], t_stop: float) -> dict[str, Any] | None:
    """Optuna's best trial among those complete when the wall budget ran out (its trial threads
    finish their trials after SIGINT, during the grace period; those do not count)."""
    complete = [
        t
        for t in trials
        if t["state"] == "COMPLETE" and t["value"] is not None and (t["complete"] or math.inf) <= t_stop
    ]
    # Optuna's best_trial: the highest value, the first such trial on ties
    return max(complete, key=lambda t: (t["value"], -t["number"]), default=None)


def zoo_retrain_cmd(
    args: argparse.Namespace, race: Race, zoo_python: Path, best: dict[str, Any], out: Path
) -> list[str]:
    cmd = [str(zoo_python), str(HERE / "zoo_side.py"), "train"]
    cmd += ["--algo", race.algo, "--env", race.env_id, "--gym-packages", "sim", "-conf", str(args.zoo_conf)]
    cmd += ["-n", str(race.steps), "--seed", str(args.retrain_seed), "--num-threads", "1", "--device", "cpu"]
    cmd += ["--eval-freq", "-1", "-f", str(out / "zoo_retrain"), "--verbose", "0"]
    # rl-zoo3's own --storage/--study-name/--trial-id would do this, but it skips trial 0 (a falsy id)
    cmd += ["-params", *best["zoo_params"]]
    return cmd + zoo_env_kwargs(race)


def zoo_retrained_files(out: Path) -> tuple[Path, Path | None] | None:
    """The final model rl-zoo3 saved (ALGO/ENV_1/ENV.zip) and its VecNormalize statistics."""
    runs = sorted((out / "zoo_retrain").glob("*/*_1"))
    for run in runs:
        for model in run.glob("*.zip"):
            stats = run / model.stem / "vecnormalize.pkl"
            return model, stats if stats.exists() else None
    return None


def within(value: float | None, reference: float | None, share: float) -> bool | None:
    if value is None or reference is None:
        return None
    return abs(value - reference) <= share * abs(reference)


def analyse(
    args: argparse.Namespace, race: Race, out: Path, zoo_python: Path, meta: dict[str, Any]
) -> dict[str, Any]:
    t0, wall = meta["t0"], race.wall_s
    timeline = robonas_timeline(args, out, race.study)
    zoo_trials = zoo_study(zoo_python, out, race.study, race.algo)
    rob_pts = robonas_points(timeline, t0, at_trial_end=False)
    rob_end_pts = robonas_points(timeline, t0, at_trial_end=True)
    zoo_pts = zoo_points(zoo_evaluations(out), t0)
    rob_best, z_best = timeline.get("best"), zoo_best(zoo_trials, meta["t_stop"])

    # robonas's figure for its best candidate: the asymptotic return, averaged over the seeds the
    # search trained it on when its seed check trained it on more than one
    rob_figure = None if rob_best is None else rob_best.get("figure", rob_best["asymptotic_return"])
    zoo_figure = None if z_best is None else z_best["value"]
    levels = [float(x) for x in args.thresholds.split(",") if x.strip()]
    result: dict[str, Any] = {
        "env_id": race.env_id,
        "workers": race.workers,
        "wall_min": wall / 60,
        "steps_per_trial": race.steps,
        "study": race.study,
        "meta": meta,
        "thresholds": levels,
    }

    def tool_times(points: list[dict[str, Any]]) -> dict[str, float | None]:
        return {str(int(lv) if lv.is_integer() else lv): first_time(points, lv, wall) for lv in levels}

    rob_trial_end = None
    if rob_best is not None:
        row = next(t for t in timeline["trials"] if t["id"] == rob_best["id"])
        rob_trial_end = row["finished_at"] - t0
    zoo_trial_end = None if z_best is None or z_best["complete"] is None else z_best["complete"] - t0
    result["robonas"] = {
        "trials": {
            s: sum(t["status"] == s for t in timeline.get("trials", []))
            for s in ("complete", "pruned", "failed", "rejected", "pending", "running")
        },
        "best": rob_best,
        "figure": rob_figure,
        "time_to": tool_times(rob_pts),
        "time_to_at_trial_end": tool_times(rob_end_pts),
        "time_to_best_trial_end": rob_trial_end,
        "time_to_other_best": None if zoo_figure is None else first_time(rob_pts, zoo_figure, wall),
        "best_so_far": best_so_far(rob_pts),
        "error": timeline.get("error"),
    }
    result["rl-zoo3"] = {
        # trials that ended within the wall budget (see zoo_best)
        "trials": {
            s: sum(t["state"] == s and (t["complete"] or math.inf) <= meta["t_stop"] for t in zoo_trials)
            for s in ("COMPLETE", "PRUNED", "FAIL")
        },
        "best": z_best,
        "figure": zoo_figure,
        "time_to": tool_times(zoo_pts),
        "time_to_best_trial_end": zoo_trial_end,
        "time_to_own_best": None if zoo_figure is None else first_time(zoo_pts, zoo_figure, wall),
        "time_to_other_best": None if rob_figure is None else first_time(zoo_pts, rob_figure, wall),
        "best_so_far": best_so_far(zoo_pts),
    }
    ratios = {
        k: ratio(result["rl-zoo3"]["time_to"][k], result["robonas"]["time_to"][k], wall)
        for k in result["robonas"]["time_to"]
    }
    if zoo_figure is not None:
        ratios["rl-zoo3 best"] = ratio(
            result["rl-zoo3"]["time_to_own_best"], result["robonas"]["time_to_other_best"], wall
        )
    result["ratios"] = ratios

    # fresh seeds for both bests, side by side
    zoo_files = None
    if z_best is not None:
        trial_dir = out / "zoo_trials" / f"trial_{z_best['number']}"
        stats = trial_dir / "vecnormalize.pkl"
        zoo_files = (trial_dir / "best_model.zip", stats if stats.exists() else None)
    Jobs = dict[str, tuple[list[str], Path, dict[str, str]]]
    evals: Jobs = {}
    if rob_best is not None and rob_best.get("artifacts"):
        evals["robonas"] = (
            robonas_eval_cmd(args, race, rob_best["artifacts"], rob_best["history"]),
            out / "eval_robonas.log",
            {},
        )
    if zoo_files is not None:
        evals["rl-zoo3"] = (zoo_eval_cmd(args, race, zoo_python, *zoo_files), out / "eval_zoo.log", zoo_env())
    print(f"evaluating the bests on {args.episodes} fresh seeds from {args.seed0}", flush=True)
    for name, value in run_side_by_side(evals).items():
        result[name]["fresh"] = value

    if args.no_retrain:
        return result
    retrains: Jobs = {}
    if rob_best is not None:
        rob_cmd = [
            args.robonas_python,
            str(HERE / "robonas_side.py"),
            "retrain",
            f"sqlite:///{out / 'robonas.db'}",
        ]
        rob_cmd += [race.study, str(rob_best["id"]), str(args.retrain_seed), str(out / "robonas_retrain")]
        retrains["robonas"] = (rob_cmd, out / "retrain_robonas.log", {})
    if z_best is not None:
        retrains["rl-zoo3"] = (
            zoo_retrain_cmd(args, race, zoo_python, z_best, out),
            out / "retrain_zoo.log",
            zoo_env(),
        )
    if args.reuse_retrains:
        # the retrains of an earlier analysis of this race (a retrain depends on the best
        # candidate's settings and the retrain seed only, not on which of its seeds ships)
        trained = {name: earlier_result(log) for name, (_, log, _) in retrains.items()}
        print("reusing the retrains already in --out", flush=True)
    else:
        print(f"retraining both bests on seed {args.retrain_seed}, side by side", flush=True)
        t_retrain = time.time()
        trained = run_side_by_side(retrains)
        print(f"  retrains took {(time.time() - t_retrain) / 60:.1f} min", flush=True)
    evals = {}
    rob_re = trained.get("robonas")
    if rob_re is not None and "error" not in rob_re:
        evals["robonas"] = (
            robonas_eval_cmd(args, race, rob_re["artifacts"], rob_re["history"]),
            out / "eval_robonas_retrain.log",
            {},
        )
    elif rob_re is not None:
        result["robonas"]["retrain"] = rob_re
    if "rl-zoo3" in trained:
        files = zoo_retrained_files(out)
        if files is not None:
            evals["rl-zoo3"] = (
                zoo_eval_cmd(args, race, zoo_python, *files),
                out / "eval_zoo_retrain.log",
                zoo_env(),
            )
        else:
            result["rl-zoo3"]["retrain"] = {
                "error": f"no retrained model under {out / 'zoo_retrain'}; see {out / 'retrain_zoo.log'}"
            }
    for name, value in run_side_by_side(evals).items():
        result[name]["retrain"] = value
        figure = result[name]["figure"]
        value["within_share"] = args.retrain_share
        value["within"] = within(value.get("mean"), figure, args.retrain_share)
    return result


# --- report -------------------------------------------------------------------------------------
def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def minutes(t: float | None, wall_s: float) -> str:
    return f"never (> {wall_s / 60:.1f})" if t is None else f"{t / 60:.1f}"


def yes_no(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "no")


def ratio_text(r: dict[str, Any]) -> str:
    if r["value"] is None:
        return "- (neither got there)"
    prefix = {"at least": ">= ", "at most": "<= "}.get(r["bound"] or "", "")
    return f"{prefix}{r['value']:.2f}x"


def table(result: dict[str, Any]) -> str:
    wall = result["wall_min"] * 60
    tools = ("robonas", "rl-zoo3")
    rows: list[tuple[str, ...]] = [("", "robonas", "rl-zoo3 + Optuna")]
    for key in result["robonas"]["time_to"]:
        rows.append((f"time to {key} (min)", *(minutes(result[t]["time_to"][key], wall) for t in tools)))
    rows.append(
        ("time to own best (min)", *(minutes(result[t]["time_to_best_trial_end"], wall) for t in tools))
    )
    rows.append(("final best (own figure)", *(fmt(result[t]["figure"]) for t in tools)))
    rob_n, zoo_n = result["robonas"]["trials"], result["rl-zoo3"]["trials"]
    rows.append(
        (
            "trials finished",
            f"{rob_n['complete']} complete, {rob_n['pruned']} pruned, {rob_n['failed']} failed",
            f"{zoo_n['COMPLETE']} complete, {zoo_n['PRUNED']} pruned, {zoo_n['FAIL']} failed",
        )
    )

    def fresh(t: str, key: str) -> tuple[str, str, str]:
        f = result[t].get(key) or {}
        if "error" in f:
            return ("error (see log)", "-", "-")
        if not f:
            return ("-", "-", "-")
        return (f"{fmt(f['mean'])} ± {fmt(f['std'])}", f"{f['upright']}/{f['episodes']}", yes_no(f["solved"]))

    cells = {t: fresh(t, "fresh") for t in tools}
    rows.append(("fresh seeds: mean ± std", *(cells[t][0] for t in tools)))
    rows.append(("fresh seeds: upright episodes", *(cells[t][1] for t in tools)))
    rows.append(("solved", *(cells[t][2] for t in tools)))
    re_cells = {t: fresh(t, "retrain") for t in tools}
    rows.append(("retrain, fresh seeds: mean ± std", *(re_cells[t][0] for t in tools)))
    rows.append(
        (
            "retrain within 10% of own figure",
            *(yes_no((result[t].get("retrain") or {}).get("within")) for t in tools),
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("time ratios, rl-zoo3 / robonas (above 1: robonas sooner):")
    for key, r in result["ratios"].items():
        label = (
            f"to {key}"
            if key != "rl-zoo3 best"
            else f"to rl-zoo3's best figure ({fmt(result['rl-zoo3']['figure'])})"
        )
        lines.append(f"  {label}: {ratio_text(r)}")
    return "\n".join(lines)


def targets(result: dict[str, Any]) -> str:
    rob = result["robonas"]
    solved = (rob.get("fresh") or {}).get("solved")
    r = result["ratios"].get("rl-zoo3 best", {"value": None})
    sooner = None if r["value"] is None else r["value"] >= 3.0 and r.get("bound") != "at most"
    lines = [
        "targets (reported, not asserted):",
        f"  robonas's best solves the task within {result['wall_min']:.1f} min: {yes_no(solved)}",
        f"  robonas >= 3x sooner to rl-zoo3's best figure: {yes_no(sooner)} ({ratio_text(r)})",
        f"  robonas's retrain within 10% of its figure: {yes_no((rob.get('retrain') or {}).get('within'))}",
    ]
    return "\n".join(lines)


# --- entry --------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Race robonas against rl-zoo3 + Optuna: one env, one wall budget, one worker count.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default="launch/swingup.toml", help="robonas search config (its env is raced)")
    p.add_argument("--wall-min", type=float, default=25.0, help="wall budget of the race, minutes")
    p.add_argument("--workers", type=int, default=2, help="workers for each tool")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "race", help="output directory (new or empty)")
    p.add_argument("--study", default="race", help="study name in both stores")
    p.add_argument("--steps", type=int, help="env steps per trial for both; None: the config's")
    p.add_argument("--robonas-trials", type=int, help="robonas --trials; None: the config's")
    p.add_argument("--zoo-trials", type=int, default=1000, help="rl-zoo3 --n-trials (the wall stops it)")
    p.add_argument("--zoo-seed", type=int, default=0, help="rl-zoo3 --seed (its sampler's seed)")
    p.add_argument("--zoo-conf", type=Path, default=HERE / "rlzoo_swingup.yml", help="rl-zoo3 -conf file")
    p.add_argument("--zoo-venv", type=Path, default=DEFAULT_ZOO_VENV, help="rl-zoo3 venv (built if missing)")
    p.add_argument("--python311", default="python3.11", help="interpreter the rl-zoo3 venv is built from")
    p.add_argument(
        "--robonas-python", default=str(REPO / ".venv" / "bin" / "python"), help="python of robonas's venv"
    )
    p.add_argument("--episodes", type=int, default=20, help="fresh-seed episodes per evaluation")
    p.add_argument("--seed0", type=int, default=50_000, help="first fresh seed")
    p.add_argument("--solved-return", type=float, default=400.0, help="mean return a solved policy needs")
    p.add_argument("--thresholds", default="200,300,400", help="returns to time, comma-separated")
    p.add_argument("--retrain-seed", type=int, default=20_260, help="seed of both retrains")
    p.add_argument("--retrain-share", type=float, default=0.10, help="retrain tolerance, share of the figure")
    p.add_argument("--no-retrain", action="store_true", help="skip the retrains")
    p.add_argument("--grace-s", type=float, default=30.0, help="seconds between SIGINT and SIGTERM")
    p.add_argument("--progress-s", type=float, default=120.0, help="seconds between progress lines")
    p.add_argument("--skip-race", action="store_true", help="re-analyse the race already in --out")
    p.add_argument(
        "--reuse-retrains",
        action="store_true",
        help="with --skip-race: evaluate the retrains already in --out instead of training them again",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"plumbing check: a {SMOKE['wall_min']} min race, {SMOKE['steps']} steps per trial and retrain",
    )
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.smoke:
        args.wall_min = SMOKE["wall_min"] if "--wall-min" not in argv else args.wall_min
        args.steps = args.steps or SMOKE["steps"]
        args.progress_s = min(args.progress_s, 30.0)
    if args.workers < 1 or args.wall_min <= 0:
        raise SystemExit("--workers and --wall-min must be positive")
    race = read_race(args)
    out = args.out.resolve()
    args.zoo_conf = args.zoo_conf.resolve()
    if not Path(args.robonas_python).exists():
        raise SystemExit(
            f"--robonas-python {args.robonas_python} does not exist (make the repo's .venv first)"
        )
    if args.skip_race:
        meta_path = out / "race_meta.json"
        if not meta_path.exists():
            raise SystemExit(f"--skip-race: no {meta_path}; run the race first")
        meta = json.loads(meta_path.read_text())
    elif out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty; give a new directory (or --skip-race to re-analyse it)")
    out.mkdir(parents=True, exist_ok=True)
    zoo_python = ensure_zoo_venv(args.zoo_venv.expanduser(), args.python311, out / "zoo_venv_build.log")
    if not args.skip_race:
        meta = run_race(args, race, out, zoo_python)
    result = analyse(args, race, out, zoo_python, meta)
    (out / "race.json").write_text(json.dumps(result, indent=2, default=str))
    print()
    print(table(result))
    print()
    print(targets(result))
    print(f"\nfull record: {out / 'race.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
