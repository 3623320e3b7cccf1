"""The residual across robots: how a robot's measured returns differ from its twin's, pooled over the
fleet, so that a prediction for (candidate, robot) has an honest interval, and a robot with no
record yet gets the fleet's.

Data: pairs (candidate i, robot j) with both a twin prediction (the candidate's returns in robot
j's twin, `robonas.models.twin_prediction`) and measured real returns, each summarised as a
`ReturnStats` (mean, std, episodes). The residual is r_ij = measured mean - twin mean.

Model (hierarchical, normal):
    r_ij = mu + b_j + e_ij,   b_j ~ N(0, tau^2),
    e_ij ~ N(0, se_meas_ij^2 + se_twin_ij^2 + s^2 + lam * v_ij)
mu: the fleet's mean residual (what every twin misses in common); b_j: robot j's own offset;
se_*: the standard errors of the measured and of the twin mean (std / sqrt(episodes)); s: extra
per-pair noise (model error); v_ij: the variance of the twin's episode returns and lam in [0, 1]
the share of it that is uncertainty about the robot's own mean return rather than episode-to-
episode noise. The twin's episodes are drawn over its posterior, so for a candidate that fails
on some of the robot's plausible parameters and not on others their spread is uncertainty about
the robot, which averaging more twin episodes does not remove; lam lets the data say how much of
it shows in the real returns, and makes the intervals of fragile candidates wider than those of
robust ones.

Fit: Bayesian on a grid, exact given the grid. mu has a flat prior and, like the offsets b_j, is
integrated analytically (given tau, s, lam everything is Gaussian; each robot's block of the
covariance is diagonal plus tau^2 11^T, so Sherman-Morrison reduces the likelihood to per-robot
sums). tau and s have half-Cauchy priors of scale `prior_scale` (Gelman 2006: weakly informative,
no mass piling at 0, a heavy tail that leaves a large spread possible when there are few robots)
and lam takes 0 or one of 1/64, 1/32, ..., 1, equally likely a priori (`LAM_GRID`). Their
posterior is the restricted (mu-integrated) likelihood times the prior on a grid uniform in the
half-Cauchy CDFs (so every cell has the same prior mass), first coarse over the whole range, then
again on the part that holds the posterior. Predictions are mixtures of normals over the grid,
weighted by the posterior: with only two or three robots, tau is poorly known, and the mixture's
heavy tail is what keeps the interval for an unseen robot honest, where a plug-in estimate
(empirical Bayes) would often put tau at 0. A fit takes about 0.1 s for 50 pairs of 6 robots.

Predictions (`Prediction`: mean, std and the central 90% interval of the predictive distribution,
clipped to `bounds` when given, e.g. the env's return range):
- `predict(robot, twin)`: robot j with a twin: twin mean + mu + E[b_j | data], std from the
  twin's standard error and spread (lam v), the posterior of mu + b_j and s. A robot with a twin
  but no measured pair gets b_j from its prior (tau);
- `predict_fleet(twins)`: a robot with neither record nor twin: the mean over the robots' twin
  means + mu, with the between-robot spread: tau plus the spread of the twins' means (predictive
  variance of a new draw, var * (1 + 1/J));
- `predict_objective(twins, how)`: the fleet objective, the mean or the worst over robots, by
  sampling the joint posterior (robots share mu and the hyperparameters, so their errors are
  correlated and the objective's interval is not a combination of the per-robot ones).
What is predicted is the robot's expected return; pass `target_se` (e.g. std / sqrt(episodes) of
a planned measurement) to predict a measured mean instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import brentq
from scipy.special import ndtr

from robonas.errors import RobonasError

FloatArray = NDArray[np.float64]
FORMAT = 1
LEVEL = 0.90  # the intervals' coverage: lo90, hi90
_TAILS = ((1 - LEVEL) / 2, (1 + LEVEL) / 2)
GRID = 32  # points per axis for tau and s, per pass
# lam's values, equally likely a priori: 0 and a doubling ladder up to 1 (most of a twin's spread is
# usually episode noise; a share that matters is resolved to within a factor of two)
LAM_GRID = (0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
_PRUNE = 1e-7  # grid points with less posterior weight than this share of the largest are dropped
_KEEP = 1e-5  # the second pass spans the cells holding at least this share of the largest
OBJECTIVE_DRAWS = 4000
Objective = Literal["mean", "worst"]


class ResidualDataError(RobonasError, ValueError):
    """The pairs cannot be fitted (none, or values not finite)."""


@dataclass(frozen=True)
class ReturnStats:
    """Returns of one candidate on one robot (or in its twin): mean, std (of the episodes, ddof 1)
    and the number of episodes."""

    mean: float
    std: float
    episodes: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std >= 0):
            raise ResidualDataError(
                f"returns mean={self.mean!r} std={self.std!r}: need finite values, std >= 0"
            )
        if not (isinstance(self.episodes, (int, np.integer)) and self.episodes >= 1):
            raise ResidualDataError(f"returns over episodes={self.episodes!r}: need at least one episode")
        # plain Python numbers, so `to_dict` is JSON whatever numpy scalars came in
        object.__setattr__(self, "mean", float(self.mean))
        object.__setattr__(self, "std", float(self.std))
        object.__setattr__(self, "episodes", int(self.episodes))

    @property
    def se(self) -> float:
        """Standard error of the mean."""
        return self.std / math.sqrt(self.episodes)

    @classmethod
    def from_returns(cls, returns: Sequence[float] | FloatArray) -> ReturnStats:
        r = np.asarray(returns, dtype=np.float64).ravel()
        if r.size == 0:
            raise ResidualDataError("no returns to summarise")
        return cls(float(r.mean()), float(r.std(ddof=1)) if r.size > 1 else 0.0, int(r.size))

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "episodes": self.episodes}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReturnStats:
        return cls(float(d["mean"]), float(d["std"]), int(d["episodes"]))


@dataclass(frozen=True)
class Pair:
    """One (candidate, robot) with both the twin's and the measured returns."""

    candidate: str
    robot: str
    twin: ReturnStats
    measured: ReturnStats

    @property
    def residual(self) -> float:
        return self.measured.mean - self.twin.mean

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "robot": self.robot,
            "twin": self.twin.to_dict(),
            "measured": self.measured.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Pair:
        return cls(
            str(d["candidate"]),
            str(d["robot"]),
            ReturnStats.from_dict(d["twin"]),
            ReturnStats.from_dict(d["measured"]),
        )


@dataclass(frozen=True)
class Prediction:
    """A predictive distribution's mean, std and central 90% interval [lo90, hi90].

    basis: "robot" (its twin and its measured pairs), "robot_prior" (its twin, no measured pair
    yet: the offset from the between-robot prior), "fleet" (no twin: the fleet-level prediction),
    "fleet_mean" / "fleet_worst" (the objective over the fleet's robots).
    """

    mean: float
    std: float
    lo90: float
    hi90: float
    basis: str

    def to_dict(self) -> dict[str, float | str]:
        return {"mean": self.mean, "std": self.std, "lo90": self.lo90, "hi90": self.hi90, "basis": self.basis}


# -- the mixture ------------------------------------------------------------------------------------


def _clipped_moments(m: FloatArray, sd: FloatArray, lo: float, hi: float) -> tuple[FloatArray, FloatArray]:
    """E[X] and E[X^2] of clip(X, lo, hi), X ~ N(m, sd^2), elementwise (closed form)."""
    sd = np.maximum(sd, 1e-300)
    a, b = (lo - m) / sd, (hi - m) / sd
    pa, pb = ndtr(a), ndtr(b)
    fa, fb = np.exp(-0.5 * a * a) / math.sqrt(2 * math.pi), np.exp(-0.5 * b * b) / math.sqrt(2 * math.pi)
    inside = pb - pa
    m1 = lo * pa + hi * (1 - pb) + m * inside + sd * (fa - fb)
    inner2 = m * m * inside + 2 * m * sd * (fa - fb) + sd * sd * (inside + a * fa - b * fb)
    m2 = lo * lo * pa + hi * hi * (1 - pb) + inner2
    return m1, m2


def _mixture(
    weights: FloatArray, means: FloatArray, sds: FloatArray, bounds: tuple[float, float] | None, basis: str
) -> Prediction:
    w = weights / weights.sum()
    sds = np.maximum(sds, 1e-12)
    if bounds is None:
        mean = float(w @ means)
        var = float(w @ (sds**2 + means**2)) - mean**2
    else:
        m1, m2 = _clipped_moments(means, sds, *bounds)
        mean = float(w @ m1)
        var = float(w @ m2) - mean**2

    def cdf(x: float) -> float:
        return float(w @ ndtr((x - means) / sds))

    left, right = float(np.min(means - 12 * sds)), float(np.max(means + 12 * sds))
    q = [float(brentq(lambda x, p=p: cdf(x) - p, left, right, xtol=1e-9 * (1 + abs(mean)))) for p in _TAILS]
    if bounds is not None:
        q = [min(max(v, bounds[0]), bounds[1]) for v in q]
    return Prediction(mean=mean, std=math.sqrt(max(var, 0.0)), lo90=q[0], hi90=q[1], basis=basis)


# -- the grid posterior -----------------------------------------------------------------------------


def _half_cauchy(u: FloatArray, scale: float) -> FloatArray:
    """The half-Cauchy(scale) quantile at u in [0, 1)."""
    return scale * np.tan(0.5 * math.pi * u)


def _cells(lo: float, hi: float, n: int) -> FloatArray:
    return lo + (np.arange(n) + 0.5) * (hi - lo) / n


@dataclass
class _Posterior:
    """Grid points with their posterior weight and what predictions need at each."""

    weight: FloatArray  # (G,)
    tau2: FloatArray
    s2: FloatArray
    lam: FloatArray
    mu_hat: FloatArray  # mu | tau, s, lam, data ~ N(mu_hat, 1 / a)
    a: FloatArray
    s0: FloatArray  # (G, J): per robot, sum of 1 / d
    s1: FloatArray  # (G, J): per robot, sum of r / d


def _evaluate(
    r: FloatArray,
    known: FloatArray,
    spread: FloatArray,
    robot: NDArray[np.intp],
    n_robots: int,
    tau: FloatArray,
    s: FloatArray,
    lam: FloatArray,
) -> tuple[FloatArray, _Posterior]:
    """Log restricted likelihood and the per-point sums at grid points (tau, s, lam) (each (G,))."""
    d = known[None, :] + (s**2)[:, None] + lam[:, None] * spread[None, :]  # (G, N)
    inv = 1.0 / d
    z = np.zeros((r.size, n_robots))
    z[np.arange(r.size), robot] = 1.0
    s0, s1, s2 = inv @ z, (inv * r) @ z, (inv * r * r) @ z
    logdet_d = np.log(d) @ z
    tau2 = (tau**2)[:, None]
    denom = 1.0 + tau2 * s0
    a = np.sum(s0 / denom, axis=1)
    b = np.sum(s1 / denom, axis=1)
    c = np.sum(s2 - tau2 * s1**2 / denom, axis=1)
    loglik = -0.5 * (np.sum(logdet_d + np.log(denom), axis=1) + c - b**2 / a + np.log(a))
    post = _Posterior(np.zeros_like(a), tau**2, s**2, lam, b / a, a, s0, s1)
    return loglik, post


def _mesh(tau_u: FloatArray, s_u: FloatArray, scale: float) -> tuple[FloatArray, FloatArray, FloatArray]:
    lam = np.asarray(LAM_GRID)
    tu, su, lm = np.meshgrid(tau_u, s_u, lam, indexing="ij")
    return _half_cauchy(tu.ravel(), scale), _half_cauchy(su.ravel(), scale), lm.ravel()


class FleetResidual:
    """The fitted residual model (see the module docstring). Build with `fit`; JSON through
    `to_dict`/`from_dict` (the pairs and settings: loading refits, deterministically, in
    milliseconds)."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        *,
        prior_scale: float | None = None,
        bounds: tuple[float, float] | None = None,
    ) -> None:
        self.pairs = tuple(pairs)
        if not self.pairs:
            raise ResidualDataError(
                "the residual model needs at least one (candidate, robot) pair with real returns"
            )
        self.robots = tuple(sorted({p.robot for p in self.pairs}))
        index = {name: j for j, name in enumerate(self.robots)}
        r = np.array([p.residual for p in self.pairs])
        known = np.array([p.measured.se**2 + p.twin.se**2 for p in self.pairs])
        spread = np.array([p.twin.std**2 for p in self.pairs])
        if not (np.all(np.isfinite(r)) and np.all(np.isfinite(known)) and np.all(np.isfinite(spread))):
            raise ResidualDataError("pairs with returns that are not finite")
        if bounds is not None:
            lo, hi = (float(v) for v in bounds)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ResidualDataError(f"bounds={bounds!r}: need finite lo < hi")
            bounds = (lo, hi)
        self.bounds = bounds
        if prior_scale is None:
            values = [v for p in self.pairs for v in (p.twin.mean, p.measured.mean)]
            prior_scale = 0.5 * (max(values) - min(values))
            prior_scale = max(prior_scale, float(np.sqrt(np.max(known + spread))), 1e-6)
        if not (math.isfinite(prior_scale) and prior_scale > 0):
            raise ResidualDataError(f"prior_scale={prior_scale!r}: need a finite number > 0")
        self.prior_scale = float(prior_scale)
        self._index = index
        robot = np.array([index[p.robot] for p in self.pairs], dtype=np.intp)
        self._post = self._fit(r, known, spread, robot)

    @classmethod
    def fit(
        cls,
        pairs: Sequence[Pair],
        *,
        prior_scale: float | None = None,
        bounds: tuple[float, float] | None = None,
    ) -> FleetResidual:
        """Fit on `pairs`. prior_scale: the half-Cauchy scale of tau and s (default: half the range
        of the pairs' returns; a tenth of the env's return range is a good choice); bounds: the
        range returns can take (the predictive distributions are clipped to it)."""
        return cls(pairs, prior_scale=prior_scale, bounds=bounds)

    def _fit(
        self, r: FloatArray, known: FloatArray, spread: FloatArray, robot: NDArray[np.intp]
    ) -> _Posterior:
        j = len(self.robots)
        # pass 1: the whole prior range; pass 2: the cells that hold the posterior, refined
        u = _cells(0.0, 1.0, GRID)
        loglik, _ = _evaluate(r, known, spread, robot, j, *_mesh(u, u, self.prior_scale))
        w = np.exp(loglik - loglik.max()).reshape(GRID, GRID, len(LAM_GRID))
        spans = []
        for axis in (0, 1):
            marginal = w.sum(axis=tuple(a for a in range(3) if a != axis))
            held = np.flatnonzero(marginal >= _KEEP * marginal.max())
            lo_i, hi_i = max(held[0] - 1, 0), min(held[-1] + 1, GRID - 1)
            spans.append(_cells(lo_i / GRID, (hi_i + 1) / GRID, GRID))
        tau, s, lam = _mesh(spans[0], spans[1], self.prior_scale)
        loglik, post = _evaluate(r, known, spread, robot, j, tau, s, lam)
        # equal prior mass per cell within each pass (uniform in the half-Cauchy CDFs and in lam)
        weight = np.exp(loglik - loglik.max())
        keep = weight >= _PRUNE
        post.weight = weight[keep] / weight[keep].sum()
        for name in ("tau2", "s2", "lam", "mu_hat", "a"):
            setattr(post, name, getattr(post, name)[keep])
        post.s0, post.s1 = post.s0[keep], post.s1[keep]
        return post

    # -- the posterior at the grid points -------------------------------------------------------

    def _robot_terms(self, robot: str | None) -> tuple[FloatArray, FloatArray]:
        """Mean and variance of mu + b_robot at each grid point (prior offset for an unknown robot)."""
        p = self._post
        j = self._index.get(robot) if robot is not None else None
        s0 = p.s0[:, j] if j is not None else np.zeros_like(p.a)
        s1 = p.s1[:, j] if j is not None else np.zeros_like(p.a)
        denom = 1.0 + p.tau2 * s0
        shrink = p.tau2 * s0 / denom
        mean = (1.0 - shrink) * p.mu_hat + p.tau2 * s1 / denom
        var = (1.0 - shrink) ** 2 / p.a + p.tau2 / denom
        return mean, var

    def predict(self, robot: str, twin: ReturnStats, *, target_se: float = 0.0) -> Prediction:
        """A candidate on `robot`, from its returns in the robot's twin (see the module docstring)."""
        p = self._post
        mean, var = self._robot_terms(robot)
        var = var + p.s2 + p.lam * twin.std**2 + twin.se**2 + target_se**2
        basis = "robot" if robot in self._index else "robot_prior"
        return _mixture(p.weight, twin.mean + mean, np.sqrt(var), self.bounds, basis)

    def predict_fleet(self, twins: Mapping[str, ReturnStats], *, target_se: float = 0.0) -> Prediction:
        """A candidate on a robot with neither twin nor record, from its returns in the fleet's twins
        (robot -> stats): their mean + mu, with the between-robot spread."""
        if not twins:
            raise ResidualDataError(
                "a fleet-level prediction needs the candidate's returns in at least one twin"
            )
        p = self._post
        means = np.array([t.mean for t in twins.values()])
        n = means.size
        between = float(np.var(means, ddof=1)) * (1.0 + 1.0 / n) if n > 1 else 0.0
        spread = float(np.mean([t.std**2 for t in twins.values()]))
        se2 = float(np.mean([t.se**2 for t in twins.values()])) / n
        mean, var = self._robot_terms(None)
        var = var + p.s2 + p.lam * spread + between + se2 + target_se**2
        return _mixture(p.weight, float(means.mean()) + mean, np.sqrt(var), self.bounds, "fleet")

    def predict_objective(
        self,
        twins: Mapping[str, ReturnStats],
        how: Objective = "mean",
        *,
        draws: int = OBJECTIVE_DRAWS,
        seed: int = 0,
        target_se: float = 0.0,
    ) -> Prediction:
        """The fleet objective of a candidate over the robots in `twins` (robot -> its returns in the
        robot's twin): the mean or the worst of their (clipped) returns, by `draws` samples of the
        joint posterior (seeded: the same inputs give the same figures)."""
        if how not in ("mean", "worst"):
            raise ResidualDataError(f"objective {how!r}: use 'mean' or 'worst'")
        if not twins:
            raise ResidualDataError("a fleet objective needs the candidate's returns in at least one twin")
        p = self._post
        rng = np.random.default_rng(seed)
        g = rng.choice(p.weight.size, size=draws, p=p.weight)
        tau2, s2, lam = p.tau2[g], p.s2[g], p.lam[g]
        mu = p.mu_hat[g] + rng.standard_normal(draws) / np.sqrt(p.a[g])
        values = np.empty((draws, len(twins)))
        for k, (robot, twin) in enumerate(twins.items()):
            j = self._index.get(robot)
            s0 = p.s0[g, j] if j is not None else np.zeros(draws)
            s1 = p.s1[g, j] if j is not None else np.zeros(draws)
            denom = 1.0 + tau2 * s0
            b = tau2 * (s1 - mu * s0) / denom + np.sqrt(tau2 / denom) * rng.standard_normal(draws)
            noise = np.sqrt(s2 + lam * twin.std**2 + twin.se**2 + target_se**2) * rng.standard_normal(draws)
            values[:, k] = twin.mean + mu + b + noise
        if self.bounds is not None:
            values = np.clip(values, *self.bounds)
        out = values.mean(axis=1) if how == "mean" else values.min(axis=1)
        lo, hi = np.quantile(out, _TAILS)
        return Prediction(float(out.mean()), float(out.std()), float(lo), float(hi), f"fleet_{how}")

    # -- reporting and storage ------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Posterior figures for reports: mu, tau, s, lam (mean, std, 90% interval) and per robot
        its offset b_j (mean, std) and number of pairs."""
        p = self._post
        w = p.weight

        def stats(values: FloatArray, variances: FloatArray | None = None) -> dict[str, float]:
            mean = float(w @ values)
            var = float(w @ ((variances if variances is not None else 0.0) + values**2)) - mean**2
            order = np.argsort(values)
            cum = np.cumsum(w[order])
            lo_i, hi_i = (min(int(np.searchsorted(cum, q)), len(cum) - 1) for q in _TAILS)
            lo, hi = float(values[order[lo_i]]), float(values[order[hi_i]])
            return {"mean": mean, "std": math.sqrt(max(var, 0.0)), "lo90": lo, "hi90": hi}

        robots: dict[str, dict[str, float | int]] = {}
        for name, j in self._index.items():
            denom = 1.0 + p.tau2 * p.s0[:, j]
            shrink = p.tau2 * p.s0[:, j] / denom
            b_mean = p.tau2 * (p.s1[:, j] - p.mu_hat * p.s0[:, j]) / denom
            b_var = p.tau2 / denom + shrink**2 / p.a
            m = float(w @ b_mean)
            robots[name] = {
                "offset": m,
                "offset_std": math.sqrt(max(float(w @ (b_var + b_mean**2)) - m**2, 0.0)),
                "pairs": sum(1 for q in self.pairs if q.robot == name),
            }
        return {
            "pairs": len(self.pairs),
            "mu": {k: v for k, v in stats(p.mu_hat, 1.0 / p.a).items() if k in ("mean", "std")},
            "tau": stats(np.sqrt(p.tau2)),
            "s": stats(np.sqrt(p.s2)),
            "spread_share": stats(p.lam),
            "robots": robots,
            "grid_points": int(w.size),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "prior_scale": self.prior_scale,
            "bounds": None if self.bounds is None else list(self.bounds),
            "pairs": [p.to_dict() for p in self.pairs],
            "summary": self.summary(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FleetResidual:
        if d.get("format") != FORMAT:
            raise RobonasError(
                f"fleet residual format {d.get('format')!r} is not supported (expected {FORMAT})"
            )
        bounds = d.get("bounds")
        return cls(
            [Pair.from_dict(p) for p in d["pairs"]],
            prior_scale=float(d["prior_scale"]),
            bounds=None if bounds is None else (float(bounds[0]), float(bounds[1])),
        )
