"""Train one trial: one PolicyArch on one environment, evaluated along the way.

Leans on stable-baselines3 for everything RL: PPO (SAC for continuous control), `DummyVecEnv`
(one process per trial; the executor parallelises trials, not environments), `VecNormalize`
(observation normalisation, and reward normalisation where rl-zoo3 uses it), `VecFrameStack`
(observation history when arch.history > 1) and callbacks. The networks come from
`robonas.search.sb3_policy`; hyperparameters from `robonas/data/ppo_defaults.toml` (rl-zoo3's tuned
values, see the comments there), overridden by `TrainSpec.hyperparams`.

Wrapper order: DummyVecEnv -> VecNormalize -> VecFrameStack, as rl-zoo3 does. Each observation is
normalised on its own (statistics of size obs_dim in `obs_norm.npz`) and then stacked oldest
first, with zeros (the normalised mean) filling the history after a reset; `spaces.json`
records this so the exported policy can replay it.

The evaluation loop is written here rather than using SB3's `evaluate_policy` because it must
seed each episode (eval_seed + i, one environment per episode, all run side by side) and share the
training normalisation statistics frozen at the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import io
import json
import math
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import numpy as np
from numpy.typing import NDArray

from device_agents.atomic import atomic_writer
from robonas.errors import ConfigError
from robonas.search.curves import asymptote, auc_normalised
from robonas.search.pruning import Reporter, ReportSpec
from robonas.space import PolicyArch

if TYPE_CHECKING:
    import gymnasium as gym
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import VecEnv, VecNormalize
    from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs

ALGOS = ("ppo", "sac")
# Keys of the defaults table that are not algorithm constructor arguments.
_EXTRA_KEYS = ("n_envs", "normalize_reward", "policy_kwargs")
# Arguments train_trial sets itself; a hyperparameter table may not.
_RESERVED = (
    "self",
    "policy",
    "env",
    "seed",
    "verbose",
    "device",
    "_init_setup_model",
    "tensorboard_log",
    "policy_kwargs",
)
_SCHEDULED = ("learning_rate", "clip_range", "clip_range_vf")
CLIP_OBS = 10.0  # VecNormalize's default, recorded in obs_norm.npz


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    """Everything one trial needs; picklable, so it can be sent to a worker process."""

    env_id: str
    arch: PolicyArch
    total_steps: int
    out_dir: str | Path
    return_lo: float  # return mapped to 0 by the AUC normalisation
    return_hi: float  # return mapped to 1
    return_max: float | None = None  # the most an episode can pay; caps the asymptote
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)
    algo: str = "ppo"
    hyperparams: Mapping[str, Any] = field(default_factory=dict)
    n_envs: int | None = None  # None: the defaults table's value
    checkpoints: int = 5
    eval_episodes: int = 5
    eval_seed: int = 1000
    randomization: Mapping[str, Any] | None = None  # only for the robustness figure
    train_randomization: Mapping[str, Any] | None = None  # ranges the training envs draw from
    seed: int = 0
    # Episodes at the checkpoints before the last third of the curve (None: eval_episodes). The
    # asymptote leans on the last third, so only the early points are evaluated more coarsely.
    early_eval_episodes: int | None = None
    report: ReportSpec | None = None  # live checkpoints to the store, and pruning at rungs
    # the random policy's mean return on the evaluation seeds, when already known (it depends on
    # the env and the seeds only, so a search measures it once per study)
    random_return: float | None = None
    tensorboard: bool = False  # SB3's TensorBoard logs in out_dir/tensorboard

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ConfigError(f"algo: {self.algo!r} is not one of {', '.join(ALGOS)}")
        for name in ("total_steps", "checkpoints", "eval_episodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}: {value!r} is not a positive integer")
        early = self.early_eval_episodes
        if early is not None and (not isinstance(early, int) or isinstance(early, bool) or early < 1):
            raise ConfigError(f"early_eval_episodes: {early!r} is not a positive integer or None")
        if self.n_envs is not None and (not isinstance(self.n_envs, int) or self.n_envs < 1):
            raise ConfigError(f"n_envs: {self.n_envs!r} is not a positive integer or None")
        if not (math.isfinite(self.return_lo) and math.isfinite(self.return_hi)) or (
            self.return_hi <= self.return_lo
        ):
            raise ConfigError(
                f"return_lo/return_hi: {self.return_lo!r}/{self.return_hi!r}; need finite lo < hi"
            )


@dataclass
class TrialOutcome:
    env_id: str
    algo: str
    arch_id: str
    curve: list[tuple[int, float, float]]  # (env_steps, mean_return, std_return)
    auc: float
    asymptotic_return: float
    asymptotic_std: float
    robustness_return: float | None  # None when the spec has no randomization
    random_return: float
    env_steps: int
    wall_s: float  # the whole trial, evaluations included
    steps_per_s: float  # env_steps / wall_s
    eval_s: float  # of wall_s, time spent evaluating
    artifacts: dict[str, str]  # name -> path: actor, obs_norm, sb3_model, spaces
    pruned_at: int | None = None  # the rung (checkpoint ordinal) where the trial was stopped
    eval_steps: int = 0  # env steps spent on evaluation episodes (not counted in env_steps)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["curve"] = [list(point) for point in self.curve]
        return d


# --- hyperparameters ----------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _defaults_table() -> dict[str, Any]:
    text = resources.files("robonas.data").joinpath("ppo_defaults.toml").read_text()
    return tomllib.loads(text)


def _algo_class(algo: str) -> type[BaseAlgorithm]:
    from stable_baselines3 import PPO, SAC

    classes: dict[str, type[BaseAlgorithm]] = {"ppo": PPO, "sac": SAC}
    return classes[algo]


def _schedule(key: str, value: Any) -> Any:
    if isinstance(value, str) and value.startswith("lin_"):
        from stable_baselines3.common.utils import LinearSchedule

        try:
            start = float(value[4:])
        except ValueError as e:
            raise ConfigError(f"hyperparams.{key}: {value!r} is not 'lin_<number>'") from e
        return LinearSchedule(start, 0.0, 1.0)  # progress_remaining 1 -> 0 maps start -> 0
    return value


def resolve_hyperparams(algo: str, env_id: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults table ([algo.default] <- [algo."env_id"]) <- overrides, checked against the
    algorithm's constructor; 'lin_<x>' strings are still strings here (see `_schedule`)."""
    if algo not in ALGOS:
        raise ConfigError(f"algo: {algo!r} is not one of {', '.join(ALGOS)}")
    table = _defaults_table().get(algo, {})
    merged: dict[str, Any] = {"policy_kwargs": {}}
    for layer in (table.get("default", {}), table.get(env_id, {}), dict(overrides or {})):
        for key, value in layer.items():
            if key == "policy_kwargs":
                merged["policy_kwargs"] = {**merged["policy_kwargs"], **dict(value)}
            else:
                merged[key] = value
    valid = set(inspect.signature(_algo_class(algo).__init__).parameters) - set(_RESERVED)
    valid |= set(_EXTRA_KEYS)
    for key in merged:
        if key not in valid:
            raise ConfigError(
                f"hyperparams: {key!r} is not a {algo} hyperparameter; valid: {', '.join(sorted(valid))}"
            )
    return merged


# Value rules for the trainer settings a search usually varies: (kind, low, high, low_open).
# "int": an integer >= low; "float": a number in [low, high] (low excluded when low_open).
# Settings not listed here are checked by the algorithm itself when a trial builds it.
_SETTING_RULES: dict[str, tuple[str, float, float, bool]] = {
    "learning_rate": ("float", 0.0, math.inf, True),
    "n_steps": ("int", 2, math.inf, False),
    "batch_size": ("int", 2, math.inf, False),
    "n_epochs": ("int", 1, math.inf, False),
    "n_envs": ("int", 1, math.inf, False),
    "gamma": ("float", 0.0, 1.0, True),
    "gae_lambda": ("float", 0.0, 1.0, False),
    "ent_coef": ("float", 0.0, math.inf, False),
    "clip_range": ("float", 0.0, math.inf, True),
    "vf_coef": ("float", 0.0, math.inf, False),
    "max_grad_norm": ("float", 0.0, math.inf, True),
    "buffer_size": ("int", 1, math.inf, False),
    "learning_starts": ("int", 0, math.inf, False),
    "tau": ("float", 0.0, 1.0, True),
    "train_freq": ("int", 1, math.inf, False),
    "gradient_steps": ("int", 1, math.inf, False),
    "target_entropy": ("float", -math.inf, math.inf, False),
}


def _check_setting(key: str, value: Any) -> None:
    rule = _SETTING_RULES.get(key)
    if rule is None or isinstance(value, bool):
        if isinstance(value, bool) and rule is not None:
            raise ConfigError(f"space.training.{key}: {value!r} is not a number")
        return
    kind, low, high, low_open = rule
    if isinstance(value, str):
        # schedules and SB3's own words: "lin_<x>" for scheduled settings, "auto[_<x>]" for SAC's
        # entropy settings; anything else is for the algorithm to judge
        if key in _SCHEDULED and value.startswith("lin_"):
            _schedule(key, value)
            return
        if key in ("ent_coef", "target_entropy") and value.startswith("auto"):
            return
        raise ConfigError(f"space.training.{key}: {value!r} is not a number")
    if kind == "int" and not (isinstance(value, int) and value >= low):
        raise ConfigError(f"space.training.{key}: {value!r} is not an integer >= {low:g}")
    below = value <= low if low_open else value < low
    if kind == "float" and (below or value > high or not math.isfinite(value)):
        lo_bracket = "(" if low_open else "["
        raise ConfigError(f"space.training.{key}: {value!r} is outside {lo_bracket}{low:g}, {high:g}]")


def check_searched_settings(algo: str, env_id: str, choices: Mapping[str, Any]) -> None:
    """One ConfigError line for a `[space.training]` table that cannot work: a setting the
    algorithm does not take, or a choice outside its valid range."""
    for key, values in choices.items():
        if key == "policy_kwargs":
            raise ConfigError("space.training.policy_kwargs: the network is searched in [space], not here")
        listed = list(values) if isinstance(values, (list, tuple)) else [values]
        if not listed:
            raise ConfigError(f"space.training.{key}: the list of choices is empty")
        for value in listed:
            _check_setting(key, value)
        # a setting the algorithm does not take fails here, naming the valid ones
        resolve_hyperparams(algo, env_id, {key: listed[0]})


def tuned_settings(algo: str, env_id: str, names: Any) -> dict[str, Any]:
    """The tuned value of each named trainer setting (the defaults table's), where it has one."""
    hp = resolve_hyperparams(algo, env_id)
    return {name: hp[name] for name in names if name in hp}


# --- environments -------------------------------------------------------------------------------
def make_env(
    env_id: str, env_kwargs: Mapping[str, Any] | None = None, randomization: Mapping[str, Any] | None = None
) -> gym.Env[Any, Any]:
    """One gymnasium env: `sim.make` for sim/* ids (the only ones that can be randomised)."""
    env_kwargs = dict(env_kwargs or {})
    if env_id.startswith("sim/"):
        import sim

        try:
            return sim.make(
                env_id, randomization=dict(randomization) if randomization else None, **env_kwargs
            )
        except sim.SimError as e:
            raise ConfigError(f"environment {env_id!r}: {e}") from e
    if randomization:
        raise ConfigError(f"randomization: only sim/* environments can be randomised, not {env_id!r}")
    import gymnasium as gym

    try:
        return gym.make(env_id, **env_kwargs)
    except gym.error.Error as e:
        raise ConfigError(f"env_id: cannot make {env_id!r}: {e}") from e


def _env_factory(
    env_id: str, env_kwargs: Mapping[str, Any], randomization: Mapping[str, Any] | None, monitor: bool
) -> Callable[[], gym.Env[Any, Any]]:
    def make() -> gym.Env[Any, Any]:
        env = make_env(env_id, env_kwargs, randomization)
        if monitor:
            from stable_baselines3.common.monitor import Monitor

            env = Monitor(env)
        return env

    return make


def _vec_env(
    spec: TrainSpec,
    n: int,
    randomization: Mapping[str, Any] | None = None,
    *,
    training: bool,
    normalize_reward: bool = False,
    gamma: float = 0.99,
) -> VecEnv:
    from stable_baselines3.common.vec_env import DummyVecEnv, VecFrameStack, VecNormalize

    venv: VecEnv = DummyVecEnv([_env_factory(spec.env_id, spec.env_kwargs, randomization, training)] * n)
    venv = VecNormalize(
        venv,
        training=training,
        norm_obs=True,
        norm_reward=training and normalize_reward,
        gamma=gamma,
        clip_obs=CLIP_OBS,
    )
    if spec.arch.history > 1:
        venv = VecFrameStack(venv, spec.arch.history)
    return venv


def _find_normalize(venv: VecEnv) -> VecNormalize:
    from stable_baselines3.common.vec_env import VecEnvWrapper, VecNormalize

    while not isinstance(venv, VecNormalize):
        assert isinstance(venv, VecEnvWrapper), "every env here is built by _vec_env, with a VecNormalize"
        venv = venv.venv
    return venv


def _check_spaces(arch: PolicyArch, obs_space: gym.Space[Any], act_space: gym.Space[Any], algo: str) -> bool:
    """True when the action space is discrete; raises if the arch does not fit the env."""
    from gymnasium import spaces

    if not isinstance(obs_space, spaces.Box) or len(obs_space.shape) != 1:
        raise ConfigError(f"observation space {obs_space} is not a flat Box")
    if obs_space.shape[0] != arch.obs_dim:
        raise ConfigError(f"arch.obs_dim {arch.obs_dim} != environment obs size {obs_space.shape[0]}")
    if isinstance(act_space, spaces.Discrete):
        if algo == "sac":
            raise ConfigError("algo 'sac' needs a continuous (Box) action space; use 'ppo'")
        act_dim, discrete = int(act_space.n), True
    elif isinstance(act_space, spaces.Box) and len(act_space.shape) == 1:
        act_dim, discrete = int(act_space.shape[0]), False
    else:
        raise ConfigError(f"action space {act_space} is neither Discrete nor a flat Box")
    if act_dim != arch.act_dim:
        raise ConfigError(f"arch.act_dim {arch.act_dim} != environment action size {act_dim}")
    return discrete


# --- evaluation ---------------------------------------------------------------------------------
def _flat(obs: VecEnvObs) -> NDArray[Any]:
    # _check_spaces admits only flat Box observations: never a dict or tuple of arrays
    assert isinstance(obs, np.ndarray), f"observation batch is a {type(obs).__name__}, not an array"
    return obs


def _run_episodes(
    venv: VecEnv, act: Callable[[NDArray[Any]], NDArray[Any]], seed: int
) -> tuple[NDArray[np.float64], int]:
    """First episode of each sub-env (seeded seed, seed+1, ...): their undiscounted returns, and
    the env steps those episodes took."""
    venv.seed(seed)
    obs = _flat(venv.reset())
    n = venv.num_envs
    returns, done = np.zeros(n), np.zeros(n, dtype=bool)
    steps = 0
    while not done.all():
        next_obs, rewards, dones, _ = venv.step(act(obs))
        steps += int((~done).sum())
        obs = _flat(next_obs)
        returns += np.where(done, 0.0, rewards)  # eval VecNormalize leaves rewards raw
        done |= dones
    return returns, steps


class _Evaluator:
    """Deterministic policy on fixed seeds, with the training statistics frozen at call time."""

    def __init__(
        self,
        spec: TrainSpec,
        train_env: VecEnv,
        randomization: Mapping[str, Any] | None = None,
        episodes: int | None = None,
    ) -> None:
        self.spec, self.train_env = spec, train_env
        self.venv = _vec_env(spec, episodes or spec.eval_episodes, randomization, training=False)
        self.seconds = 0.0
        self.steps = 0

    def __call__(self, model: BaseAlgorithm) -> NDArray[np.float64]:
        t0 = time.perf_counter()
        _find_normalize(self.venv).obs_rms = copy.deepcopy(_find_normalize(self.train_env).obs_rms)
        returns, steps = _run_episodes(
            self.venv, lambda obs: model.predict(obs, deterministic=True)[0], self.spec.eval_seed
        )
        self.seconds += time.perf_counter() - t0
        self.steps += steps
        return returns

    def close(self) -> None:
        self.venv.close()


def random_returns(spec: TrainSpec) -> NDArray[np.float64]:
    """Uniform random actions on the evaluation seeds (the action space seeded per episode)."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = DummyVecEnv([_env_factory(spec.env_id, spec.env_kwargs, None, False)] * spec.eval_episodes)
    for i, env in enumerate(venv.envs):
        env.action_space.seed(spec.eval_seed + i)
    try:
        return _run_episodes(
            venv,
            lambda obs: np.array([env.action_space.sample() for env in venv.envs]),
            spec.eval_seed,
        )[0]
    finally:
        venv.close()


def _checkpoint_callback(
    thresholds: list[int], evaluate: Callable[[], bool], progress: Callable[[int], None] | None
) -> BaseCallback:
    """Evaluate at each threshold; `evaluate` returning False stops training (pruned)."""
    from stable_baselines3.common.callbacks import BaseCallback

    class Checkpoints(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.next = 0

        def _on_step(self) -> bool:
            if self.next < len(thresholds) and self.num_timesteps >= thresholds[self.next]:
                keep_going = evaluate()
                # one evaluation even if a vectorised step crossed several thresholds
                while self.next < len(thresholds) and self.num_timesteps >= thresholds[self.next]:
                    self.next += 1
                return keep_going
            return True

        def _on_rollout_end(self) -> None:
            if progress is not None:
                progress(self.num_timesteps)

    return Checkpoints()


# --- artifacts ----------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> str:
    """Never a half-written artifact: see device_agents.atomic."""
    with atomic_writer(path) as f:
        write(f)
    return str(path)


def _bounds(values: NDArray[Any]) -> list[float | None]:
    # JSON has no infinity: an unbounded side is null
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, dtype=float).ravel()]


def _spaces_doc(spec: TrainSpec, obs_space: gym.Space[Any], act_space: gym.Space[Any]) -> dict[str, Any]:
    from gymnasium import spaces

    # _check_spaces let through only a flat Box observation and a Discrete or flat Box action
    assert isinstance(obs_space, spaces.Box) and isinstance(act_space, (spaces.Discrete, spaces.Box))
    action: dict[str, Any]
    if isinstance(act_space, spaces.Discrete):
        action = {"discrete": True, "n": int(act_space.n), "transform": "argmax"}
    else:
        action = {
            "discrete": False,
            "shape": list(act_space.shape),
            "low": _bounds(act_space.low),
            "high": _bounds(act_space.high),
            # PPO: the head's output is the action, clipped to the bounds. SAC: tanh, then
            # rescaled from [-1, 1] to [low, high].
            "transform": "clip" if spec.algo == "ppo" else "tanh_rescale",
        }
    return {
        "env_id": spec.env_id,
        "observation": {
            "shape": list(obs_space.shape),
            "low": _bounds(obs_space.low),
            "high": _bounds(obs_space.high),
        },
        "action": action,
        "history": spec.arch.history,
        "history_order": "oldest_first",
        "history_padding": "zeros_after_normalisation",
    }


def _save_artifacts(
    spec: TrainSpec,
    model: BaseAlgorithm,
    train_env: VecEnv,
    obs_space: gym.Space[Any],
    act_space: gym.Space[Any],
) -> dict[str, str]:
    import torch
    from stable_baselines3.common.running_mean_std import RunningMeanStd

    from robonas.search.sb3_policy import ArchActorCriticPolicy, ArchSACPolicy

    policy = model.policy
    assert isinstance(policy, (ArchActorCriticPolicy, ArchSACPolicy)), "train_trial builds only these"

    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rms = _find_normalize(train_env)
    obs_rms = rms.obs_rms
    assert isinstance(obs_rms, RunningMeanStd), "a Box observation has one set of statistics"
    paths = {
        "actor": _atomic_write(out / "actor.pt", lambda f: torch.save(policy.actor_state_dict(), f)),
        "obs_norm": _atomic_write(
            out / "obs_norm.npz",
            lambda f: np.savez(
                f,
                mean=obs_rms.mean,
                var=obs_rms.var,
                count=obs_rms.count,
                clip_obs=np.float64(rms.clip_obs),
                epsilon=np.float64(rms.epsilon),
            ),
        ),
        # atomic_writer's file is an os.fdopen(..., "wb"), a BufferedWriter, which SB3 takes
        "sb3_model": _atomic_write(out / "sb3_model.zip", lambda f: model.save(cast(io.BufferedIOBase, f))),
        "spaces": _atomic_write(
            out / "spaces.json",
            lambda f: f.write(json.dumps(_spaces_doc(spec, obs_space, act_space), indent=2).encode()),
        ),
    }
    return paths


# --- the trial ----------------------------------------------------------------------------------
def train_trial(spec: TrainSpec, progress: Callable[[int], None] | None = None) -> TrialOutcome:
    """Train, evaluate at `spec.checkpoints` evenly spaced points, save artifacts, summarise.

    `progress(env_steps)` is called after every rollout (PPO) or collection step (SAC)."""
    import torch

    from robonas.search.sb3_policy import ArchActorCriticPolicy, ArchSACPolicy

    t_start = time.perf_counter()
    torch.set_num_threads(1)  # trials run side by side on few cores
    hp = resolve_hyperparams(spec.algo, spec.env_id, spec.hyperparams)
    n_envs = spec.n_envs or int(hp.get("n_envs", 1))
    hp.pop("n_envs", None)
    normalize_reward = bool(hp.pop("normalize_reward", False))
    policy_kwargs = {**hp.pop("policy_kwargs"), "arch": spec.arch}
    hp = {key: _schedule(key, value) if key in _SCHEDULED else value for key, value in hp.items()}

    with contextlib.ExitStack() as envs:  # every env is closed, whatever fails
        train_env = _vec_env(
            spec,
            n_envs,
            spec.train_randomization,
            training=True,
            normalize_reward=normalize_reward,
            gamma=float(hp.get("gamma", 0.99)),
        )
        envs.callback(train_env.close)
        obs_space = _find_normalize(train_env).venv.observation_space  # before frame stacking
        act_space = train_env.action_space
        _check_spaces(spec.arch, obs_space, act_space, spec.algo)
        evaluator = _Evaluator(spec, train_env)
        envs.callback(evaluator.close)
        # built before training so that a bad randomization fails the trial before it costs anything
        robust_eval = None
        if spec.randomization:
            robust_eval = _Evaluator(spec, train_env, spec.randomization)
            envs.callback(robust_eval.close)
        policy = ArchActorCriticPolicy if spec.algo == "ppo" else ArchSACPolicy
        try:
            model = _algo_class(spec.algo)(
                policy,
                train_env,
                policy_kwargs=policy_kwargs,
                seed=spec.seed,
                device="cpu",
                verbose=0,
                tensorboard_log=str(Path(spec.out_dir) / "tensorboard") if spec.tensorboard else None,
                **hp,
            )
        except (TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"hyperparams for {spec.algo} on {spec.env_id}: {e}") from e

        curve: list[tuple[int, float, float]] = []
        thresholds = [math.ceil(spec.total_steps * i / spec.checkpoints) for i in range(1, spec.checkpoints)]
        # checkpoints before the last third get the coarse evaluation (the tail decides the asymptote)
        n_early = spec.checkpoints - max(2, math.ceil(spec.checkpoints / 3))
        early_evaluator = evaluator
        if spec.early_eval_episodes is not None and spec.early_eval_episodes < spec.eval_episodes:
            early_evaluator = _Evaluator(spec, train_env, episodes=spec.early_eval_episodes)
            envs.callback(early_evaluator.close)
        reporter = Reporter(spec.report) if spec.report is not None else None
        if reporter is not None:
            envs.callback(reporter.close)
        pruned_at: int | None = None

        def evaluate() -> bool:
            nonlocal pruned_at
            returns = (early_evaluator if len(curve) < n_early else evaluator)(model)
            curve.append((int(model.num_timesteps), float(returns.mean()), float(returns.std())))
            if reporter is not None and not reporter.report(curve):
                pruned_at = len(curve)
                return False
            return True

        model.learn(
            total_timesteps=spec.total_steps, callback=_checkpoint_callback(thresholds, evaluate, progress)
        )
        if pruned_at is None:
            if curve and curve[-1][0] >= model.num_timesteps:
                curve.pop()  # evaluated mid-way through the final update: the final policy replaces it
            evaluate()
        env_steps = int(model.num_timesteps)
        evaluators = {id(e): e for e in (evaluator, early_evaluator)}.values()
        eval_s = sum(e.seconds for e in evaluators)
        eval_steps = sum(e.steps for e in evaluators)

        robustness = None
        if robust_eval is not None and pruned_at is None:  # a pruned trial is not scored for robustness
            robustness = float(robust_eval(model).mean())
            eval_s += robust_eval.seconds
            eval_steps += robust_eval.steps
        random_return = spec.random_return
        if random_return is None:  # the search passes it: it is the same for every trial
            t_random = time.perf_counter()
            random_return = float(random_returns(spec).mean())
            eval_s += time.perf_counter() - t_random

        artifacts = _save_artifacts(spec, model, train_env, obs_space, act_space)

    steps = [point[0] for point in curve]
    means = [point[1] for point in curve]
    asym, asym_std = asymptote(steps, means, ceiling=spec.return_max)
    wall = time.perf_counter() - t_start
    return TrialOutcome(
        env_id=spec.env_id,
        algo=spec.algo,
        arch_id=spec.arch.arch_id,
        curve=curve,
        auc=auc_normalised(steps, means, spec.return_lo, spec.return_hi),
        asymptotic_return=asym,
        asymptotic_std=asym_std,
        robustness_return=robustness,
        random_return=random_return,
        env_steps=env_steps,
        wall_s=wall,
        steps_per_s=env_steps / wall,
        eval_s=eval_s,
        artifacts=artifacts,
        pruned_at=pruned_at,
        eval_steps=eval_steps,
    )
