"""The rl-zoo3 side of the race, run with the rl-zoo3 venv's python (never robonas's).

Commands:

    zoo_side.py train ARGS...     rl_zoo3.train with ARGS, plus the two records below
    zoo_side.py study LOG NAME ALGO   the Optuna study's trials as JSON on stdout

`train` runs rl-zoo3's own `rl_zoo3.train.train()` unchanged except for three things, all needed
to measure it and none changing how it trains or what Optuna sees:

1. each evaluation of an optimisation trial appends `{"t": unix time, "timesteps", "mean"}` to
   `eval_times.jsonl` beside that trial's `evaluations.npz` (the npz has no wall times, and a
   file's mtime keeps only the last evaluation);
2. when a trial's evaluation is its best so far, the training VecNormalize statistics are saved
   beside `best_model.zip` as `vecnormalize.pkl` (rl-zoo3's own `SaveVecNormalizeCallback`, as its
   normal training mode does on a new best; in optimisation mode it saves the model only, which
   with `normalize: true` cannot be evaluated without its statistics);
3. `sim`'s fd silencing around pybullet connections (sim/envs/_quiet_bullet.py) is serialised
   by a lock: Optuna's `--n-jobs` runs trials in threads, and two threads interleaving its
   dup/dup2 calls leave fds 1 and 2 on /dev/null for good (the process then dies with no
   traceback to read).

Leans on rl_zoo3, stable-baselines3, optuna and the repository's `sim` package (on PYTHONPATH).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any


def _serialise_fd_silencing() -> None:
    import sim.envs._quiet_bullet as quiet

    original = quiet.silenced_fds
    lock = threading.RLock()

    @contextlib.contextmanager
    def locked() -> Iterator[None]:
        with lock, original():
            yield

    # direct_client looks the name up at call time, so replacing the module attribute is enough
    quiet.silenced_fds = locked


def _zoo(module: str) -> Any:
    # rl_zoo3 lives only in the rl-zoo3 venv; imported by name, it is untyped (Any) to the type
    # checker of the repository's venv, which does not have it
    return importlib.import_module(module)


def _patch_trial_callback() -> None:
    exp_manager = _zoo("rl_zoo3.exp_manager")
    callbacks = _zoo("rl_zoo3.callbacks")
    save_vec_normalize = callbacks.SaveVecNormalizeCallback
    trial_eval_callback: Any = callbacks.TrialEvalCallback

    class RecordingTrialEvalCallback(trial_eval_callback):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._times_path = None
            if self.best_model_save_path is not None:
                self._times_path = os.path.join(self.best_model_save_path, "eval_times.jsonl")
                on_best = save_vec_normalize(save_freq=1, save_path=self.best_model_save_path)
                # EvalCallback initialises it with the model and fires it on each new best
                self.callback_on_new_best = on_best
                on_best.parent = self

        def _on_step(self) -> bool:
            evaluated_before = self.eval_idx
            keep_going = super()._on_step()
            if self._times_path is not None and self.eval_idx > evaluated_before:
                line = {
                    "t": time.time(),
                    "timesteps": int(self.num_timesteps),
                    "mean": float(self.last_mean_reward),
                    "pruned": bool(self.is_pruned),
                }
                with open(self._times_path, "a") as f:
                    f.write(json.dumps(line) + "\n")
            return bool(keep_going)

    exp_manager.TrialEvalCallback = RecordingTrialEvalCallback


def train(argv: list[str]) -> None:
    import sim  # noqa: F401  (registers the env ids before rl-zoo3 looks them up)

    _serialise_fd_silencing()
    _patch_trial_callback()
    sys.argv = ["rl_zoo3.train", *argv]
    _zoo("rl_zoo3.train").train()


def _converted_params(raw: dict[str, Any], algo: str) -> list[str]:
    """rl-zoo3's conversion of a trial's sampled values for `algo`, as `-params key:value` tokens."""
    convert = _zoo("rl_zoo3.hyperparams_opt").HYPERPARAMS_CONVERTER[algo]
    tokens = []
    for key, value in convert(dict(raw)).items():
        if key == "policy_kwargs":
            # StoreDict evaluates each value with torch.nn imported as nn (rl_zoo3/utils.py);
            # the off-policy samplers leave the activation to the policy's default
            parts = [f"{k}={v!r}" for k, v in value.items() if k != "activation_fn"]
            if "activation_fn" in value:
                parts.append(f"activation_fn=nn.{value['activation_fn'].__name__}")
            tokens.append(f"policy_kwargs:dict({', '.join(parts)})")
        else:
            tokens.append(f"{key}:{value!r}")
    return tokens


def study(log_path: str, name: str, algo: str) -> None:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(log_path))
    trials = []
    for t in optuna.load_study(study_name=name, storage=storage).trials:
        trials.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
                "zoo_params": _converted_params(t.params, algo) if t.params else [],
                "start": t.datetime_start.timestamp() if t.datetime_start else None,
                "complete": t.datetime_complete.timestamp() if t.datetime_complete else None,
                "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
            }
        )
    json.dump(trials, sys.stdout)


def main(argv: list[str]) -> int:
    if argv[:1] == ["train"]:
        train(argv[1:])
        return 0
    if argv[:1] == ["study"] and len(argv) == 4:
        study(argv[1], argv[2], argv[3])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
