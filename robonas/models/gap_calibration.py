"""The calibrated sim-to-real gap model: Bayesian robust regression on the robots' returns.

Each `GapObservation` pairs a trial's simulation features with the return its deployed artifact
achieved on a robot. `BayesianGapModel` regresses the gap, as a share of the task's return range,

    y = (asymptotic_return - real_return) / range
      = b0 + b1 * latency_share + b2 * max(0, latency_share - 1)
        + b3 * robustness_drop / range + b4 * (log(params) - log(PARAMS_REF)) + noise

Prior. Independent Gaussians on b, centred at the heuristic's coefficients (bias 0,
latency `HeuristicGapModel.latency_coef`, overrun `overrun_coef`, robustness `robustness_coef`,
log params 0): "more delay, more loss" is the prior, and with three reports the posterior stays
close to it. The prior stds (`DEFAULT_PRIOR_STD`) are moderate: data can move a coefficient by
about its own size, not flip its sign on a handful of reports.

Likelihood. Student-t with `nu` (default 4) degrees of freedom, because a robot report can be
an outlier (a fall caused by a loose cable, an operator stop) that a Gaussian would chase. It is
fitted by EM on the scale-mixture form of the t: given per-observation weights the posterior is
Gaussian (conjugate update with precision weighted by w_i / s^2); the weights are then
w_i = (nu + 1) / (nu + r_i^2 / s^2) with r_i the residual at the posterior mean, so an outlier's
weight falls as 1/r^2. The noise scale s^2 is the weighted mean square residual, itself robust
through the weights, with `noise_prior_weight` pseudo-observations at `noise_prior_scale` (an
inverse-gamma style prior) so that it cannot collapse to 0 when there are fewer reports than
coefficients. `nu=None` gives a Gaussian likelihood (all weights 1), for comparison.

Prediction. mean_gap = range * x.m (clipped at 0: `GapPrediction` is a loss, and a robot that
beats simulation is treated as "no gap"); std_gap = range * sqrt(x.S.x + s^2 * nu / (nu - 2)),
i.e. the *predictive* std: the posterior uncertainty of the coefficients plus the t noise
variance (s^2 for a Gaussian likelihood).

numpy only: the update is a few lines of linear algebra, written out to be read against the
formulas above. Fits are stored as versioned rows of kind "gap" for a study.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from robonas.errors import ConfigError, RobonasError
from robonas.models.gap_model import GapFeatures, GapModel, GapPrediction, HeuristicGapModel

if TYPE_CHECKING:
    from robonas.store import Store

PARAMS_FORMAT = 1
FEATURES = ("bias", "latency_share", "latency_overrun", "robustness_drop", "log_params")
# log(params) is centred at a typical small policy so the bias stays interpretable.
PARAMS_REF = 10_000
# Prior stds, in units of "share of the return range" per feature unit.
DEFAULT_PRIOR_STD = (0.1, 0.1, 0.3, 0.5, 0.05)
MIN_OBSERVATIONS = 3
_EM_ITERATIONS = 100
_EM_TOL = 1e-10


@dataclass(frozen=True)
class GapObservation:
    """One (trial, robot report) pair: simulation features and the return measured on the robot."""

    features: GapFeatures
    real_return: float

    def __post_init__(self) -> None:
        if not isinstance(self.features, GapFeatures):
            raise RobonasError(f"GapObservation.features must be GapFeatures, got {self.features!r}")
        value = self.real_return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RobonasError(f"GapObservation.real_return must be a finite number, got {value!r}")

    @property
    def gap_share(self) -> float:
        """Observed gap as a share of the return range (the regression target)."""
        f = self.features
        return (f.asymptotic_return - self.real_return) / f.return_range


def design_row(f: GapFeatures) -> NDArray[np.float64]:
    """The regression features of one candidate, in `FEATURES` order."""
    share = f.latency_share
    return np.array(
        [
            1.0,
            share,
            max(0.0, share - 1.0),
            f.robustness_drop / f.return_range,
            math.log(max(f.params, 1) / PARAMS_REF),
        ]
    )


def _vector(label: str, values: Sequence[float], positive: bool = False) -> NDArray[np.float64]:
    arr = np.asarray(values, dtype=float)
    if arr.shape != (len(FEATURES),) or not np.all(np.isfinite(arr)) or (positive and not np.all(arr > 0)):
        need = "positive" if positive else "finite"
        raise ConfigError(
            f"BayesianGapModel.{label} must be {len(FEATURES)} {need} numbers for "
            f"{list(FEATURES)}, got {np.asarray(values).tolist()!r}"
        )
    return arr


class BayesianGapModel(GapModel):
    """Bayesian Student-t regression of the gap share (module docstring); unfitted = the prior."""

    name = "bayes-gap"

    def __init__(
        self,
        prior_mean: Sequence[float] | None = None,
        prior_std: Sequence[float] | None = None,
        nu: float | None = 4.0,
        noise_prior_scale: float = 0.05,
        noise_prior_weight: float = 2.0,
        version: int = 0,
    ) -> None:
        if prior_mean is None:
            h = HeuristicGapModel()
            prior_mean = (0.0, h.latency_coef, h.overrun_coef, h.robustness_coef, 0.0)
        self.prior_mean = _vector("prior_mean", prior_mean)
        self.prior_std = _vector(
            "prior_std", DEFAULT_PRIOR_STD if prior_std is None else prior_std, positive=True
        )
        if nu is not None and (
            isinstance(nu, bool) or not isinstance(nu, (int, float)) or not (math.isfinite(nu) and nu > 2)
        ):
            raise ConfigError(f"BayesianGapModel.nu must be a number > 2 or None (Gaussian), got {nu!r}")
        self.nu = None if nu is None else float(nu)
        for key, value in (
            ("noise_prior_scale", noise_prior_scale),
            ("noise_prior_weight", noise_prior_weight),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise ConfigError(f"BayesianGapModel.{key} must be a number > 0, got {value!r}")
        self.noise_prior_scale = float(noise_prior_scale)
        self.noise_prior_weight = float(noise_prior_weight)
        # Before any fit the posterior is the prior.
        self.mean = self.prior_mean.copy()
        self.cov = np.diag(self.prior_std**2)
        self.noise_scale = self.noise_prior_scale
        self.weights: NDArray[np.float64] = np.zeros(0)
        self.n_observations = 0
        self.version = str(int(version))

    @classmethod
    def from_heuristic(cls, heuristic: HeuristicGapModel, **kwargs: Any) -> BayesianGapModel:
        """A model whose prior is centred at `heuristic`'s coefficients."""
        mean = (0.0, heuristic.latency_coef, heuristic.overrun_coef, heuristic.robustness_coef, 0.0)
        return cls(prior_mean=mean, **kwargs)

    # --- fitting ---------------------------------------------------------------------------
    def fit(self, observations: Sequence[GapObservation]) -> BayesianGapModel:
        """EM for the Student-t posterior (module docstring); returns self."""
        observations = list(observations)
        if len(observations) < MIN_OBSERVATIONS:
            raise RobonasError(
                f"the gap model needs at least {MIN_OBSERVATIONS} observations (robot reports "
                f"paired with trials), got {len(observations)}"
            )
        X = np.array([design_row(o.features) for o in observations])
        y = np.array([o.gap_share for o in observations])
        n = len(y)
        prior_prec = np.diag(1.0 / self.prior_std**2)
        prior_term = prior_prec @ self.prior_mean
        # Starting noise scale: robust spread around the prior's prediction, floored by the prior.
        r0 = y - X @ self.prior_mean
        s2 = max(1.4826 * float(np.median(np.abs(r0 - np.median(r0)))), self.noise_prior_scale) ** 2
        w = np.ones(n)
        mean = self.prior_mean
        cov = np.diag(self.prior_std**2)
        for _ in range(_EM_ITERATIONS):
            prec = prior_prec + (X.T * (w / s2)) @ X
            cov = np.linalg.inv(prec)
            new_mean = cov @ (prior_term + X.T @ (w * y) / s2)
            r = y - X @ new_mean
            if self.nu is not None:
                w = (self.nu + 1.0) / (self.nu + r**2 / s2)
            # E[r^2] under the posterior adds the coefficient uncertainty x' S x.
            expected_sq = r**2 + np.einsum("ij,jk,ik->i", X, cov, X)
            s2 = (float(np.sum(w * expected_sq)) + self.noise_prior_weight * self.noise_prior_scale**2) / (
                n + self.noise_prior_weight
            )
            done = np.max(np.abs(new_mean - mean)) < _EM_TOL
            mean = new_mean
            if done:
                break
        self.mean, self.cov, self.noise_scale = mean, cov, math.sqrt(s2)
        self.weights, self.n_observations = w, n
        return self

    # --- prediction ------------------------------------------------------------------------
    @property
    def noise_variance(self) -> float:
        """Variance of one report around the regression line (the t's, when nu is set)."""
        s2 = self.noise_scale**2
        return s2 if self.nu is None else s2 * self.nu / (self.nu - 2.0)

    def coefficient(self, feature: str) -> tuple[float, float]:
        """Posterior mean and std of one coefficient, by name in `FEATURES`."""
        if feature not in FEATURES:
            raise ConfigError(f"unknown gap feature {feature!r}; valid features are {list(FEATURES)}")
        i = FEATURES.index(feature)
        return float(self.mean[i]), math.sqrt(float(self.cov[i, i]))

    def predict(self, features: GapFeatures) -> GapPrediction:
        x = design_row(features)
        span = features.return_range
        mean_share = float(x @ self.mean)
        var_share = float(x @ self.cov @ x) + self.noise_variance
        return GapPrediction(mean_gap=max(0.0, span * mean_share), std_gap=span * math.sqrt(var_share))

    def predict_real_return(self, features: GapFeatures) -> float:
        """Expected return on the robot: asymptotic return minus the expected gap."""
        return features.asymptotic_return - self.predict(features).mean_gap

    # --- storage ---------------------------------------------------------------------------
    def to_params(self) -> dict[str, Any]:
        """JSON-serialisable parameters (a `model_versions` row of kind "gap")."""
        return {
            "format": PARAMS_FORMAT,
            "model": self.name,
            "features": list(FEATURES),
            "params_ref": PARAMS_REF,
            "prior_mean": self.prior_mean.tolist(),
            "prior_std": self.prior_std.tolist(),
            "nu": self.nu,
            "noise_prior_scale": self.noise_prior_scale,
            "noise_prior_weight": self.noise_prior_weight,
            "mean": self.mean.tolist(),
            "cov": self.cov.tolist(),
            "noise_scale": self.noise_scale,
            "n_observations": self.n_observations,
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any], version: int = 0) -> BayesianGapModel:
        if (
            params.get("format") != PARAMS_FORMAT
            or params.get("model") != cls.name
            or list(params.get("features", [])) != list(FEATURES)
            or params.get("params_ref") != PARAMS_REF
        ):
            raise RobonasError(
                f"gap params: format {params.get('format')!r}, model {params.get('model')!r}, "
                f"features {params.get('features')!r} do not match {cls.name!r} format "
                f"{PARAMS_FORMAT} with features {list(FEATURES)}"
            )
        try:
            model = cls(
                prior_mean=params["prior_mean"],
                prior_std=params["prior_std"],
                nu=params["nu"],
                noise_prior_scale=params["noise_prior_scale"],
                noise_prior_weight=params["noise_prior_weight"],
                version=version,
            )
            model.mean = _vector("mean", params["mean"])
            cov = np.asarray(params["cov"], dtype=float)
            k = len(FEATURES)
            if cov.shape != (k, k) or not np.all(np.isfinite(cov)):
                raise RobonasError(f"gap params: cov must be a finite {k}x{k} matrix")
            model.cov = cov
            model.noise_scale = float(params["noise_scale"])
            model.n_observations = int(params.get("n_observations", 0))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, RobonasError):
                raise
            raise RobonasError(f"gap params: cannot read {dict(params)!r}: {e!r}") from e
        return model


# ----------------------------------------------------------------------------- store


def save_gap_model(store: Store, study_id: int, model: BayesianGapModel, metrics: Mapping[str, Any]) -> int:
    """Store `model` as the next "gap" version of the study; sets and returns the version."""
    row = store.add_model_version("gap", model.to_params(), dict(metrics), study_id=study_id)
    model.version = str(row.version)
    return int(row.version)


def load_gap_model(store: Store, study_id: int) -> BayesianGapModel | None:
    """The latest gap calibration of the study, or None when it has never been calibrated."""
    row = store.latest_model_version("gap", study_id=study_id)
    if row is None:
        return None
    return BayesianGapModel.from_params(row.params, version=row.version)
