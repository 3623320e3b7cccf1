"""device_agents.runtime, .bench and .cli: on the host (ai_edge_litert) and in a robot-style venv
(tflite_runtime, numpy<2, no torch); input normalisation fused into the int8 quantisation, and
artifact directories (`TFLitePolicy(directory)`, bench on a directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_agents import runtime
from device_agents.cli import main
from device_agents.errors import DeviceError, ModelError
from device_agents.runtime import TFLitePolicy, check_tflite

REPO = Path(__file__).resolve().parents[2]


# --- the policy -------------------------------------------------------------------------------
def test_fp32_policy_describes_itself_and_matches_torch(policy_models) -> None:
    import torch

    policy = TFLitePolicy(policy_models.fp32_path)
    arch = policy_models.arch
    assert policy.input_shape == (1, arch.input_dim) and policy.output_shape == (1, arch.act_dim)
    assert policy.input_dtype == np.float32 and policy.output_dtype == np.float32
    assert policy.input_quantization == (0.0, 0)
    assert policy.model_size == len(policy_models.fp32)
    obs = policy_models.holdout[:20]
    with torch.no_grad():
        ref = policy_models.module(torch.from_numpy(obs)).numpy()
    got = np.stack([policy.act(o.astype(np.float64)) for o in obs])  # float64 obs are accepted
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_macs_count_the_fully_connected_weights(policy_models) -> None:
    """What a sim twin emulating a slower computer charges for: one MAC per FC weight."""
    macs = policy_models.arch.cost_summary()["macs"]
    assert macs == 17 * 64 + 64 * 64 + 64 * 6
    for model in (policy_models.fp32, policy_models.int8):
        assert TFLitePolicy(model).macs == macs


def test_int8_quantize_and_dequantize_follow_the_tensor_parameters(policy_models) -> None:
    policy = TFLitePolicy(policy_models.int8)
    scale, zero_point = policy.input_quantization
    # below, inside and above the representable range: rounding and saturation
    obs = np.linspace(-200 * scale, 200 * scale, policy.input_shape[1]).astype(np.float32)
    q = policy.quantize_input(obs)
    expected = np.clip(np.rint(obs / scale) + zero_point, -128, 127).astype(np.int8)
    assert q.dtype == np.int8 and q.shape == policy.input_shape
    np.testing.assert_array_equal(q.ravel(), expected)
    policy.invoke()
    raw = policy.raw_output()
    out_scale, out_zero = policy.output_quantization
    action = policy.dequantize_output(raw)
    np.testing.assert_allclose(action, (raw.ravel().astype(np.float32) - out_zero) * out_scale, rtol=1e-6)
    # extreme int8 values do not overflow in the dequantisation
    extreme = np.array([[-128, 127] * 3], np.int8)
    np.testing.assert_allclose(
        policy.dequantize_output(extreme),
        (extreme.ravel().astype(np.float64) - out_zero) * out_scale,
        rtol=1e-6,
    )


def test_act_reuses_out_and_returns_fresh_arrays_otherwise(policy_models) -> None:
    policy = TFLitePolicy(policy_models.int8)
    out = np.zeros(policy_models.arch.act_dim, np.float32)
    a = policy.act(policy_models.holdout[0])
    b = policy.act(policy_models.holdout[1])
    assert a is not b and not np.array_equal(a, b)
    assert policy.act(policy_models.holdout[0], out=out) is out
    np.testing.assert_array_equal(out, a)


# --- input normalisation ---------------------------------------------------------------------
def _norm(size: int, seed: int = 0, clip=2.5) -> dict:
    """Per-element statistics of very different spreads (1e-3 .. 3), as a trained policy has."""
    rng = np.random.default_rng(seed)
    return {
        "mean": rng.normal(0, 2, size).tolist(),
        "std": np.exp(rng.uniform(np.log(1e-3), np.log(3.0), size)).tolist(),
        "clip": clip,
    }


def _raw(norm: dict, z: np.ndarray) -> np.ndarray:
    """Raw observations that normalise to `z`."""
    return (np.asarray(norm["mean"]) + np.asarray(norm["std"]) * z).astype(np.float32)


def test_int8_normalisation_is_fused_into_the_quantisation(policy_models) -> None:
    size = policy_models.arch.input_dim
    norm = _norm(size)
    policy = TFLitePolicy(policy_models.int8, input_normalisation=norm)
    scale, zero_point = policy.input_quantization
    plain = TFLitePolicy(policy_models.int8)
    # normalised values inside, at and beyond the clip and beyond the int8 range
    for z in (policy_models.holdout[:20], np.linspace(-6, 6, 4 * size).reshape(4, size)):
        for zi in z.astype(np.float32):
            raw = _raw(norm, zi)
            expected = np.clip(np.rint(np.clip(zi, -2.5, 2.5) / scale) + zero_point, -128, 127)
            # one step apart at most where float32 rounding meets a .5 tie
            q = policy.quantize_input(raw).astype(np.int64).ravel()
            assert np.abs(q - expected).max() <= 1 and (q != expected).mean() < 0.05
            # and the step equals the plain model fed the normalised, clipped observation
            np.testing.assert_allclose(
                policy.act(raw), plain.act(np.clip(zi, -2.5, 2.5)), atol=2 * plain.output.scale
            )
    assert policy.input_normalisation == {**norm, "clip": 2.5}


def test_int8_clip_wider_than_the_tensor_range_is_the_int8_saturation(policy_models) -> None:
    norm = _norm(policy_models.arch.input_dim, clip=1e6)
    policy = TFLitePolicy(policy_models.int8, input_normalisation=norm)
    q = policy.quantize_input(_raw(norm, np.full(policy_models.arch.input_dim, 1e4)))
    assert (q == 127).all()
    q = policy.quantize_input(_raw(norm, np.full(policy_models.arch.input_dim, -1e4)))
    assert (q == -128).all()


def test_fp32_normalisation_matches_torch_on_normalised_input(policy_models) -> None:
    import torch

    norm = _norm(policy_models.arch.input_dim, seed=1)
    policy = TFLitePolicy(policy_models.fp32, input_normalisation=norm)
    z = policy_models.holdout[:20]
    with torch.no_grad():
        ref = policy_models.module(torch.from_numpy(np.clip(z, -2.5, 2.5))).numpy()
    got = np.stack([policy.act(_raw(norm, zi)) for zi in z])
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())
    # no clip: the normalised value passes as it is
    unclipped = TFLitePolicy(policy_models.fp32, input_normalisation={**norm, "clip": None})
    zi = np.full(policy_models.arch.input_dim, 4.0, np.float32)
    np.testing.assert_allclose(unclipped.quantize_input(_raw(norm, zi)).ravel(), zi, rtol=1e-4)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"mean": [0.0] * 3}, "mean has 3 values, the model takes 17"),
        ({"std": [0.0] * 17}, r"std must be finite and > 0"),
        ({"std": [float("nan")] * 17}, r"std must be finite"),
        ({"mean": ["a"] * 17}, "mean is not a list of numbers"),
        ({"clip": -1.0}, "clip -1.0 is not a positive number or null"),
        ({"clip": True}, "clip True"),
        ({"scale": 1.0}, "keys mean, std, clip"),
    ],
)
def test_bad_normalisation(policy_models, change, match) -> None:
    norm = {**_norm(policy_models.arch.input_dim), **change}
    with pytest.raises(ModelError, match=match):
        TFLitePolicy(policy_models.int8, input_normalisation=norm)


def _artifact(directory: Path, model: bytes, norm: dict | None) -> Path:
    import hashlib

    directory.mkdir()
    (directory / "policy.tflite").write_bytes(model)
    manifest = {"sha256": hashlib.sha256(model).hexdigest(), "model_file": "policy.tflite"}
    if norm is not None:
        manifest["input_normalisation"] = norm
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_artifact_dir_reads_the_manifest(policy_models, tmp_path: Path) -> None:
    norm = _norm(policy_models.arch.input_dim)
    d = _artifact(tmp_path / "a", policy_models.int8, norm)
    policy = TFLitePolicy(d)
    direct = TFLitePolicy(policy_models.int8, input_normalisation=norm)
    assert policy.manifest["input_normalisation"] == norm and policy.source.endswith("policy.tflite")
    raw = _raw(norm, policy_models.holdout[0])
    np.testing.assert_array_equal(policy.act(raw), direct.act(raw))
    # no input_normalisation in the manifest: the identity
    bare = TFLitePolicy(_artifact(tmp_path / "b", policy_models.int8, None))
    assert bare.input_normalisation is None
    np.testing.assert_array_equal(bare.act(raw), TFLitePolicy(policy_models.int8).act(raw))
    with pytest.raises(ModelError, match="comes from the artifact's manifest"):
        TFLitePolicy(d, input_normalisation=norm)


def test_artifact_dir_bad_directories(policy_models, tmp_path: Path) -> None:
    d = _artifact(tmp_path / "a", policy_models.int8, None)
    (d / "policy.tflite").write_bytes(policy_models.fp32)
    with pytest.raises(ModelError, match="does not match the manifest's sha256"):
        TFLitePolicy(d)
    (d / "manifest.json").write_text("[1, 2")
    with pytest.raises(ModelError, match=r"manifest.json is not valid JSON"):
        TFLitePolicy(d)
    (d / "manifest.json").write_text(json.dumps({"model_file": "../policy.tflite"}))
    with pytest.raises(ModelError, match=r"model_file '../policy.tflite' is not a file name"):
        TFLitePolicy(d)
    (d / "manifest.json").unlink()
    with pytest.raises(ModelError, match=r"cannot read manifest.json"):
        TFLitePolicy(d)


def test_wrong_observation_size(policy_models) -> None:
    policy = TFLitePolicy(policy_models.fp32)
    with pytest.raises(ModelError, match="observation has 5 values, the model takes 17"):
        policy.act(np.zeros(5, np.float32))


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_bad_threads(policy_models, threads) -> None:
    with pytest.raises(DeviceError, match="threads"):
        TFLitePolicy(policy_models.fp32, threads=threads)


# --- bad files ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "not a TFLite model"),
        (b"TFL3", "not a TFLite model"),
        (b"\x00" * 64, "not a TFLite model"),
        (b"PK\x03\x04" + b"\x00" * 60, "not a TFLite model"),  # a zip, say
    ],
)
def test_not_tflite(data: bytes, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        TFLitePolicy(data)


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_every_truncation_is_a_model_error(policy_models, which: str) -> None:
    # tflite_runtime segfaults on most of these if it gets them: the check must catch them all
    data = getattr(policy_models, which)
    for cut in range(0, len(data), 7):
        with pytest.raises(ModelError, match=r"not a TFLite model|truncated or corrupt"):
            check_tflite(data[:cut])
    with pytest.raises(ModelError, match="truncated"):
        TFLitePolicy(data[:-1])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read model file"):
        TFLitePolicy(tmp_path / "absent.tflite")


# --- choosing the interpreter -------------------------------------------------------------------
@pytest.fixture
def fresh_runtime(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(runtime, "_loaded", None)
    return monkeypatch


def test_env_var_rejects_unknown_runtime(fresh_runtime) -> None:
    fresh_runtime.setenv(runtime.ENV_VAR, "tensorflow")
    with pytest.raises(DeviceError, match=r"'tensorflow' is not a TFLite runtime.*tflite_runtime"):
        runtime.load_interpreter_class()


def test_env_var_forces_a_runtime(fresh_runtime) -> None:
    fresh_runtime.setenv(runtime.ENV_VAR, "ai_edge_litert")
    from ai_edge_litert.interpreter import Interpreter

    assert runtime.load_interpreter_class() is Interpreter
    assert runtime.runtime_name() == "ai_edge_litert"
    assert runtime.runtime_version()[0].isdigit()


def test_no_runtime_installed_is_a_device_error(fresh_runtime) -> None:
    def missing(name: str):
        raise ImportError(f"No module named {name!r}")

    fresh_runtime.setattr(runtime, "_import_runtime", missing)
    with pytest.raises(DeviceError, match=r"no usable TFLite interpreter.*tflite_runtime.*ai_edge"):
        runtime.load_interpreter_class()


# --- bench and the CLI --------------------------------------------------------------------------
def _check_bench(result: dict, model_bytes: int) -> None:
    for key in (
        "model",
        "model_bytes",
        "runtime",
        "runtime_version",
        "threads",
        "runs",
        "warmup",
        "input_shape",
        "input_dtype",
        "input_quantization",
        "output_shape",
        "output_dtype",
        "output_quantization",
        "init_us",
        "first_us",
        "warmup_mean_us",
        "invoke_us",
        "step_us",
    ):
        assert key in result, key
    assert result["model_bytes"] == model_bytes
    for span in ("invoke_us", "step_us"):
        s = result[span]
        assert 0 < s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"], s
    # the step contains the invoke
    assert result["step_us"]["p50"] >= result["invoke_us"]["p50"]


def test_cli_bench_json(policy_models, capsys) -> None:
    code = main(["bench", str(policy_models.int8_path), "--runs", "300", "--warmup", "5", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    _check_bench(result, len(policy_models.int8))
    assert result["runs"] == 300 and result["input_dtype"] == "int8"
    assert result["runtime"] == "ai_edge_litert"


def test_cli_bench_artifact_dir(policy_models, capsys, tmp_path: Path) -> None:
    d = _artifact(tmp_path / "a", policy_models.int8, _norm(policy_models.arch.input_dim))
    assert main(["bench", str(d), "--runs", "50", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    _check_bench(result, len(policy_models.int8))
    assert result["model"] == str(d) and result["input_dtype"] == "int8"


def test_cli_bench_table(policy_models, capsys) -> None:
    assert main(["bench", str(policy_models.fp32_path), "--runs", "50"]) == 0
    out = capsys.readouterr().out
    assert "invoke" in out and "p99" in out and "float32" in out


@pytest.mark.parametrize(
    "argv_tail, match",
    [
        (["--runs", "0"], "runs: 0"),
        (["--threads", "0"], "threads: 0"),
    ],
)
def test_cli_bad_numbers(policy_models, capsys, argv_tail, match) -> None:
    assert main(["bench", str(policy_models.fp32_path), *argv_tail]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_cli_truncated_file_exits_2_with_one_line(policy_models, tmp_path: Path) -> None:
    bad = tmp_path / "cut.tflite"
    bad.write_bytes(policy_models.fp32[: len(policy_models.fp32) // 2])
    proc = subprocess.run(
        [sys.executable, "-m", "device_agents", "bench", str(bad)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "truncated or corrupt" in proc.stderr
    assert str(bad) in proc.stderr and proc.stdout == ""


def test_cli_imports_no_numpy() -> None:
    code = "import sys, device_agents.cli; print('numpy' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.stdout.strip() == "False", proc.stderr


# --- the robot venv: tflite_runtime, numpy<2, no torch ------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != runtime.ENV_VAR}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def robot_python() -> Path:
    from tests.device_agents.robot_venv import RobotVenvError, robot_python

    try:
        return robot_python()
    except RobotVenvError as e:
        pytest.skip(str(e))


_ROBOT_SCRIPT = """
import importlib.util, json, sys
import numpy as np
from device_agents.runtime import TFLitePolicy, runtime_name
result = {"runtime": runtime_name(), "numpy": np.__version__,
          "host_only": [m for m in ("torch", "pybullet", "gymnasium")
                        if importlib.util.find_spec(m) is not None]}
for arg in sys.argv[1:]:
    name, obs_file = arg.split("::")  # a model file or an artifact dir, its observations
    obs = np.load(obs_file)
    policy = TFLitePolicy(name)
    raws, acts = [], []
    for o in obs:
        acts.append(policy.act(o).tolist())
        raws.append(policy.raw_output().ravel().tolist())
    result[name] = {"act": acts, "raw": raws, "macs": policy.macs}
print(json.dumps(result))
"""


def test_robot_venv_matches_host(policy_models, robot_python: Path, tmp_path: Path) -> None:
    z = policy_models.holdout[:50]
    norm = _norm(policy_models.arch.input_dim)
    observations = {  # bare models get normalised observations, artifacts raw ones
        str(policy_models.fp32_path): z,
        str(policy_models.int8_path): z,
        str(_artifact(tmp_path / "fp32", policy_models.fp32, norm)): _raw(norm, z),
        str(_artifact(tmp_path / "int8", policy_models.int8, norm)): _raw(norm, z),
    }
    args = []
    for i, (path, obs) in enumerate(observations.items()):
        np.save(tmp_path / f"obs{i}.npy", obs)
        args.append(f"{path}::{tmp_path / f'obs{i}.npy'}")
    proc = subprocess.run(
        [str(robot_python), "-c", _ROBOT_SCRIPT, *args],
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    robot = json.loads(proc.stdout)
    assert robot["runtime"] == "tflite_runtime" and robot["numpy"].startswith("1.")
    assert robot["host_only"] == []
    for path, obs in observations.items():
        host = TFLitePolicy(path)
        host_act, host_raw = [], []
        for o in obs:
            host_act.append(host.act(o))
            host_raw.append(host.raw_output().ravel())
        robot_act = np.array(robot[path]["act"], np.float32)
        assert robot[path]["macs"] == host.macs  # tflite_runtime lists its ops too
        if host.output.quantized:
            # the same int8 kernels: equal, or one step apart where a rounding differs
            diff = np.abs(np.array(robot[path]["raw"]) - np.array(host_raw, np.int64))
            assert diff.max() <= 1, diff.max()
            assert np.abs(robot_act - np.array(host_act)).max() <= host.output.scale * 1.0001
        else:
            np.testing.assert_allclose(robot_act, np.array(host_act), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("what", ["file", "artifact"])
def test_robot_venv_cli_bench(policy_models, robot_python: Path, tmp_path: Path, what) -> None:
    target = (
        policy_models.int8_path
        if what == "file"
        else _artifact(tmp_path / "a", policy_models.int8, _norm(policy_models.arch.input_dim))
    )
    proc = subprocess.run(
        [str(robot_python), "-m", "device_agents", "bench", str(target), "--runs", "300", "--json"],
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    _check_bench(result, len(policy_models.int8))
    assert result["runtime"] == "tflite_runtime" and result["runtime_version"].startswith("2.")


def test_robot_venv_refuses_truncated_model_without_crashing(
    policy_models, robot_python: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "cut.tflite"
    bad.write_bytes(policy_models.int8[:100])  # tflite_runtime alone segfaults on this
    proc = subprocess.run(
        [str(robot_python), "-m", "device_agents", "bench", str(bad)],
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 2 and "truncated or corrupt" in proc.stderr


def test_a_dropped_policy_is_freed_at_once(policy_models) -> None:
    """The step's closures hold the buffers and the interpreter, not the policy: no reference
    cycle, so an agent replacing its policy frees the old interpreter without waiting for the
    cycle collector."""
    import gc
    import weakref

    gc.disable()
    try:
        for model in (policy_models.int8, policy_models.fp32):
            policy = TFLitePolicy(model, input_normalisation=_norm(policy_models.arch.input_dim))
            policy.act_in_place()
            ref = weakref.ref(policy)
            del policy
            assert ref() is None
    finally:
        gc.enable()
