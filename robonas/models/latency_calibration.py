"""The calibrated latency model: device roofline constants and a residual refitted from timings.

Agents benchmark deployed int8 models (BENCH reports: p50 and p99 of Invoke()). This module turns
such `LatencySample`s into a `CalibratedLatencyModel` for one device, in three steps:

1. Roofline constants. The prior `AnalyticLatencyModel` formula, plus a LayerNorm term,

       p50 = per_invoke + sum over layers of (max(macs * s_per_mac, bytes * s_per_byte) + per_layer)
                        + sum over LayerNorms of (per_layernorm + width * s_per_layernorm_element)

   is refitted in terms of the *inverse* rates (seconds per MAC, seconds per byte), the two
   overheads and the two LayerNorm constants, all bounded >= 0, with
   `scipy.optimize.least_squares`, starting from the device prior (each parameter is a multiple
   of its prior value, so all are of order one; the LayerNorm terms start at 0, the prior's
   view). The max() makes the model piecewise linear; least_squares' finite-difference Jacobian
   copes. Why LayerNorm has its own term: an int8 LayerNorm is not one kernel but a chain of
   reductions and elementwise ops with requantisation between them. Measured on the x86-host
   agent (16 fitting + 12 held-out cart-pole probes), it costs about 0.8 us + 7.5 ns per element,
   a hundred times what its bytes say, while a Linear layer's MACs are nearly free; with one
   cost per layer of any kind the fit missed LayerNorm nets by -13% to +24% (8 of 12 held out
   within +-10%), with this term by under 2% (12 of 12).
   Residuals are in log space (log predicted - log measured): timings span two decades across
   architectures and a relative error is what matters for a budget check.
2. Residual. What the roofline cannot express (an activation kind with a costlier kernel, an
   extra requantisation per LayerNorm) is a linear model of log(measured / roofline) on a few
   standardised features: log MACs, linear-layer count, LayerNorm on/off, share of tanh, elu and
   silu activations (relu is the baseline). Its coefficients carry a Gaussian shrinkage prior
   (ridge, prior std `RESIDUAL_PRIOR_STD` per standardised unit) so five samples cannot make it
   explode, and its correction is clipped to +-`RESIDUAL_CLIP` in log space: the physics stays in
   charge when a candidate lies outside the calibration set.
3. Tail. p99/p50 is the median of the measured ratios (at least 1).

Evaluation: `holdout_accuracy` gives the MAPE and the share within +-10% on held-out samples,
each with a 95% interval (a seeded percentile bootstrap on the MAPE, Wilson's score interval on
the share: with 12 held out, 12 of 12 still only shows the share is above 76%). Which
architectures to time: `select_probe_sets` picks a fitting set and a disjoint held-out set,
each covering the space by farthest-point sampling (one probe per distinct actor network).

Why robust: a timing on a non-real-time Linux box is sometimes hit by a scheduler hiccup, a
thermal throttle or a page fault, giving a p50 three to ten times too large. Plain least squares
(loss "linear") is dragged by such a point in proportion to its size; the Huber loss grows only
linearly past a scale, so an outlier's pull is bounded. The scale is set from the data: the
1.4826 * MAD of the residuals (a consistent estimate of the Gaussian sigma that outliers cannot
inflate), first around the prior, then around a first fit. `fit_roofline(..., robust=False)`
runs the same code with loss "linear", for comparison.

Caveat worth knowing: at int8 a Linear layer moves about as many bytes as it does MACs, so its
compute and memory times are nearly collinear; the byte rate is pinned down only by elementwise
layers (LayerNorm, activations, adds), which for tiny MLPs are dominated by per-op overhead. The
byte rate is therefore the least well determined constant on real data.

scipy does the optimisation; numpy the arithmetic; the store holds each fit as a versioned row of
kind "latency" for one device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import least_squares

from robonas.errors import ConfigError, RobonasError
from robonas.models.costs import LayerCost
from robonas.models.devices import DeviceProfile
from robonas.models.latency_model import (
    INT8_BYTES,
    AnalyticLatencyModel,
    HasActorCosts,
    LatencyModel,
    LatencyPrediction,
)
from robonas.space import PolicyArch, SearchSpace

if TYPE_CHECKING:
    from robonas.store import Store

PARAMS_FORMAT = 2  # 2 added the LayerNorm constants; format 1 rows load with them at 0
# Residual features, in order; the activation shares need the architecture, not only its costs.
RESIDUAL_FEATURES = ("log_macs", "n_linear", "layer_norm", "share_tanh", "share_elu", "share_silu")
_ACTIVATION_FEATURES = {"share_tanh": "tanh", "share_elu": "elu", "share_silu": "silu"}
# A one-standard-deviation feature change moves latency by about 5% a priori.
RESIDUAL_PRIOR_STD = 0.05
# The residual may change the roofline prediction by at most a factor 1.5 either way.
RESIDUAL_CLIP = math.log(1.5)
# Floor on the robust scale: 0.1% timing noise is as precise as any agent reports.
_MIN_SCALE = 1e-3
_MAD_TO_SIGMA = 1.4826
# Rates derived from a fitted inverse of 0 (the term vanished) are capped at this finite value.
_MAX_RATE = 1e30
MIN_SAMPLES = 4
# Extra starting points of the roofline fit (multiples of the prior parameters).
_BYTE_RATE_STARTS = (np.array([1.0, 0.1, 1.0, 1.0, 1.0, 1.0]), np.array([1.0, 10.0, 1.0, 1.0, 1.0, 1.0]))
# Scale of the LayerNorm element cost relative to the per-op overhead of the prior: a LayerNorm
# over 64 elements costs one more op. Only the scale of the fit's unknowns, not a prior value.
_LAYERNORM_ELEMENTS_PER_OP = 64.0


@dataclass(frozen=True)
class LatencySample:
    """One measured architecture: median and 99th-percentile inference time in milliseconds."""

    arch: PolicyArch
    p50_ms: float
    p99_ms: float

    def __post_init__(self) -> None:
        for key in ("p50_ms", "p99_ms"):
            value = getattr(self, key)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise RobonasError(f"LatencySample.{key} must be a finite number > 0, got {value!r}")
        if self.p99_ms < self.p50_ms:
            raise RobonasError(f"LatencySample.p99_ms ({self.p99_ms!r}) is below p50_ms ({self.p50_ms!r})")


# ----------------------------------------------------------------------------- features


def residual_features(costs: Sequence[LayerCost], arch: PolicyArch | None = None) -> NDArray[np.float64]:
    """Raw residual features (order `RESIDUAL_FEATURES`); activation shares NaN without `arch`."""
    macs = sum(c.macs for c in costs)
    n_linear = sum(1 for c in costs if c.kind == "linear")
    has_ln = any(c.kind == "layernorm" for c in costs)
    row = [math.log1p(macs), float(n_linear), float(has_ln)]
    for name in RESIDUAL_FEATURES[3:]:
        kind = _ACTIVATION_FEATURES[name]
        if arch is None:
            row.append(math.nan)
        else:
            row.append(sum(layer.activation == kind for layer in arch.layers) / len(arch.layers))
    return np.asarray(row, dtype=float)


def _robust_scale(r: NDArray[np.float64], center: bool) -> float:
    r = np.asarray(r, dtype=float)
    if center:
        r = r - np.median(r)
    return max(_MAD_TO_SIGMA * float(np.median(np.abs(r))), _MIN_SCALE)


# ----------------------------------------------------------------------------- the model


class CalibratedLatencyModel(LatencyModel):
    """Roofline with fitted constants, times exp(clipped residual), for one device profile.

    `predict_costs` refuses a device whose name differs from the prior it was fitted against: a
    Pi calibration applied to a Jetson profile is a bug, not a prediction. `predict(arch, ...)`
    uses every residual feature; `predict_costs` lacks the activation kinds and leaves those
    features at their training mean (no contribution).
    """

    name = "calibrated-roofline"

    def __init__(
        self,
        prior: DeviceProfile,
        s_per_mac: float,
        s_per_byte: float,
        per_layer_s: float,
        per_invoke_s: float,
        p99_over_p50: float,
        residual_mean: Sequence[float] | None = None,
        residual_scale: Sequence[float] | None = None,
        residual_coef: Sequence[float] | None = None,
        residual_intercept: float = 0.0,
        n_samples: int = 0,
        version: int = 0,
        *,
        per_layernorm_s: float = 0.0,
        s_per_layernorm_element: float = 0.0,
    ) -> None:
        k = len(RESIDUAL_FEATURES)
        self.prior = prior
        values = {
            "s_per_mac": s_per_mac,
            "s_per_byte": s_per_byte,
            "per_layer_s": per_layer_s,
            "per_invoke_s": per_invoke_s,
            "per_layernorm_s": per_layernorm_s,
            "s_per_layernorm_element": s_per_layernorm_element,
        }
        for key, value in values.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value >= 0)
            ):
                raise RobonasError(f"CalibratedLatencyModel.{key} must be finite and >= 0, got {value!r}")
        if not (isinstance(p99_over_p50, (int, float)) and math.isfinite(p99_over_p50) and p99_over_p50 >= 1):
            raise RobonasError(f"CalibratedLatencyModel.p99_over_p50 must be >= 1, got {p99_over_p50!r}")
        self.s_per_mac = float(s_per_mac)
        self.s_per_byte = float(s_per_byte)
        self.per_layer_s = float(per_layer_s)
        self.per_invoke_s = float(per_invoke_s)
        self.per_layernorm_s = float(per_layernorm_s)
        self.s_per_layernorm_element = float(s_per_layernorm_element)
        self.p99_over_p50 = float(p99_over_p50)
        self.residual_mean = np.asarray(residual_mean if residual_mean is not None else [0.0] * k, float)
        self.residual_scale = np.asarray(residual_scale if residual_scale is not None else [1.0] * k, float)
        self.residual_coef = np.asarray(residual_coef if residual_coef is not None else [0.0] * k, float)
        for label, arr in (
            ("residual_mean", self.residual_mean),
            ("residual_scale", self.residual_scale),
            ("residual_coef", self.residual_coef),
        ):
            if arr.shape != (k,) or not np.all(np.isfinite(arr)):
                raise RobonasError(
                    f"CalibratedLatencyModel.{label} must be {k} finite numbers "
                    f"(features {list(RESIDUAL_FEATURES)}), got {arr.tolist()!r}"
                )
        self.residual_intercept = float(residual_intercept)
        self.n_samples = int(n_samples)
        # The LatencyModel interface types version as a string ("name@version" in scores).
        self.version = str(int(version))

    # --- figures ---------------------------------------------------------------------------
    @property
    def compute_macs_per_s(self) -> float:
        return 1.0 / self.s_per_mac if self.s_per_mac > 1.0 / _MAX_RATE else _MAX_RATE

    @property
    def memory_bytes_per_s(self) -> float:
        return 1.0 / self.s_per_byte if self.s_per_byte > 1.0 / _MAX_RATE else _MAX_RATE

    @property
    def profile(self) -> DeviceProfile:
        """The prior profile with the fitted figures: what `AnalyticLatencyModel` is run on (the
        roofline part of a prediction; the LayerNorm term is added to it)."""
        return replace(
            self.prior,
            compute_macs_per_s=self.compute_macs_per_s,
            memory_bytes_per_s=self.memory_bytes_per_s,
            per_layer_overhead_us=self.per_layer_s * 1e6,
            per_invoke_overhead_us=self.per_invoke_s * 1e6,
            p99_over_p50=self.p99_over_p50,
        )

    # --- prediction ------------------------------------------------------------------------
    def log_correction(self, costs: Sequence[LayerCost], arch: PolicyArch | None = None) -> float:
        """The residual model's clipped log(measured / roofline) for these costs."""
        x = residual_features(costs, arch)
        z = (x - self.residual_mean) / self.residual_scale
        z = np.where(np.isnan(z), 0.0, z)  # unknown feature: at its training mean
        raw = self.residual_intercept + float(z @ self.residual_coef)
        return float(np.clip(raw, -RESIDUAL_CLIP, RESIDUAL_CLIP))

    def _check_device(self, device: DeviceProfile) -> None:
        if device.name != self.prior.name:
            raise RobonasError(
                f"this latency model was calibrated for device {self.prior.name!r}, "
                f"not {device.name!r}; load the calibration of {device.name!r} instead"
            )

    def _predict(
        self, costs: Sequence[LayerCost], device: DeviceProfile, arch: PolicyArch | None
    ) -> LatencyPrediction:
        self._check_device(device)
        base = AnalyticLatencyModel().predict_costs(costs, self.profile)
        layernorm_s = sum(
            self.per_layernorm_s + c.act_out * self.s_per_layernorm_element
            for c in costs
            if c.kind == "layernorm"
        )
        p50 = (base.p50_ms + layernorm_s * 1e3) * math.exp(self.log_correction(costs, arch))
        return LatencyPrediction(p50_ms=p50, p99_ms=p50 * self.p99_over_p50)

    def predict(self, arch: HasActorCosts, device: DeviceProfile) -> LatencyPrediction:
        full = arch if isinstance(arch, PolicyArch) else None
        return self._predict(arch.actor_layer_costs(), device, full)

    def predict_costs(self, costs: Sequence[LayerCost], device: DeviceProfile) -> LatencyPrediction:
        return self._predict(costs, device, None)

    # --- storage ---------------------------------------------------------------------------
    def to_params(self) -> dict[str, Any]:
        """JSON-serialisable parameters (a `model_versions` row of kind "latency")."""
        return {
            "format": PARAMS_FORMAT,
            "model": self.name,
            "prior": self.prior.to_dict(),
            "s_per_mac": self.s_per_mac,
            "s_per_byte": self.s_per_byte,
            "per_layer_s": self.per_layer_s,
            "per_invoke_s": self.per_invoke_s,
            "per_layernorm_s": self.per_layernorm_s,
            "s_per_layernorm_element": self.s_per_layernorm_element,
            "p99_over_p50": self.p99_over_p50,
            "residual": {
                "features": list(RESIDUAL_FEATURES),
                "mean": self.residual_mean.tolist(),
                "scale": self.residual_scale.tolist(),
                "coef": self.residual_coef.tolist(),
                "intercept": self.residual_intercept,
                "clip": RESIDUAL_CLIP,
            },
            "n_samples": self.n_samples,
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any], version: int = 0) -> CalibratedLatencyModel:
        if params.get("format") not in (1, PARAMS_FORMAT) or params.get("model") != cls.name:
            raise RobonasError(
                f"latency params: format {params.get('format')!r} / model {params.get('model')!r} "
                f"is not {cls.name!r} format 1 or {PARAMS_FORMAT}"
            )
        try:
            res = params["residual"]
            if list(res["features"]) != list(RESIDUAL_FEATURES):
                raise RobonasError(
                    f"latency params: residual features {res['features']!r} are not {list(RESIDUAL_FEATURES)}"
                )
            return cls(
                prior=DeviceProfile.from_mapping(params["prior"], origin="latency params prior"),
                s_per_mac=params["s_per_mac"],
                s_per_byte=params["s_per_byte"],
                per_layer_s=params["per_layer_s"],
                per_invoke_s=params["per_invoke_s"],
                p99_over_p50=params["p99_over_p50"],
                residual_mean=res["mean"],
                residual_scale=res["scale"],
                residual_coef=res["coef"],
                residual_intercept=res["intercept"],
                n_samples=params.get("n_samples", 0),
                version=version,
                per_layernorm_s=params.get("per_layernorm_s", 0.0),
                s_per_layernorm_element=params.get("s_per_layernorm_element", 0.0),
            )
        except (KeyError, TypeError) as e:
            raise RobonasError(f"latency params: cannot read {dict(params)!r}: {e!r}") from e


# ----------------------------------------------------------------------------- fitting


class _Design:
    """Per-layer MACs and int8 bytes of every sample, flattened for vectorised evaluation, and
    each sample's LayerNorm count and elements."""

    def __init__(self, costs: Sequence[Sequence[LayerCost]]) -> None:
        self.n = len(costs)
        self.owner = np.concatenate([np.full(len(c), i) for i, c in enumerate(costs)])
        self.macs = np.array([layer.macs for c in costs for layer in c], dtype=float)
        self.bytes = np.array([layer.bytes_moved(INT8_BYTES) for c in costs for layer in c], dtype=float)
        self.layers = np.array([len(c) for c in costs], dtype=float)
        self.norms = np.array([sum(x.kind == "layernorm" for x in c) for c in costs], dtype=float)
        self.norm_elements = np.array(
            [sum(x.act_out for x in c if x.kind == "layernorm") for c in costs], dtype=float
        )

    def seconds(self, theta: NDArray[np.float64]) -> NDArray[np.float64]:
        a, b, c, d, e, f = theta
        per_layer = np.maximum(a * self.macs, b * self.bytes)
        return (
            d
            + c * self.layers
            + np.bincount(self.owner, weights=per_layer, minlength=self.n)
            + e * self.norms
            + f * self.norm_elements
        )


def fit_roofline(
    samples: Sequence[LatencySample], device_prior: DeviceProfile, robust: bool = True
) -> CalibratedLatencyModel:
    """Fit roofline constants, residual and tail ratio to measured samples (module docstring).

    `robust=False` uses plain least squares everywhere (loss "linear") and the mean tail ratio,
    to show what outliers do.
    """
    samples = list(samples)
    if len(samples) < MIN_SAMPLES:
        raise RobonasError(
            f"latency calibration needs at least {MIN_SAMPLES} samples (4 roofline constants), "
            f"got {len(samples)}"
        )
    loss = "huber" if robust else "linear"
    costs = [s.arch.actor_layer_costs() for s in samples]
    design = _Design(costs)
    log_meas = np.log(np.array([s.p50_ms for s in samples]) * 1e-3)
    op_s = device_prior.per_layer_overhead_us * 1e-6 or 1e-6
    prior = np.array(
        [
            1.0 / device_prior.compute_macs_per_s,
            1.0 / device_prior.memory_bytes_per_s,
            # An overhead of 0 in the prior would pin its scale at 0; 1 us is a neutral unit.
            op_s,
            device_prior.per_invoke_overhead_us * 1e-6 or 1e-6,
            op_s,  # LayerNorm: scales of the unknowns, starting at 0 (below)
            op_s / _LAYERNORM_ELEMENTS_PER_OP,
        ]
    )

    def residuals(x: NDArray[np.float64]) -> NDArray[np.float64]:
        t = np.maximum(design.seconds(x * prior), 1e-15)
        return np.log(t) - log_meas

    # Two passes: the first scale is the spread around the prior (centred: the prior may be off
    # by a common factor), the second the spread around the first fit. The max() makes the cost
    # surface piecewise, with local minima where linear layers flip between compute- and
    # memory-bound, so each pass also starts from the byte rate ten times off either way and
    # keeps the lowest cost; the prior itself is always the first start.
    x = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])  # the prior: LayerNorm costs one layer, no more
    for center in (True, False):
        scale = _robust_scale(residuals(x), center=center)
        fits = [
            least_squares(
                residuals, start, bounds=(0.0, np.inf), loss=loss, f_scale=scale, x_scale="jac", method="trf"
            )
            for start in (x, x * _BYTE_RATE_STARTS[0], x * _BYTE_RATE_STARTS[1])
        ]
        x = min(fits, key=lambda f: f.cost).x
    theta = x * prior

    base_log_res = -residuals(x)  # log(measured / roofline)
    resid = _fit_residual(costs, [s.arch for s in samples], base_log_res, robust)
    ratios = np.array([s.p99_ms / s.p50_ms for s in samples])
    tail = max(1.0, float(np.median(ratios))) if robust else max(1.0, float(np.mean(ratios)))
    return CalibratedLatencyModel(
        prior=device_prior,
        s_per_mac=float(theta[0]),
        s_per_byte=float(theta[1]),
        per_layer_s=float(theta[2]),
        per_invoke_s=float(theta[3]),
        p99_over_p50=tail,
        n_samples=len(samples),
        per_layernorm_s=float(theta[4]),
        s_per_layernorm_element=float(theta[5]),
        **resid,
    )


def _fit_residual(
    costs: Sequence[Sequence[LayerCost]], archs: Sequence[PolicyArch], y: NDArray[np.float64], robust: bool
) -> dict[str, Any]:
    """Ridge-shrunk (robust) linear fit of log(measured / roofline) on standardised features."""
    X = np.array([residual_features(c, a) for c, a in zip(costs, archs, strict=True)])
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)  # a constant feature: its coefficient shrinks to 0
    Z = (X - mean) / scale
    k = Z.shape[1]

    def residuals(beta: NDArray[np.float64], s: float) -> NDArray[np.float64]:
        data = (y - beta[0] - Z @ beta[1:]) / s
        return np.concatenate([data, beta[1:] / RESIDUAL_PRIOR_STD])

    # The noise scale weighs data against the shrinkage prior: first the spread of y itself
    # (pessimistic), then the robust spread of what the first fit leaves unexplained.
    beta = np.zeros(k + 1)
    s = _robust_scale(y, center=True)
    for _ in range(2):
        beta = least_squares(
            residuals, beta, args=(s,), loss="huber" if robust else "linear", f_scale=1.0, method="trf"
        ).x
        s = _robust_scale(y - beta[0] - Z @ beta[1:], center=False)
    return {
        "residual_mean": mean.tolist(),
        "residual_scale": scale.tolist(),
        "residual_coef": beta[1:].tolist(),
        "residual_intercept": float(beta[0]),
    }


# ----------------------------------------------------------------------------- evaluation

# Two-sided 95% normal quantile: the level of every interval printed beside a held-out figure.
Z95 = 1.959963984540054
# Resamples of the bootstrap interval on the MAPE: the percentile ends move by well under 0.1%
# of the MAPE between seeds at this count, and it costs a millisecond for a dozen errors.
_BOOTSTRAP_RESAMPLES = 4000


def split_holdout(
    samples: Sequence[LatencySample], fraction: float, seed: int
) -> tuple[list[LatencySample], list[LatencySample]]:
    """(train, holdout): a seeded random `fraction` of the samples held out, both non-empty.

    For timings that arrive without a plan (run and canary reports); a calibration on an agent
    chooses its held-out architectures up front with `select_probe_sets` instead.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"holdout fraction must be a number in (0, 1), got {fraction!r}")
    samples = list(samples)
    n_hold = round(len(samples) * fraction)
    if n_hold < 1 or n_hold >= len(samples):
        raise ConfigError(
            f"holdout fraction {fraction!r} of {len(samples)} samples leaves an empty side; "
            f"use more samples or a fraction between {1 / max(len(samples), 1):.2g} and "
            f"{1 - 1 / max(len(samples), 1):.2g}"
        )
    order = np.random.default_rng(seed).permutation(len(samples))
    hold = set(order[:n_hold].tolist())
    return (
        [s for i, s in enumerate(samples) if i not in hold],
        [s for i, s in enumerate(samples) if i in hold],
    )


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a share k/n (95% by default).

    Chosen over the normal (Wald) interval because held-out shares sit near 100%, where Wald
    collapses to a zero-width interval at k = n; Wilson's stays honest: 12 of 12 is [76%, 100%].
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or not isinstance(k, int) or not 0 <= k <= n:
        raise RobonasError(f"wilson_interval: need integers 0 <= k <= n, n >= 1; got k={k!r}, n={n!r}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean_interval(
    values: Sequence[float] | NDArray[np.float64], level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`; seeded, so the same errors always
    print the same interval.

    Relative errors are skewed (bounded below by 0, a long tail above), which a t interval
    ignores; the percentile bootstrap follows the skew. With a dozen values it is a little too
    narrow (it under-covers by a few points), which the printed level does not hide.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size < 1 or not np.all(np.isfinite(x)):
        raise RobonasError(f"bootstrap_mean_interval: need 1 or more finite values, got {x.tolist()!r}")
    if not 0 < level < 1:
        raise RobonasError(f"bootstrap_mean_interval: level must be in (0, 1), got {level!r}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(_BOOTSTRAP_RESAMPLES, x.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def holdout_accuracy(
    model: LatencyModel, samples: Sequence[LatencySample], device: DeviceProfile | None = None
) -> dict[str, float]:
    """p50 accuracy on held-out samples, each figure with its 95% interval.

    Keys: "mape" (mean absolute percentage error) with "mape_lo"/"mape_hi" (bootstrap),
    "within_10pct" (share predicted within +-10%) with "k_within_10pct" and "within_10pct_lo"/
    "within_10pct_hi" (Wilson), and "n". `device` defaults to the calibrated model's own profile
    (required for other models).
    """
    samples = list(samples)
    if not samples:
        raise RobonasError("holdout_accuracy needs at least 1 sample, got 0")
    if device is None:
        if not isinstance(model, CalibratedLatencyModel):
            raise RobonasError(f"holdout_accuracy: pass the device for a {type(model).__name__}")
        device = model.prior
    rel = np.array([abs(model.predict(s.arch, device).p50_ms - s.p50_ms) / s.p50_ms for s in samples])
    k = int(np.sum(rel <= 0.10))
    share_lo, share_hi = wilson_interval(k, len(samples))
    mape_lo, mape_hi = bootstrap_mean_interval(rel)
    return {
        "mape": float(rel.mean()),
        "mape_lo": mape_lo,
        "mape_hi": mape_hi,
        "within_10pct": k / len(samples),
        "k_within_10pct": k,
        "within_10pct_lo": share_lo,
        "within_10pct_hi": share_hi,
        "n": len(samples),
    }


# ----------------------------------------------------------------------------- which archs to time


def actor_signature(arch: PolicyArch) -> tuple[Any, ...]:
    """What the compiled actor depends on: its ops with their shapes, and each layer's activation.

    Architectures that differ only where the actor does not (a shared or separate critic trunk;
    `residual` where no two consecutive widths match, so no skip is built) compile to the same
    model: one of them is a probe, the others would be copies of it.
    """
    return (tuple(arch.actor_layer_costs()), tuple(layer.activation for layer in arch.layers))


def _probe_pool(space: SearchSpace, n: int, seed: int) -> list[PolicyArch]:
    """A seeded sample of the space, one architecture per distinct actor, in a fixed order."""
    rng = np.random.default_rng(seed)
    pool: dict[str, PolicyArch] = {}
    for _ in range(max(40 * n, 400)):
        arch = space.sample(rng)
        pool.setdefault(arch.arch_id, arch)
    by_actor: dict[tuple[Any, ...], PolicyArch] = {}
    for arch in sorted(pool.values(), key=lambda a: a.arch_id):
        by_actor.setdefault(actor_signature(arch), arch)
    return list(by_actor.values())


def _coverage_features(space: SearchSpace, archs: Sequence[PolicyArch]) -> tuple[NDArray[np.float64], ...]:
    """(features, log MACs): each decision scaled to [0, 1], the residual decision replaced by
    the share of skips actually built and the trunk decision dropped (neither changes the
    actor as such), plus log MACs with weight 2 so that cost is spread as well as shape."""
    d = space.max_depth
    res_col, trunk_col = 1 + 2 * d + 1, 1 + 2 * d + 2
    cards = np.maximum(np.array(space.cardinalities(), dtype=float) - 1.0, 1.0)
    enc = np.array([space.encode(a) for a in archs], dtype=float) / cards
    costs = [a.actor_layer_costs() for a in archs]
    skips = [sum(c.kind == "add" for c in cs) for cs in costs]
    enc[:, res_col] = [k / max(len(a.layers) - 1, 1) for k, a in zip(skips, archs, strict=True)]
    enc[:, trunk_col] = 0.0
    log_macs = np.log1p([sum(c.macs for c in cs) for cs in costs])
    span = max(float(log_macs.max() - log_macs.min()), 1e-12)
    return np.column_stack([enc, 2.0 * (log_macs - log_macs.min()) / span]), log_macs


def _farthest_points(
    feats: NDArray[np.float64], log_macs: NDArray[np.float64], candidates: Sequence[int], n: int
) -> list[int]:
    """`n` of `candidates` by farthest-point sampling, from their cheapest and costliest member."""
    cand = np.asarray(candidates, dtype=int)
    first = [int(cand[np.argmin(log_macs[cand])]), int(cand[np.argmax(log_macs[cand])])]
    chosen = list(dict.fromkeys(first))[:n]
    dist = np.min([np.linalg.norm(feats[cand] - feats[i], axis=1) for i in chosen], axis=0)
    dist[np.isin(cand, chosen)] = -np.inf  # never twice, even where two points coincide
    while len(chosen) < n:
        j = int(np.argmax(dist))
        chosen.append(int(cand[j]))
        dist = np.minimum(dist, np.linalg.norm(feats[cand] - feats[cand[j]], axis=1))
        dist[j] = -np.inf
    return chosen


def select_probe_sets(
    space: SearchSpace, n_fit: int, n_holdout: int, seed: int
) -> tuple[list[PolicyArch], list[PolicyArch]]:
    """(fit, holdout): two disjoint sets of architectures that each cover the space; deterministic.

    A seeded pool of samples (one per distinct actor network) is reduced by farthest-point
    sampling over the decision vectors plus log MACs (`_coverage_features`), starting from the
    cheapest and the most expensive pool member: first the `n_fit` fitting architectures, then,
    from what is left, the `n_holdout` held-out ones by the same rule on their own. The held-out
    set is chosen to cover the space (its widths, depths and cost range), not made of whatever a
    random split leaves over, and shares no actor network with the fitting set, so a held-out
    error is an error on a network the fit never saw.
    """
    for label, value, low in (("fitting", n_fit, 1), ("held-out", n_holdout, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"number of {label} calibration archs must be an int >= {low}, got {value!r}")
    archs = _probe_pool(space, n_fit + n_holdout, seed)
    if n_holdout == 0 and n_fit >= len(archs):
        return archs, []
    if n_fit + n_holdout > len(archs):
        raise ConfigError(
            f"the space has {len(archs)} distinct actor networks (in a sample of it); "
            f"{n_fit} fitting + {n_holdout} held-out probes need {n_fit + n_holdout}: ask for fewer"
        )
    feats, log_macs = _coverage_features(space, archs)
    fit = _farthest_points(feats, log_macs, range(len(archs)), n_fit)
    taken = set(fit)
    rest = [i for i in range(len(archs)) if i not in taken]
    hold = _farthest_points(feats, log_macs, rest, n_holdout) if n_holdout else []
    return [archs[i] for i in fit], [archs[i] for i in hold]


def select_calibration_archs(space: SearchSpace, n: int, seed: int) -> list[PolicyArch]:
    """`n` distinct architectures (distinct actor networks) that cover the space and its cost
    range; deterministic. The fitting set of `select_probe_sets` with nothing held out."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"number of calibration archs must be an int >= 1, got {n!r}")
    return select_probe_sets(space, n, 0, seed)[0]


# ----------------------------------------------------------------------------- store


def save_latency_model(
    store: Store, device_name: str, model: CalibratedLatencyModel, metrics: Mapping[str, Any]
) -> int:
    """Store `model` as the next "latency" version of `device_name`; sets and returns the version."""
    row = store.add_model_version("latency", model.to_params(), dict(metrics), device=device_name)
    model.version = str(row.version)
    return int(row.version)


def load_latency_model(store: Store, device_name: str) -> CalibratedLatencyModel | None:
    """The latest calibration of `device_name`, or None when it has never been calibrated."""
    row = store.latest_model_version("latency", device=device_name)
    if row is None:
        return None
    return CalibratedLatencyModel.from_params(row.params, version=row.version)
