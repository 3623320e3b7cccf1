"""Robot twins: identify a robot's simulation parameters from its own recorded episodes.

`identify(env_id, episodes)` returns a `TwinFit`: the dynamics (mass, friction, damping, motor
gain), the whole-step action delay, the sub-period actuation latency and the observation noise
that make the simulator replay the robot's records best, each with an uncertainty and a flag
saying whether the data pin it down at all. A `TwinFit` is plain data (`to_dict`/`from_dict`,
JSON) so the store can keep it as a versioned twin.

What is fitted. The simulator is replayed window by window over the records
(`robonas.models.twin_replay`): each window starts from a recorded observation, applies the
recorded actions as the candidate robot would have applied them (the agent's recorded compute
latency plus the candidate actuation latency within the period, then the candidate whole-step
delay) and rolls `horizon` steps open loop; the residuals are the differences between the
simulated and the recorded observations.

Horizon and weighting. The default horizon is 0.2 s (10 steps at 50 Hz), at least the largest
delay tried plus 5 steps. Shorter, a window would hardly see the effect of its own actions behind
a delay of several steps, and the one-step prediction is dominated by the observation noise
(which enters twice: in the start state and in the compared observation); longer, the unstable
pole amplifies the noise of the start state (about e-fold in 0.2 s) and one window's residuals
become one long correlated error. Measured on 5 episodes of cartpole-worn-b / cartpole-laggy-c:
horizons of 6, 10 and 20 steps gave motor-gain standard errors of 0.82/0.51/0.42% and
0.26/0.14/0.20%, delay log-likelihood ratios of 817/768/445 and 4805/5501/2404, in 5/8/19 s and
6/10/22 s: 10 is about as informative as 20 at half the cost, and separates delays better.
Windows start every `horizon // 2` steps, capped at `max_windows` evenly spread windows, so one
evaluation costs about a thousand simulated steps.
Residuals are weighted by the inverse of their variance at each horizon step and observation
component, estimated from the residuals of a first fit (iterated once, as in feasible generalised
least squares): every (step, component) then counts by how predictable it is, so a component in
metres does not outweigh one in radians per second, nor a far horizon step (mostly amplified
noise) a near one. The loss is the mean squared weighted residual.

Optimiser. Integers are enumerated: the delay over 0..`max_delay` (and, when the best is the
largest tried, again over twice the range, up to `DELAY_CAP`: a best at the edge of the range says
the true delay may lie beyond it), and the actuation latency over
a grid of a quarter of a physics substep below one period minus half a substep (the simulator
applies latency in whole substeps, so the loss is flat between grid points and schedules that
reach the simulator identically share one evaluation; a hold of the whole period is the next whole
step of delay). The continuous dynamics are fitted with scipy's bounded Nelder-Mead
(derivative-free: Coulomb friction makes the loss kinked) in log coordinates for the scale
factors. Stage 1, on a third of the windows: scan delay and latency at nominal dynamics, fit the
dynamics, estimate the weights, scan again. Stage 2, on all windows: fit again from there with a
smaller simplex, then the latency profile at the best delay and every other delay at its stage-1
latency, refitting if another schedule wins. The runner-up delay gets a short refit of its own
dynamics before it is compared (so `log_lr` does not credit the best delay with dynamics tuned
for it).

Mass. Scaling every mass of the cart-pole together with the motor gain, friction and damping
leaves its motion unchanged (every force in its equations of motion scales with them), so motion
data identify only the gain, friction and damping per unit mass. `mass_scale` is reported as not
identifiable; the twin simulates with mass_scale 1 and the others per unit mass, which replays the
robot exactly as its true parameters would (tested).

Uncertainty. For the dynamics: a cluster-robust sandwich covariance (Gauss-Newton Hessian of
the weighted residuals, scores summed over clusters of windows within about one second of one
episode), which does not trust the residuals to be independent: overlapping windows share
observations and one window's residuals share its start state. A direction of zero curvature (the
records do not move when the parameter does, e.g. the motor gain of a robot whose actions were all
zero) gives the parameters along it an infinite variance. The ratio of the sandwich covariance to
the naive one (independent residuals) gives an effective number of independent residuals, which
turns loss differences into log-likelihood ratios for the enumerated parameters: the delay's
runner-up (`log_lr`) and the latency's interval (where the loss stays within 1.92 of the best, a
profile-likelihood 95% interval). A parameter is flagged not identifiable when the data do not
shrink its prior range (`PRIOR`; the latency's is the sub-period range) at least `SHRINK`-fold
(posterior std > std of the uniform prior / SHRINK): its mean and std are then None and its
interval the prior range, never an invented value. The start state of each window is the noisy
observation and is not re-estimated, so the dynamics carry a small errors-in-variables bias the
std does not include (on the shipped profiles at 5 episodes, damping errors reached 2.8 standard
errors; the motor gain stays within about 1%).

Observation noise comes from the one-step residuals at the optimum: a step's residual is the new
observation's noise plus the start observation's noise propagated one step, so its variance per
component is sigma^2 (1 + sum of the squared one-step sensitivities, by finite differences); the
median over components is the estimate (one sigma for all components, like the reality
profiles). Its std is the larger of the chi-square standard error and the spread between
components.

Supports the cart-pole envs (the simulator needs to be set to a recorded state, which only they
offer). The agent clock (`clock_s`) is not used: the replay assumes the nominal control period.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import minimize

from robonas.errors import RobonasError
from robonas.models.twin_replay import FloatArray, Record, Replayer, Schedule

if TYPE_CHECKING:
    from device_agents.trajectory import Episode
    from sim.dynamics import Dynamics

FIT_FORMAT = 1
SUPPORTED_ENV_IDS = ("sim/CartPole-v0", "sim/CartPoleSwingUp-v0")
# Prior ranges of the dynamics (per unit mass, see the module docstring): the search's bounds and
# what "not identifiable" means. Wide: a robot far outside them is not a cart-pole of this kind.
PRIOR: dict[str, tuple[float, float]] = {
    "mass_scale": (0.5, 2.0),
    "friction_scale": (0.05, 20.0),
    "damping": (0.0, 1.0),
    "motor_gain": (0.2, 5.0),
}
DYNAMICS_PARAMS = ("friction_scale", "damping", "motor_gain")  # fitted; mass is the gauge
LOG_PARAMS = frozenset({"mass_scale", "friction_scale", "motor_gain"})  # fitted in log space
PARAM_NAMES = (
    "mass_scale",
    "friction_scale",
    "damping",
    "motor_gain",
    "actuation_latency_s",
    "obs_noise_std",
)
MIN_EPISODES = 2
MIN_STEPS = 250  # 5 s at 50 Hz: about 50 windows of the default horizon
HORIZON_S = 0.2
DEFAULT_MAX_DELAY = 4
DELAY_CAP = 16  # whole steps: 0.32 s at 50 Hz; beyond it the record says "not certain"
DEFAULT_MAX_WINDOWS = 100
SHRINK = 3.0  # identifiable: posterior std at most the prior's std / SHRINK
DNLL_95 = 1.92  # half the 95% quantile of chi-square(1)
CERTAIN_LOG_LR = 3.0  # a likelihood ratio of 20
_CLUSTER_S = 1.0
_FLAT_EIGENVALUE = 1e-10  # of the largest: a direction the loss does not see
_NM_MAXFEV = 160
_RUNNER_UP_MAXFEV = 16
_COARSE_MIN_WINDOWS = 40
_EDGE_BISECTIONS = 8
_MAX_REFITS = 3
_REFINE = 0.25  # stage 2's initial simplex, as a share of stage 1's
_NOISE_WINDOWS = 40


class TwinDataError(RobonasError, ValueError):
    """The records cannot identify a twin (too few, too short, wrong sizes); says what is needed."""


@dataclass(frozen=True)
class ParamFit:
    """One parameter of a twin.

    best: the value the twin simulates with (for a parameter the data cannot pin down, any value
        in [lo, hi] replays the records about as well).
    mean, std: the estimate and its standard error; None when not identifiable.
    lo, hi: an approximate 95% interval (the prior range when not identifiable).
    identifiable: whether the records shrink the prior range at least `SHRINK`-fold.
    """

    best: float
    mean: float | None
    std: float | None
    lo: float
    hi: float
    identifiable: bool

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ParamFit:
        return cls(
            best=float(d["best"]),
            mean=None if d["mean"] is None else float(d["mean"]),
            std=None if d["std"] is None else float(d["std"]),
            lo=float(d["lo"]),
            hi=float(d["hi"]),
            identifiable=bool(d["identifiable"]),
        )


@dataclass(frozen=True)
class DelayFit:
    """The whole-step action delay: the best, the runner-up and how much better the best is.

    log_lr: log-likelihood ratio of `steps` over `runner_up` (with the dynamics refitted for the
        runner-up); above 3 (a likelihood ratio of 20) the delay counts as `certain`.
    losses: the fit's loss at each delay tried (the dynamics of the best, latency re-scanned).
    """

    steps: int
    runner_up: int | None
    log_lr: float | None
    certain: bool
    losses: dict[int, float]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DelayFit:
        return cls(
            steps=int(d["steps"]),
            runner_up=None if d["runner_up"] is None else int(d["runner_up"]),
            log_lr=None if d["log_lr"] is None else float(d["log_lr"]),
            certain=bool(d["certain"]),
            losses={int(k): float(v) for k, v in d["losses"].items()},
        )


@dataclass(frozen=True)
class TwinFit:
    """A robot's identified twin (see the module docstring). JSON via `to_dict`/`from_dict`.

    params: `PARAM_NAMES` -> ParamFit; friction_scale, damping and motor_gain are per unit
        mass_scale when `per_unit_mass` (the twin simulates with mass_scale 1).
    residual_rms: RMS of the unweighted residuals per observation component, all horizon steps.
    loss: mean squared weighted residual at the fit (about 1: the weights are residual variances).
    effective_samples: independent residuals the sandwich covariance implies (of `residuals`).
    """

    env_id: str
    params: dict[str, ParamFit]
    action_delay: DelayFit
    per_unit_mass: bool
    episodes: int
    steps: int
    windows: int
    horizon: int
    residuals: int
    effective_samples: float
    loss: float
    residual_rms: tuple[float, ...]
    seconds: float
    simulated_steps: int
    format: int = FIT_FORMAT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["action_delay"]["losses"] = {str(k): v for k, v in self.action_delay.losses.items()}
        d["residual_rms"] = list(self.residual_rms)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TwinFit:
        if d.get("format") != FIT_FORMAT:
            raise RobonasError(
                f"twin fit format {d.get('format')!r} is not supported (expected {FIT_FORMAT})"
            )
        missing = set(PARAM_NAMES) - set(d["params"])
        if missing:
            raise RobonasError(f"twin fit lacks parameters {sorted(missing)}")
        return cls(
            env_id=str(d["env_id"]),
            params={k: ParamFit.from_dict(v) for k, v in d["params"].items()},
            action_delay=DelayFit.from_dict(d["action_delay"]),
            per_unit_mass=bool(d["per_unit_mass"]),
            episodes=int(d["episodes"]),
            steps=int(d["steps"]),
            windows=int(d["windows"]),
            horizon=int(d["horizon"]),
            residuals=int(d["residuals"]),
            effective_samples=float(d["effective_samples"]),
            loss=float(d["loss"]),
            residual_rms=tuple(float(v) for v in d["residual_rms"]),
            seconds=float(d["seconds"]),
            simulated_steps=int(d["simulated_steps"]),
            format=int(d["format"]),
        )

    def profile_values(self) -> dict[str, float | int]:
        """The values the twin simulates with, keyed like a reality profile's fields."""
        values: dict[str, float | int] = {name: p.best for name, p in self.params.items()}
        values["action_delay"] = self.action_delay.steps
        return values

    def dynamics(self) -> Dynamics:
        """The `sim.Dynamics` the twin simulates with."""
        from sim.dynamics import Dynamics  # here: the fit itself is plain data

        p = self.params
        return Dynamics(
            p["mass_scale"].best, p["friction_scale"].best, p["damping"].best, p["motor_gain"].best
        )


# -- input checks -------------------------------------------------------------------------------


def _records(env_id: str, episodes: Sequence[Episode], obs_dim: int, act_dim: int) -> list[Record]:
    records = []
    for i, ep in enumerate(episodes):
        obs = np.asarray(ep.obs, dtype=np.float64)
        action = np.asarray(ep.action, dtype=np.float64)
        latency = np.asarray(ep.latency_s, dtype=np.float64).reshape(-1)
        if obs.ndim != 2 or obs.shape[1] != obs_dim:
            raise TwinDataError(
                f"episode {i}: observations of shape {obs.shape}, but {env_id} observes "
                f"{obs_dim} values per step: records of another env?"
            )
        action = action.reshape(action.shape[0], -1) if action.ndim >= 1 else action
        n = obs.shape[0] - 1
        if action.ndim != 2 or action.shape != (n, act_dim) or latency.shape != (n,):
            raise TwinDataError(
                f"episode {i}: {obs.shape[0]} observations need {n} actions of {act_dim} values and "
                f"{n} latencies, got actions {action.shape} and latencies {latency.shape}"
            )
        if not (np.all(np.isfinite(obs)) and np.all(np.isfinite(action)) and np.all(np.isfinite(latency))):
            raise TwinDataError(f"episode {i}: observations, actions or latencies are not all finite")
        records.append(Record(obs, action, latency))
    return records


def _check_amount(records: Sequence[Record], horizon: int) -> list[Record]:
    usable = [r for r in records if r.steps >= horizon]
    steps = sum(r.steps for r in usable)
    if len(usable) < MIN_EPISODES or steps < MIN_STEPS:
        raise TwinDataError(
            f"identification needs at least {MIN_EPISODES} episodes of at least {horizon} steps and "
            f"{MIN_STEPS} steps in them; got {len(records)} episode(s), {len(usable)} long enough, "
            f"{steps} steps in those: record more episodes"
        )
    return usable


# -- the fit --------------------------------------------------------------------------------------


class _Problem:
    """The loss of candidate parameters over the replayed windows, with a cache."""

    def __init__(self, replayer: Replayer) -> None:
        self.rp = replayer
        step = replayer.physics_dt / 4
        top = replayer.dt - replayer.physics_dt / 2  # a longer hold is the next whole step
        self.latencies = tuple(float(b) for b in np.arange(0.0, top - 1e-12, step))
        self._schedules: dict[tuple[int, int], Schedule] = {}
        self._cache: dict[tuple[bytes, tuple[float, ...]], FloatArray] = {}
        diffs = np.concatenate([np.diff(r.obs, axis=0) for r in replayer.records])
        scale = np.maximum(diffs.std(axis=0), 1e-6)
        self.weights = np.broadcast_to(1.0 / scale, replayer.targets.shape[1:]).copy()

    def schedule(self, delay: int, j: int) -> Schedule:
        key = (delay, j)
        if key not in self._schedules:
            self._schedules[key] = self.rp.schedule(delay, self.latencies[j])
        return self._schedules[key]

    def residuals(self, z: FloatArray, schedule: Schedule) -> FloatArray:
        """Unweighted residuals (windows, horizon, obs_dim) at fit coordinates z."""
        key = (schedule.key, tuple(float(v) for v in z))
        if key not in self._cache:
            self._cache[key] = self.rp.predict(_dynamics(z), schedule) - self.rp.targets
        return self._cache[key]

    def loss(self, z: FloatArray, schedule: Schedule) -> float:
        return float(np.mean((self.residuals(z, schedule) * self.weights) ** 2))

    def scan(self, z: FloatArray, delays: Sequence[int]) -> dict[tuple[int, int], float]:
        """Loss of every (delay, latency index) at dynamics z; equal schedules evaluated once."""
        seen: dict[bytes, float] = {}
        out = {}
        for d in delays:
            for j in range(len(self.latencies)):
                s = self.schedule(d, j)
                if s.key not in seen:
                    seen[s.key] = self.loss(z, s)
                out[(d, j)] = seen[s.key]
        return out

    def fit(
        self, z0: FloatArray, schedule: Schedule, maxfev: int = _NM_MAXFEV, step_scale: float = 1.0
    ) -> FloatArray:
        ref = max(self.loss(z0, schedule), 1e-300)
        result = minimize(
            lambda z: self.loss(np.asarray(z, dtype=np.float64), schedule) / ref,
            z0,
            method="Nelder-Mead",
            bounds=_BOUNDS,
            options={
                "initial_simplex": _simplex(z0, step_scale),
                "xatol": 2e-3,
                "fatol": 3e-4,
                "maxfev": maxfev,
            },
        )
        return np.asarray(result.x, dtype=np.float64)

    def reweight(self, z: FloatArray, schedule: Schedule) -> None:
        """Weights: inverse residual std per (horizon step, component), floored."""
        r = self.residuals(z, schedule)
        std = np.sqrt(np.mean(r**2, axis=0))
        floor = 1e-3 / np.maximum(self.weights, 1e-300)  # 0.1% of the current scale
        self.weights = 1.0 / np.maximum(std, np.maximum(floor, 1e-9))


def _coords(name: str, value: float) -> float:
    return math.log(value) if name in LOG_PARAMS else value


def _natural(name: str, z: float) -> float:
    return math.exp(z) if name in LOG_PARAMS else z


_BOUNDS = [(_coords(n, PRIOR[n][0]), _coords(n, PRIOR[n][1])) for n in DYNAMICS_PARAMS]
_NOMINAL = np.array([_coords("friction_scale", 1.0), 0.0, _coords("motor_gain", 1.0)])
_STEPS = np.array([0.4, 0.05, 0.15])  # initial simplex and finite-difference scale per coordinate


def _simplex(z0: FloatArray, scale: float) -> FloatArray:
    pts = [z0.copy()]
    for i, step in enumerate(_STEPS * scale):
        p = z0.copy()
        lo, hi = _BOUNDS[i]
        p[i] = z0[i] + step if z0[i] + step <= hi else z0[i] - step
        p[i] = min(max(p[i], lo), hi)
        pts.append(p)
    return np.array(pts)


def _dynamics(z: FloatArray) -> Dynamics:
    from sim.dynamics import Dynamics

    f, c, g = (_natural(n, float(v)) for n, v in zip(DYNAMICS_PARAMS, z, strict=True))
    return Dynamics(mass_scale=1.0, friction_scale=f, damping=max(0.0, c), motor_gain=g)


def _best(losses: Mapping[tuple[int, int], float]) -> tuple[int, int]:
    return min(losses, key=lambda k: (losses[k], k))


def _latency_per_delay(losses: Mapping[tuple[int, int], float]) -> dict[int, int]:
    """delay -> the latency index with its lowest loss."""
    out: dict[int, int] = {}
    for (d, j), v in sorted(losses.items()):
        if d not in out or v < losses[(d, out[d])]:
            out[d] = j
    return out


def _stage2_losses(
    problem: _Problem, z: FloatArray, d: int, latency_of: Mapping[int, int]
) -> dict[tuple[int, int], float]:
    """The latency profile of delay d, and every other delay at its stage-1 latency."""
    losses = problem.scan(z, [d])
    for dd, jj in latency_of.items():
        if dd != d:
            losses[(dd, jj)] = problem.loss(z, problem.schedule(dd, jj))
    return losses


def _sandwich(problem: _Problem, z: FloatArray, schedule: Schedule) -> tuple[FloatArray, float]:
    """Cluster-robust covariance of z and the effective number of independent residuals."""
    rp = problem.rp
    r0 = (problem.residuals(z, schedule) * problem.weights).reshape(len(rp.windows), -1)
    jac = np.empty((r0.shape[0], r0.shape[1], len(z)))
    for i in range(len(z)):
        h = 0.1 * _STEPS[i]
        lo, hi = _BOUNDS[i]
        zp, zm = z.copy(), z.copy()
        zp[i], zm[i] = min(z[i] + h, hi), max(z[i] - h, lo)
        rp_ = (problem.residuals(zp, schedule) * problem.weights).reshape(r0.shape)
        rm_ = (problem.residuals(zm, schedule) * problem.weights).reshape(r0.shape)
        jac[:, :, i] = (rp_ - rm_) / max(zp[i] - zm[i], 1e-12)
    flat_j = jac.reshape(-1, len(z))
    hess = flat_j.T @ flat_j
    # Directions along which the loss does not change at all get no inverse (and the parameters
    # that move along them an infinite variance below), the others the usual one.
    eigval, eigvec = np.linalg.eigh(hess)
    flat = eigval <= _FLAT_EIGENVALUE * max(float(eigval.max()), 1e-300)
    inverse = np.where(flat, 0.0, 1.0 / np.where(flat, 1.0, eigval))
    hinv = (eigvec * inverse) @ eigvec.T
    clusters: dict[tuple[int, int], FloatArray] = {}
    block = max(1, round(_CLUSTER_S / rp.dt))
    for w, (e, s) in enumerate(rp.windows):
        key = (e, s // block)
        score = jac[w].T @ r0[w]
        clusters[key] = clusters.get(key, 0.0) + score
    scores = np.array(list(clusters.values()))
    g = len(scores)
    meat = scores.T @ scores * (g / max(g - 1, 1))
    robust = hinv @ meat @ hinv
    for unseen in np.flatnonzero(np.any(np.abs(eigvec[:, flat]) > 1e-3, axis=1)):
        robust[unseen, unseen] = math.inf
    n = r0.size
    s2 = float(np.mean(r0**2))
    naive = s2 * hinv
    diag_naive = np.diag(naive)
    ok = (diag_naive > 0) & np.isfinite(np.diag(robust))
    deff = float(np.mean(np.diag(robust)[ok] / diag_naive[ok])) if np.any(ok) else 1.0
    return robust, n / max(1.0, deff)


def _noise(problem: _Problem, z: FloatArray, schedule: Schedule) -> tuple[float, float]:
    """Observation noise std and its standard error from the one-step residuals (module docstring)."""
    rp = problem.rp
    r1 = problem.residuals(z, schedule)[:, 0, :]
    dyn = _dynamics(z)
    picks = np.unique(np.linspace(0, len(rp.windows) - 1, min(_NOISE_WINDOWS, len(rp.windows))).astype(int))
    obs_dim = r1.shape[1]
    gain = np.zeros(obs_dim)
    for w in picks:
        e, s = rp.windows[w]
        start = rp.records[e].obs[s]
        base = rp.predict_from(dyn, schedule, e, s, start, 1)[0]
        for i in range(obs_dim):
            delta = 1e-4 * max(1.0, abs(float(start[i])))
            moved = start.copy()
            moved[i] += delta
            sens = (rp.predict_from(dyn, schedule, e, s, moved, 1)[0] - base) / delta
            gain += sens**2
    gain = 1.0 + gain / len(picks)
    per_component = np.sqrt(np.mean(r1**2, axis=0) / gain)
    sigma = float(np.median(per_component))
    n = r1.shape[0]
    se = sigma / math.sqrt(2.0 * n)
    spread = float(np.std(per_component)) / math.sqrt(obs_dim)
    return sigma, max(se, spread)


def _param(name: str, best_z: float, std_z: float, prior: tuple[float, float]) -> ParamFit:
    """ParamFit of a parameter fitted in coordinates z (log for scale factors)."""
    lo_z, hi_z = _coords(name, prior[0]), _coords(name, prior[1])
    prior_std = (hi_z - lo_z) / math.sqrt(12.0)
    best = _natural(name, best_z)
    if not (math.isfinite(std_z) and std_z * SHRINK <= prior_std):
        return ParamFit(best, None, None, prior[0], prior[1], False)
    lo = max(_natural(name, best_z - 1.96 * std_z), prior[0])
    hi = min(_natural(name, best_z + 1.96 * std_z), prior[1])
    std = best * std_z if name in LOG_PARAMS else std_z  # delta method
    return ParamFit(best, best, std, lo, hi, True)


def identify(
    env_id: str,
    episodes: Sequence[Episode],
    *,
    max_delay: int = DEFAULT_MAX_DELAY,
    horizon: int | None = None,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    delay_cap: int = DELAY_CAP,
) -> TwinFit:
    """Fit a twin of the robot that recorded `episodes` (see the module docstring).

    max_delay: largest whole-step action delay tried first. When the best delay is the largest
        tried, the true one may lie beyond it: the fit is repeated with twice the range, up to
        `delay_cap`; a best delay still at the cap is reported as not certain.
    horizon: steps per replayed window (default: 0.2 s of control periods, >= max_delay + 5).
    max_windows: windows per loss evaluation (evenly spread over the records); cost is linear in it.
    """
    t0 = time.perf_counter()
    fit = _identify_within(env_id, episodes, max_delay, horizon, max_windows, t0)
    while fit.action_delay.steps == max_delay and max_delay < delay_cap:
        max_delay = min(delay_cap, max(2 * max_delay, max_delay + 1))
        fit = _identify_within(env_id, episodes, max_delay, horizon, max_windows, t0)
    if fit.action_delay.steps == max_delay and fit.action_delay.certain:
        fit = replace(fit, action_delay=replace(fit.action_delay, certain=False))
    return fit


def _identify_within(
    env_id: str,
    episodes: Sequence[Episode],
    max_delay: int,
    horizon: int | None,
    max_windows: int,
    t0: float,
) -> TwinFit:
    if env_id not in SUPPORTED_ENV_IDS:
        raise TwinDataError(
            f"twin identification supports {', '.join(SUPPORTED_ENV_IDS)}; {env_id!r} has no way to set "
            "the simulator to a recorded state"
        )
    if not (isinstance(max_delay, int) and max_delay >= 0):
        raise TwinDataError(f"max_delay={max_delay!r} must be a whole number of steps >= 0")
    replayer = Replayer(env_id)
    try:
        obs_dim, act_dim = replayer.obs_dim, replayer.act_dim
        records = _records(env_id, episodes, obs_dim, act_dim)
        k = horizon if horizon is not None else max(round(HORIZON_S / replayer.dt), max_delay + 5)
        if not (isinstance(k, int) and k >= 1):
            raise TwinDataError(f"horizon={horizon!r} must be a whole number of steps >= 1")
        usable = _check_amount(records, k)
        replayer.horizon = k
        return _identify(env_id, replayer, usable, max_windows, max_delay, len(episodes), t0)
    finally:
        replayer.close()


def _identify(
    env_id: str,
    rp: Replayer,
    usable: Sequence[Record],
    max_windows: int,
    max_delay: int,
    n_episodes: int,
    t0: float,
) -> TwinFit:
    k = rp.horizon
    delays = list(range(max_delay + 1))
    # Stage 1, on a third of the windows: delay and latency at nominal dynamics, the dynamics,
    # residual weights, then each delay's best latency at the fitted dynamics.
    rp.load(usable, k, max(1, k // 2), max(_COARSE_MIN_WINDOWS, max_windows // 3))
    coarse = _Problem(rp)
    z = _NOMINAL.copy()
    d, j = _best(coarse.scan(z, delays))
    z = coarse.fit(z, coarse.schedule(d, j))
    coarse.reweight(z, coarse.schedule(d, j))
    scanned = coarse.scan(z, delays)
    latency_of = _latency_per_delay(scanned)
    d, j = _best(scanned)
    # Stage 2, on all the windows: weights at the stage-1 fit, refit from it with a smaller
    # simplex; the latency profile at the best delay, every other delay at its stage-1 latency;
    # refit if another delay or latency wins.
    rp.load(usable, k, max(1, k // 2), max_windows)
    problem = _Problem(rp)
    problem.reweight(z, problem.schedule(d, j))
    for _ in range(_MAX_REFITS):
        z = problem.fit(z, problem.schedule(d, j), step_scale=_REFINE)
        losses = _stage2_losses(problem, z, d, latency_of)
        best = _best(losses)
        if problem.schedule(*best).key == problem.schedule(d, j).key:
            break
        d, j = best
    else:  # not settled: keep the last dynamics, take the best schedule at them
        losses.update(problem.scan(z, [d]))
    d, j = _best(losses)
    schedule = problem.schedule(d, j)
    best_loss = losses[(d, j)]

    cov, n_eff = _sandwich(problem, z, schedule)

    def dnll(loss: float) -> float:
        return 0.5 * n_eff * (loss - best_loss) / max(best_loss, 1e-300)

    # The delay: the runner-up with its best latency and dynamics refitted for it.
    per_delay = {dd: min(v for (d2, _), v in losses.items() if d2 == dd) for dd in delays}
    others = [dd for dd in delays if dd != d]
    runner_up: int | None = None
    log_lr: float | None = None
    if others:
        runner_up = min(others, key=lambda dd: (per_delay[dd], dd))
        jr = min((jj for (d2, jj) in losses if d2 == runner_up), key=lambda jj: losses[(runner_up, jj)])
        zr = problem.fit(z, problem.schedule(runner_up, jr), maxfev=_RUNNER_UP_MAXFEV, step_scale=_REFINE)
        per_delay[runner_up] = min(problem.loss(zr, problem.schedule(runner_up, jr)), per_delay[runner_up])
        log_lr = dnll(per_delay[runner_up])
    delay_fit = DelayFit(
        steps=d,
        runner_up=runner_up,
        log_lr=log_lr,
        certain=log_lr is None or log_lr > CERTAIN_LOG_LR,
        losses={dd: float(v) for dd, v in per_delay.items()},
    )

    params: dict[str, ParamFit] = {}
    params["mass_scale"] = ParamFit(1.0, None, None, *PRIOR["mass_scale"], identifiable=False)
    stds = np.sqrt(np.maximum(np.diag(cov), 0.0))
    for i, name in enumerate(DYNAMICS_PARAMS):
        params[name] = _param(name, float(z[i]), float(stds[i]), PRIOR[name])
    params["actuation_latency_s"] = _latency(problem, z, losses, d, j, dnll)
    sigma, sigma_se = _noise(problem, z, schedule)
    params["obs_noise_std"] = ParamFit(
        sigma, sigma, sigma_se, max(0.0, sigma - 1.96 * sigma_se), sigma + 1.96 * sigma_se, True
    )
    r = problem.residuals(z, schedule)
    return TwinFit(
        env_id=env_id,
        params={name: params[name] for name in PARAM_NAMES},
        action_delay=delay_fit,
        per_unit_mass=True,
        episodes=n_episodes,
        steps=sum(rec.steps for rec in rp.records),
        windows=len(rp.windows),
        horizon=rp.horizon,
        residuals=int(r.size),
        effective_samples=float(n_eff),
        loss=float(best_loss),
        residual_rms=tuple(float(v) for v in np.sqrt(np.mean(r**2, axis=(0, 1)))),
        seconds=time.perf_counter() - t0,
        simulated_steps=rp.simulated_steps,
    )


def _latency(
    problem: _Problem,
    z: FloatArray,
    losses: Mapping[tuple[int, int], float],
    d: int,
    j: int,
    dnll: Callable[[float], float],
) -> ParamFit:
    """The actuation latency from its profile at the best delay and dynamics: the best is the
    middle of the latencies that give the best schedule; the interval is where the loss stays
    within `DNLL_95` of the best (grid values, then bisection between grid values)."""
    grid = problem.latencies
    top = problem.rp.dt - problem.rp.physics_dt / 2

    def edge(i: int, outward: int, inside_test: Callable[[float], bool]) -> float:
        """Where the region of grid value i (inside_test true) ends, going down (-1) or up (+1)."""
        inside = grid[i]
        outside = grid[i + outward] if 0 <= i + outward < len(grid) else (0.0 if outward < 0 else top)
        if inside_test(outside):
            return outside
        for _ in range(_EDGE_BISECTIONS):
            mid = 0.5 * (inside + outside)
            if inside_test(mid):
                inside = mid
            else:
                outside = mid
        return 0.5 * (inside + outside)

    best_key = problem.schedule(d, j).key

    def same(b: float) -> bool:
        return problem.rp.schedule(d, b).key == best_key

    def accepted(b: float) -> bool:
        return dnll(problem.loss(z, problem.rp.schedule(d, b))) <= DNLL_95

    plateau = [i for i in range(len(grid)) if problem.schedule(d, i).key == best_key]
    inside = [i for i in range(len(grid)) if dnll(losses.get((d, i), math.inf)) <= DNLL_95]
    best = 0.5 * (edge(min(plateau), -1, same) + edge(max(plateau), +1, same))
    lo, hi = edge(min(inside), -1, accepted), edge(max(inside), +1, accepted)
    std = (hi - lo) / math.sqrt(12.0)
    if std * SHRINK > top / math.sqrt(12.0):
        return ParamFit(best, None, None, 0.0, top, False)
    return ParamFit(best, best, std, lo, hi, True)
