"""Shared fixtures: one small policy converted to TFLite once per session (fp32 and int8).

Conversion costs seconds (litert-torch, ai-edge-quantizer), so the host and device tests share
these models instead of converting their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@dataclass(frozen=True)
class PolicyModels:
    arch: object  # robonas.space.PolicyArch
    module: object  # the torch actor, eval mode
    calibration: np.ndarray  # (N, input_dim) float32 the int8 model was calibrated on
    holdout: np.ndarray  # (M, input_dim) float32 from the same distribution, not calibrated on
    fp32: bytes
    int8: bytes
    fp32_path: Path
    int8_path: Path


@pytest.fixture(scope="session")
def policy_models(tmp_path_factory: pytest.TempPathFactory) -> PolicyModels:
    """A 64x64 tanh actor (obs 17, act 6, like HalfCheetah) as fp32 and int8 TFLite."""
    torch = pytest.importorskip("torch")
    from robonas.export.tflite_convert import to_tflite_fp32, to_tflite_int8
    from robonas.space import Layer, PolicyArch

    torch.manual_seed(0)
    arch = PolicyArch(obs_dim=17, act_dim=6, layers=(Layer(64, "tanh"), Layer(64, "tanh")))
    module = arch.build_actor().eval()
    rng = np.random.default_rng(0)
    # normalised observations: what the exported policy sees after folded-in normalisation
    calibration = rng.standard_normal((512, arch.input_dim)).astype(np.float32)
    holdout = rng.standard_normal((200, arch.input_dim)).astype(np.float32)
    fp32 = to_tflite_fp32(module, arch.input_dim)
    int8 = to_tflite_int8(module, calibration)
    out = tmp_path_factory.mktemp("models")
    (out / "policy_fp32.tflite").write_bytes(fp32)
    (out / "policy_int8.tflite").write_bytes(int8)
    return PolicyModels(
        arch, module, calibration, holdout, fp32, int8, out / "policy_fp32.tflite", out / "policy_int8.tflite"
    )


@pytest.fixture(scope="session")
def postgres_server():
    """URL of a throwaway PostgreSQL server for the session (skips where none can start)."""
    from tests.postgres_cluster import start_cluster, unavailable

    why = unavailable()
    if why:
        pytest.skip(why)
    with start_cluster() as url:
        yield url
