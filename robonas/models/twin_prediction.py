"""A candidate's returns in a robot's twin: episodes drawn over the twin's uncertainty.

A robot's identified twin (`robonas.models.twin_identification.TwinFit`) is not one simulator but
a posterior over simulators. `draw_episode_params(fit, n, seed)` turns it into `n` episodes'
parameters, `twin_returns(actor, fit, episodes, seed)` runs the candidate's deterministic policy
once in each and returns the undiscounted returns. What the residual model across robots
(`robonas.models.fleet_residual`) takes is their summary, `twin_stats(...)`, a `ReturnStats`.

How each parameter is drawn (per episode):
- identifiable dynamics, actuation latency and observation noise: a normal around `best` with the
  fit's `std`, truncated to the fit's [lo, hi]; the scale factors the fit works with in log space
  (`twin_identification.LOG_PARAMS`) are drawn in log space (std / best there, the inverse of the
  fit's delta method), so they stay positive and their interval is the fit's;
- non-identifiable ones: uniform over [lo, hi] in the fit's coordinates (log-uniform for the scale
  factors), not `best`. "Not identifiable" means every value in the range replays the robot's
  records about as well; a candidate that the recording policy did not reveal (one that leans on
  friction the recording policy never met) may still depend on it, so the twin's prediction
  averages over the range and shows the dependence in its spread, instead of pretending to a
  value the data do not give. The exception is a gauge parameter: with `per_unit_mass` the other
  dynamics are per unit mass and the twin's mass_scale is fixed at `best` (1), since scaling it
  without them would change the motion, while scaling all together changes nothing;
- the whole-step action delay: `action_delay.steps` when the fit is `certain`; otherwise the
  runner-up with its posterior probability 1 / (1 + exp(log_lr)) (equal prior odds; log_lr is the
  fit's log-likelihood ratio of the best over the runner-up), the other dynamics drawn as above
  (the fit does not keep the runner-up's refitted dynamics).
Draws are stratified (a Latin hypercube over the parameters, delay included) so that ten episodes
cover each parameter's range evenly and the delay mixture gets its share of episodes up to one;
they depend only on (fit, episodes, seed), never on the candidate, so every candidate meets the same
episodes on a robot (common random numbers: differences between candidates are not sampling noise).

Running. The episodes run side by side, one sim env each, built with `sim.make(env_id,
randomization=...)` with degenerate (x, x) ranges and the actuation latency set on the env, as
`sim.reality.make_reality` builds a reality profile; each step calls the policy once on the batch
of all episodes' observations (one torch call per step instead of one per episode and step).
Episode k resets with its own seed from the run's seed. About 150 us of simulation per episode
and step plus one policy call per step: ten 500-step cart-pole episodes of a small torch MLP take
about 0.8 s on a 2-core machine.

The policy is a `Controller` (raw observations in, env actions out, for a batch of episodes) or a
trained trial's `DeployableActor` (`robonas.export.trial_export`), which `ActorController` wraps:
it keeps each episode's observation history as the robot does (oldest frame first, padded after
a reset with the normalisation mean) and turns the deterministic head's output into env actions.

Importing this module loads neither torch nor pybullet: they load when a policy runs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray
from scipy.special import ndtr, ndtri

from robonas.errors import RobonasError
from robonas.models.fleet_residual import ReturnStats
from robonas.models.twin_identification import LOG_PARAMS, PARAM_NAMES, ParamFit, TwinFit

if TYPE_CHECKING:
    import gymnasium

    from robonas.export.trial_export import DeployableActor

FloatArray = NDArray[np.float64]
DEFAULT_EPISODES = 10
_GAUGE = "mass_scale"
_SEED_SALT = 0x7717  # keeps these streams apart from other users of the same integer seed
_LATENCY_CAP = 0.999  # the env takes latencies in [0, dt); like the sim twin's HOLD_CAP


@dataclass(frozen=True)
class EpisodeParams:
    """One twin episode's simulator: the fields of a reality profile (`sim.reality`)."""

    mass_scale: float
    friction_scale: float
    damping: float
    motor_gain: float
    obs_noise_std: float
    action_delay: int
    actuation_latency_s: float

    def randomization(self) -> dict[str, tuple[float, float] | tuple[int, int]]:
        """The episode as a degenerate randomisation config (every range one value), for `sim.make`."""
        return {
            "mass_scale": (self.mass_scale, self.mass_scale),
            "friction_scale": (self.friction_scale, self.friction_scale),
            "damping": (self.damping, self.damping),
            "motor_gain": (self.motor_gain, self.motor_gain),
            "obs_noise_std": (self.obs_noise_std, self.obs_noise_std),
            "action_delay": (self.action_delay, self.action_delay),
        }

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


# -- drawing episodes ------------------------------------------------------------------------------


def _seeds(seed: int) -> np.random.SeedSequence:
    if not (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0):
        raise RobonasError(f"seed={seed!r} must be a whole number >= 0")
    return np.random.SeedSequence([int(seed), _SEED_SALT])


def _check_episodes(episodes: int) -> int:
    if not (isinstance(episodes, (int, np.integer)) and not isinstance(episodes, bool) and episodes >= 1):
        raise RobonasError(f"episodes={episodes!r} must be a whole number >= 1")
    return int(episodes)


def _latin_hypercube(rng: np.random.Generator, n: int, dims: int) -> FloatArray:
    """(n, dims) uniforms, one in each of the n strata of [0, 1) per dimension, strata shuffled."""
    u = np.empty((n, dims))
    for d in range(dims):
        u[:, d] = (rng.permutation(n) + rng.random(n)) / n
    return u


def _truncated_normal(u: FloatArray, loc: float, scale: float, lo: float, hi: float) -> FloatArray:
    """Inverse-CDF draws of N(loc, scale) truncated to [lo, hi] at uniforms u."""
    if not (scale > 0 and math.isfinite(scale)) or hi <= lo:
        return np.full_like(u, min(max(loc, lo), hi))
    a, b = ndtr((lo - loc) / scale), ndtr((hi - loc) / scale)
    if b - a < 1e-12:  # the interval lies far in one tail: its nearer end
        return np.full_like(u, lo if loc < lo else hi)
    x = loc + scale * ndtri(a + u * (b - a))
    return np.clip(x, lo, hi)


def _draw_param(name: str, p: ParamFit, u: FloatArray, per_unit_mass: bool) -> FloatArray:
    if name == _GAUGE and per_unit_mass:
        return np.full_like(u, p.best)
    log = name in LOG_PARAMS and p.lo > 0 and p.best > 0
    to_z, from_z = (np.log, np.exp) if log else (np.asarray, np.asarray)
    lo, hi = float(to_z(p.lo)), float(to_z(p.hi))
    if not p.identifiable or p.std is None:
        return np.clip(from_z(lo + u * (hi - lo)), p.lo, p.hi)
    best = float(to_z(p.best))
    std = p.std / p.best if log else p.std
    return np.clip(from_z(_truncated_normal(u, best, std, lo, hi)), p.lo, p.hi)


def delay_probabilities(fit: TwinFit) -> dict[int, float]:
    """Delay (steps) -> the probability episodes use it: the best alone when `certain`, else the
    best and the runner-up by their likelihood ratio (see the module docstring)."""
    d = fit.action_delay
    if d.certain or d.runner_up is None or d.log_lr is None:
        return {d.steps: 1.0}
    p_runner_up = 1.0 / (1.0 + math.exp(min(max(d.log_lr, -700.0), 700.0)))
    return {d.steps: 1.0 - p_runner_up, d.runner_up: p_runner_up}


def draw_episode_params(fit: TwinFit, episodes: int, seed: int = 0) -> list[EpisodeParams]:
    """`episodes` draws from the twin's posterior (see the module docstring); the same for the same
    (fit, episodes, seed)."""
    n = _check_episodes(episodes)
    missing = set(PARAM_NAMES) - set(fit.params)
    if missing:
        raise RobonasError(f"twin fit lacks parameters {sorted(missing)}")
    rng = np.random.default_rng(_seeds(seed).spawn(1)[0])
    u = _latin_hypercube(rng, n, len(PARAM_NAMES) + 1)
    values = {
        name: _draw_param(name, fit.params[name], u[:, i], fit.per_unit_mass)
        for i, name in enumerate(PARAM_NAMES)
    }
    probs = delay_probabilities(fit)
    best = fit.action_delay.steps
    other = next((k for k in probs if k != best), best)
    delays = np.where(u[:, -1] < probs[best], best, other)
    return [
        EpisodeParams(
            mass_scale=float(values["mass_scale"][k]),
            friction_scale=float(values["friction_scale"][k]),
            damping=float(max(0.0, values["damping"][k])),
            motor_gain=float(values["motor_gain"][k]),
            obs_noise_std=float(max(0.0, values["obs_noise_std"][k])),
            action_delay=int(delays[k]),
            actuation_latency_s=float(max(0.0, values["actuation_latency_s"][k])),
        )
        for k in range(n)
    ]


def episode_seeds(episodes: int, seed: int = 0) -> list[int]:
    """The env reset seed of each of `episodes` episodes of a run seeded `seed`."""
    n = _check_episodes(episodes)
    return [int(s) for s in _seeds(seed).generate_state(n)]


def make_episode_env(env_id: str, params: EpisodeParams, **kwargs: Any) -> gymnasium.Env:
    """The sim env of one twin episode (as `sim.reality.make_reality` builds a profile's);
    kwargs go to `sim.make` (control_hz, max_episode_steps, ...)."""
    import sim
    from sim.envs.base import substep_control

    try:
        env = sim.make(env_id, randomization=params.randomization(), **kwargs)
        control = substep_control(env)
        control.actuation_latency_s = min(params.actuation_latency_s, _LATENCY_CAP * control.dt)
    except sim.SimError as e:
        raise RobonasError(f"twin episode on {env_id}: {e}") from e
    return env


# -- the policy ------------------------------------------------------------------------------------


@runtime_checkable
class Controller(Protocol):
    """A deterministic policy for a batch of episodes run side by side."""

    def reset(self, n: int) -> None:
        """n episodes start (clear any per-episode state, e.g. an observation history)."""

    def __call__(self, obs: FloatArray) -> FloatArray:
        """Raw observations (n, obs_dim) -> env actions (n, act_dim), or (n,) action indices."""


class ActorController:
    """A trained trial's `DeployableActor` as a `Controller`: per-episode history kept as the robot
    keeps it, one batched torch call per step, the head's output turned into env actions."""

    def __init__(self, actor: DeployableActor) -> None:
        self.actor = actor
        self.history = actor.arch.history
        self.obs_dim = actor.arch.obs_dim
        self._frames = np.zeros((0, actor.arch.input_dim), np.float32)
        action = actor.spaces["action"]
        self.discrete = bool(action["discrete"])
        self.n_actions = int(action.get("n", 0)) if self.discrete else 0

    def reset(self, n: int) -> None:
        self._frames = np.tile(np.tile(self.actor.frame_mean, self.history), (n, 1)).astype(np.float32)

    def __call__(self, obs: FloatArray) -> FloatArray:
        import torch

        x = np.asarray(obs, np.float32).reshape(self._frames.shape[0], self.obs_dim)
        self._frames = np.concatenate([self._frames[:, self.obs_dim :], x], axis=1)
        with torch.no_grad():
            y = self.actor(torch.as_tensor(self._frames)).numpy().astype(np.float64)
        if self.discrete:
            return np.clip(np.rint(y[:, 0]), 0, self.n_actions - 1)
        return y


def as_controller(actor: Controller | DeployableActor) -> Controller:
    """`actor` as a `Controller` (a `DeployableActor` is wrapped in `ActorController`)."""
    if isinstance(actor, Controller):
        return actor
    if hasattr(actor, "arch") and hasattr(actor, "spaces") and hasattr(actor, "frame_mean"):
        return ActorController(actor)
    raise RobonasError(f"{type(actor).__name__} is neither a Controller nor a DeployableActor")


def _env_action(env: gymnasium.Env, action: FloatArray) -> Any:
    import gymnasium

    space = env.action_space
    if isinstance(space, gymnasium.spaces.Discrete):
        return int(np.asarray(action).reshape(-1)[0])
    shape = space.shape if space.shape is not None else (-1,)
    return np.asarray(action, np.float32).reshape(shape)


# -- running ---------------------------------------------------------------------------------------


def episode_returns(
    actor: Controller | DeployableActor,
    env_id: str,
    params: Sequence[EpisodeParams],
    seeds: Sequence[int],
    env_kwargs: Mapping[str, Any] | None = None,
) -> FloatArray:
    """Run one episode per (params, seed) side by side with the deterministic policy; their
    undiscounted returns, in order."""
    if len(params) != len(seeds):
        raise RobonasError(f"{len(params)} episode parameter sets but {len(seeds)} seeds")
    kwargs = dict(env_kwargs or {})
    makers = [functools.partial(make_episode_env, env_id, p, **kwargs) for p in params]
    return batched_returns(actor, makers, seeds)


def batched_returns(
    actor: Controller | DeployableActor,
    make_envs: Sequence[Callable[[], gymnasium.Env]],
    seeds: Sequence[int],
) -> FloatArray:
    """One episode in each env `make_envs` builds, reset with its seed, all side by side with one
    policy call per step; their undiscounted returns, in order. Every env is closed."""
    controller = as_controller(actor)
    n = len(make_envs)
    if n == 0:
        return np.zeros(0)
    envs: list[gymnasium.Env] = []
    try:
        for make in make_envs:
            envs.append(make())
        first = [
            np.asarray(env.reset(seed=int(s))[0], np.float64).ravel()
            for env, s in zip(envs, seeds, strict=True)
        ]
        obs = np.stack(first)
        returns = np.zeros(n)
        alive = np.ones(n, dtype=bool)
        controller.reset(n)
        while alive.any():
            actions = np.asarray(controller(obs))
            if actions.shape[0] != n:
                raise RobonasError(f"the policy returned {actions.shape[0]} actions for {n} episodes")
            for k in np.flatnonzero(alive):
                o, reward, terminated, truncated, _ = envs[k].step(_env_action(envs[k], actions[k]))
                obs[k] = np.asarray(o, np.float64).ravel()
                returns[k] += float(reward)
                alive[k] = not (terminated or truncated)
        return returns
    finally:
        for env in envs:
            env.close()


def twin_returns(
    actor: Controller | DeployableActor,
    fit: TwinFit,
    episodes: int = DEFAULT_EPISODES,
    seed: int = 0,
    *,
    env_kwargs: Mapping[str, Any] | None = None,
) -> FloatArray:
    """The candidate's returns in the twin: `episodes` episodes drawn over the twin's uncertainty
    (`draw_episode_params`), the deterministic policy, seeded by `seed` (same inputs, same returns).

    env_kwargs: for `sim.make` (the study's env kwargs, e.g. control_hz), the same for every episode.
    """
    params = draw_episode_params(fit, episodes, seed)
    return episode_returns(actor, fit.env_id, params, episode_seeds(episodes, seed), env_kwargs)


def twin_stats(
    actor: Controller | DeployableActor,
    fit: TwinFit,
    episodes: int = DEFAULT_EPISODES,
    seed: int = 0,
    *,
    env_kwargs: Mapping[str, Any] | None = None,
) -> ReturnStats:
    """`twin_returns` summarised for the residual model: mean, std and number of episodes."""
    return ReturnStats.from_returns(twin_returns(actor, fit, episodes, seed, env_kwargs=env_kwargs))
