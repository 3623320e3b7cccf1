"""robonas.export.tflite_convert: fp32 parity with torch, int8 accuracy and tensor types, errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from device_agents.runtime import TFLitePolicy  # noqa: E402  (ai_edge_litert on the host)
from robonas.errors import ConfigError, RobonasError  # noqa: E402
from robonas.export.tflite_convert import to_tflite_fp32, to_tflite_int8  # noqa: E402
from robonas.space import Layer, PolicyArch  # noqa: E402

ARCHS = {
    "relu": PolicyArch(obs_dim=11, act_dim=3, layers=(Layer(32, "relu"), Layer(32, "relu"))),
    "tanh-layernorm": PolicyArch(
        obs_dim=8, act_dim=2, layers=(Layer(48, "tanh"), Layer(48, "tanh")), layer_norm=True
    ),
    "elu-residual": PolicyArch(obs_dim=17, act_dim=6, layers=(Layer(64, "elu"),) * 3, residual=True),
    "silu-layernorm-residual": PolicyArch(
        obs_dim=5,
        act_dim=1,
        layers=(Layer(24, "silu"), Layer(24, "silu")),
        layer_norm=True,
        residual=True,
        history=3,
    ),
}


def _torch_out(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _tflite_out(model: bytes, x: np.ndarray) -> np.ndarray:
    policy = TFLitePolicy(model)
    return np.stack([policy.act(row) for row in x])


def _seeded_module(arch: PolicyArch):
    torch.manual_seed(1)
    module = arch.build_actor()
    # non-trivial LayerNorm affine parameters, so a dropped scale/shift would show
    for m in module.modules():
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    return module.eval()


@pytest.mark.parametrize("name", list(ARCHS))
def test_fp32_matches_torch(name: str) -> None:
    arch = ARCHS[name]
    module = _seeded_module(arch)
    model = to_tflite_fp32(module, arch.input_dim)
    assert model[4:8] == b"TFL3"
    x = np.random.default_rng(2).normal(0, 2, (64, arch.input_dim)).astype(np.float32)
    ref, got = _torch_out(module, x), _tflite_out(model, x)
    assert got.shape == ref.shape == (64, arch.act_dim)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_fp32_conversion_is_quiet_and_keeps_training_mode(capfd) -> None:
    module = ARCHS["relu"].build_actor().train()
    to_tflite_fp32(module, ARCHS["relu"].input_dim)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert module.training  # the caller's module is left as it was


def _int8_error(module, model: bytes, calibration: np.ndarray, holdout: np.ndarray):
    """(max, mean) |int8 - torch| on held-out inputs, as fractions of the output range."""
    ref_calib = _torch_out(module, calibration)
    out_range = float(ref_calib.max() - ref_calib.min())
    err = np.abs(_tflite_out(model, holdout) - _torch_out(module, holdout))
    return err.max() / out_range, err.mean() / out_range


# Bound: per-tensor int8 gives each tensor 255 steps over its calibrated range; every layer adds
# up to half a step of rounding to its output and the next layer sums 24..64 of those errors, so
# a 2-3 layer MLP lands a few output steps off on average and ~15-20 steps (1/255 of the range
# each) in the worst of a few hundred samples. Measured on these seeded archs: mean 0.2-0.6%,
# max 5-8% of the output range. The bounds leave ~2x margin yet fail for real bugs: calibrating
# with the quantiser's default moving-average ranges gave a 35% max error, a wrong zero point or
# scale is off by tens of percent.
INT8_MAX_ERR, INT8_MEAN_ERR = 0.12, 0.01


def test_int8_model_has_int8_io_and_is_accurate(policy_models) -> None:
    policy = TFLitePolicy(policy_models.int8)
    assert policy.input_dtype == np.int8 and policy.output_dtype == np.int8
    assert policy.input_shape == (1, policy_models.arch.input_dim)
    assert policy.output_shape == (1, policy_models.arch.act_dim)
    assert policy.input_quantization[0] > 0 and policy.output_quantization[0] > 0
    assert len(policy_models.int8) < len(policy_models.fp32)
    max_err, mean_err = _int8_error(
        policy_models.module, policy_models.int8, policy_models.calibration, policy_models.holdout
    )
    assert max_err <= INT8_MAX_ERR and mean_err <= INT8_MEAN_ERR, (max_err, mean_err)


def test_int8_with_layernorm_and_residual_is_accurate() -> None:
    arch = ARCHS["silu-layernorm-residual"]
    module = _seeded_module(arch)
    rng = np.random.default_rng(3)
    calibration = rng.standard_normal((512, arch.input_dim)).astype(np.float32)
    holdout = rng.standard_normal((200, arch.input_dim)).astype(np.float32)
    model = to_tflite_int8(module, calibration)
    max_err, mean_err = _int8_error(module, model, calibration, holdout)
    assert max_err <= INT8_MAX_ERR and mean_err <= INT8_MEAN_ERR, (max_err, mean_err)


def test_int8_input_range_covers_calibration(policy_models) -> None:
    scale, zero_point = TFLitePolicy(policy_models.int8).input_quantization
    low, high = (-128 - zero_point) * scale, (127 - zero_point) * scale
    calib = policy_models.calibration
    # full min/max of all samples, not a moving average of per-sample ranges
    assert low <= calib.min() + scale and high >= calib.max() - scale


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_input_dim(bad) -> None:
    with pytest.raises(ConfigError, match="input_dim"):
        to_tflite_fp32(ARCHS["relu"].build_actor(), bad)


@pytest.mark.parametrize(
    "calibration, match",
    [
        (np.zeros((4,), np.float32), "shape"),
        (np.zeros((0, 11), np.float32), "shape"),
        (np.full((4, 11), np.nan, np.float32), "finite"),
    ],
)
def test_bad_calibration(calibration, match) -> None:
    with pytest.raises(ConfigError, match=match):
        to_tflite_int8(ARCHS["relu"].build_actor(), calibration)


def test_not_a_module() -> None:
    with pytest.raises(RobonasError, match=r"torch\.nn\.Module"):
        to_tflite_fp32(lambda x: x, 4)  # type: ignore[arg-type]


class _Untraceable(torch.nn.Module):
    def forward(self, x):
        return torch.from_numpy(x.numpy() * 2)  # leaves torch: torch.export cannot trace it


def test_export_failure_is_a_robonas_error() -> None:
    with pytest.raises(RobonasError, match=r"cannot convert _Untraceable with input \(1, 4\)"):
        to_tflite_fp32(_Untraceable(), 4)


def test_wrong_input_dim_for_module_is_a_robonas_error() -> None:
    with pytest.raises(RobonasError, match="cannot convert Actor"):
        to_tflite_fp32(ARCHS["relu"].build_actor(), 7)  # the module takes 11
