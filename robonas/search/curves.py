"""Learning-curve figures: normalised area under the curve and an asymptotic-return estimate.

Leans on numpy (trapezoid rule) and scipy.optimize.curve_fit. The asymptote is the parameter `a`
of a saturating exponential

    R(t) = a - (a - b) * exp(-t / tau)

(b: return at t = 0, tau: learning time constant). It is the simplest monotone curve with a
finite limit, has three interpretable parameters and is what RL learning curves look like to
first order; its fit gives `a` with a standard error from the covariance matrix. The fit is
bounded (tau between a tenth of the first step gap and ten times the horizon, `a` and `b` within a
span-wide margin of the observed returns) so that a curve still rising linearly cannot claim an
asymptote far beyond what was seen. When the fit is ill-posed (fewer than 4 points, a flat
curve, no convergence, an estimate on a bound, a non-finite or larger-than-span error), the
estimate falls back to the mean of the last third of the points (at least two) with their
standard deviation: an honest "where it ended up" figure.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from robonas.errors import ConfigError

MIN_POINTS_FOR_FIT = 4


def _as_curve(
    steps: Sequence[float], returns: Sequence[float]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    t = np.asarray(steps, dtype=float)
    r = np.asarray(returns, dtype=float)
    if t.ndim != 1 or r.ndim != 1 or len(t) != len(r):
        raise ConfigError(f"curve: steps ({t.shape}) and returns ({r.shape}) must be 1-D and the same length")
    if len(t) == 0:
        raise ConfigError("curve: no points (need at least one (step, return) pair)")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(r))):
        raise ConfigError(f"curve: non-finite values in steps {t.tolist()} or returns {r.tolist()}")
    if len(t) > 1 and np.any(np.diff(t) <= 0):
        raise ConfigError(f"curve: steps {t.tolist()} must be strictly increasing")
    return t, r


def auc_normalised(steps: Sequence[float], returns: Sequence[float], lo: float, hi: float) -> float:
    """Area under the curve of returns mapped to [0, 1] by (r - lo) / (hi - lo) and clipped,
    divided by the step span (trapezoid rule). A single point gives its normalised value."""
    t, r = _as_curve(steps, returns)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ConfigError(f"auc range: lo={lo!r}, hi={hi!r}; need finite lo < hi")
    y = np.clip((r - lo) / (hi - lo), 0.0, 1.0)
    if len(t) == 1:
        return float(y[0])
    return float(np.trapezoid(y, t) / (t[-1] - t[0]))


def _tail(r: NDArray[np.float64]) -> tuple[float, float]:
    k = min(len(r), max(2, math.ceil(len(r) / 3)))
    tail = r[-k:]
    return float(np.mean(tail)), float(np.std(tail))


def _saturating(t: NDArray[np.float64], a: float, b: float, tau: float) -> NDArray[np.float64]:
    return a - (a - b) * np.exp(-t / tau)


def asymptote(
    steps: Sequence[float], returns: Sequence[float], ceiling: float | None = None
) -> tuple[float, float]:
    """(estimate, std) of the return the curve is heading to; see the module docstring.

    `ceiling` is the largest return the task allows (e.g. 500 for a 500-step balance task with
    reward 1 per step): an extrapolation never promises more than the episode can pay.
    """
    a, a_std = _asymptote(steps, returns)
    if ceiling is not None and a > ceiling:
        return float(ceiling), a_std
    return a, a_std


def _asymptote(steps: Sequence[float], returns: Sequence[float]) -> tuple[float, float]:
    t, r = _as_curve(steps, returns)
    fallback = _tail(r)
    span = float(np.ptp(r))
    if len(t) < MIN_POINTS_FOR_FIT or span <= 1e-9 * max(1.0, float(np.max(np.abs(r)))):
        return fallback

    from scipy.optimize import OptimizeWarning, curve_fit

    # Work in units of the horizon so tau is O(1) and the problem is well conditioned.
    x = t / t[-1] if t[-1] > 0 else t - t[0]
    gaps = np.diff(x)
    tau_lo, tau_hi = max(float(np.min(gaps)) / 10.0, 1e-6), 10.0 * float(x[-1] if x[-1] > 0 else 1.0)
    r_lo, r_hi = float(np.min(r)) - span, float(np.max(r)) + span
    lower, upper = [r_lo, r_lo, tau_lo], [r_hi, r_hi, tau_hi]
    p0 = [float(r[-1]), float(r[0]), float(np.clip(0.3 * x[-1], tau_lo * 1.01, tau_hi * 0.99))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", OptimizeWarning)
            popt, pcov = curve_fit(_saturating, x, r, p0=p0, bounds=(lower, upper), maxfev=5000)
    except (RuntimeError, ValueError, OptimizeWarning):
        return fallback
    a, _, tau = (float(v) for v in popt)
    a_std = float(np.sqrt(pcov[0, 0])) if np.isfinite(pcov[0, 0]) and pcov[0, 0] >= 0 else math.inf
    on_bound = any(
        math.isclose(v, bound, rel_tol=1e-3, abs_tol=1e-9)
        for v, bound in ((a, r_lo), (a, r_hi), (tau, tau_hi))
    )
    if on_bound or not math.isfinite(a_std) or a_std > span:
        return fallback
    return a, a_std
