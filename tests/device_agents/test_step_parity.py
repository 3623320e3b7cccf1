"""The agent's step is faster (issue 18) and its arithmetic is unchanged: the same actions, bit for
bit, as the step before the change, on recorded and random observations.

`ReferencePolicy` below is the arithmetic of `device_agents.runtime.TFLitePolicy` before the
change (`act`, `quantize_input`, `invoke`, `dequantize_output`, `_set_normalisation`, copied from
git at the commit before), on an interpreter of its own. It is the fixed point these tests compare
against: do not "fix" it to follow the runtime. Actions are compared as their float32 bit
patterns, so a -0.0 or another NaN would count as a difference.

Compared: `act` (float32 and float64 observations, with and without `out`), `act_in_place` on
`observation_buffer`, the input tensor written by `quantize_input`, the dequantisation of every
int8 code, for int8 and fp32 models, with and without `input_normalisation` (clipped and not);
and the actions `run_episodes` records (history 1 on a recorded cart-pole run of the sim twin,
history 5 and 17 on a replay robot) against the reference stacking. The same comparison runs in
the robot venv (tflite_runtime, numpy<2), where numpy's casting rules differ.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agents import runtime
from device_agents.control_loop import run_episodes
from device_agents.robots.base import Robot
from device_agents.runtime import TFLitePolicy
from device_agents.trajectory import decode
from tests.device_agents.test_agent import test_models


class ReferencePolicy:
    """TFLitePolicy's step before issue 18 (git: device_agents/runtime.py at abab96b), trimmed to
    its arithmetic; only numpy and the interpreter class."""

    def __init__(self, model: bytes, input_normalisation: dict[str, Any] | None = None):
        interpreter_class = runtime.load_interpreter_class()
        self._data = bytes(model)
        self._interp = interpreter_class(model_content=self._data, num_threads=1)
        self._interp.allocate_tensors()
        self.input = _Spec(self._interp.get_input_details()[0])
        self.output = _Spec(self._interp.get_output_details()[0])
        self._in = np.zeros(self.input.shape, self.input.dtype)
        self._in_f = np.zeros(self.input.shape, np.float32)
        self._out_f = np.zeros(self.output.size, np.float32)
        self._in_zero, self._out_zero = float(self.input.zero_point), float(self.output.zero_point)
        self._in_min = self._in_max = 0.0
        if self.input.quantized:
            info = np.iinfo(self.input.dtype)
            self._in_min, self._in_max = float(info.min), float(info.max)
        self.input_normalisation = None
        if input_normalisation is not None:
            norm = dict(input_normalisation)
            for key in ("mean", "std"):
                norm[key] = np.asarray(norm[key], np.float64).ravel()
            norm["clip"] = None if norm["clip"] is None else float(norm["clip"])
            self._set_normalisation(norm)

    def _set_normalisation(self, norm: dict[str, Any]) -> None:
        self.input_normalisation = norm
        mean, std, clip = norm["mean"], norm["std"], norm["clip"]
        shape = self.input.shape
        if self.input.quantized:
            k = 1.0 / (std * self.input.scale)
            self._a = (k).reshape(shape).astype(np.float32)
            self._b = (self.input.zero_point - mean * k).reshape(shape).astype(np.float32)
            if clip is not None:
                zp, s = self.input.zero_point, self.input.scale
                self._in_min = max(self._in_min, float(np.rint(-clip / s + zp)))
                self._in_max = min(self._in_max, float(np.rint(clip / s + zp)))
        else:
            self._mean = mean.reshape(shape).astype(np.float32)
            self._inv_std = (1.0 / std).reshape(shape).astype(np.float32)
            self._clip = None if clip is None else np.float32(clip)

    def quantize_input(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs)
        assert obs.size == self.input.size
        obs = obs.reshape(self.input.shape)
        f = self._in_f
        if not self.input.quantized:
            if self.input_normalisation is None:
                np.copyto(self._in, obs, casting="same_kind")
                return self._in
            np.subtract(obs, self._mean, out=f, casting="same_kind")
            np.multiply(f, self._inv_std, out=f)
            if self._clip is not None:
                np.maximum(f, -self._clip, out=f)
                np.minimum(f, self._clip, out=f)
            np.copyto(self._in, f, casting="same_kind")
            return self._in
        if self.input_normalisation is None:
            np.divide(obs, self.input.scale, out=f, casting="same_kind")
            np.rint(f, out=f)
            np.add(f, self._in_zero, out=f)
        else:
            np.multiply(obs, self._a, out=f, casting="same_kind")
            np.add(f, self._b, out=f)
            np.rint(f, out=f)
        np.maximum(f, self._in_min, out=f)
        np.minimum(f, self._in_max, out=f)
        np.copyto(self._in, f, casting="unsafe")
        return self._in

    def invoke(self) -> None:
        self._interp.set_tensor(self.input.index, self._in)
        self._interp.invoke()

    def dequantize_output(self, raw: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        if raw is None:
            raw = self._interp.get_tensor(self.output.index)
        dst = self._out_f if out is None else out
        np.copyto(dst, np.reshape(raw, dst.shape), casting="unsafe")
        if self.output.quantized:
            np.subtract(dst, self._out_zero, out=dst)
            np.multiply(dst, self.output.scale, out=dst)
        return dst

    def act(self, obs: np.ndarray) -> np.ndarray:
        self.quantize_input(obs)
        self.invoke()
        return self.dequantize_output().copy()


class _Spec:
    """The reference's tensor description (index, shape, dtype, scale, zero point)."""

    def __init__(self, details: dict[str, Any]):
        self.index = int(details["index"])
        self.shape = tuple(int(d) for d in details["shape"])
        self.dtype = np.dtype(details["dtype"])
        scale, zero_point = details.get("quantization", (0.0, 0))
        self.scale, self.zero_point = float(scale), int(zero_point)
        self.size = int(np.prod(self.shape))
        self.quantized = self.dtype.kind in "iu" and self.scale > 0.0


def _bits(a: np.ndarray) -> np.ndarray:
    """float32 values as their bit patterns: equal means bit for bit."""
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def _norm(size: int, seed: int, clip: float | None) -> dict[str, Any]:
    """Statistics of very different spreads (1e-3 .. 3), as a trained policy's."""
    rng = np.random.default_rng(seed)
    return {
        "mean": rng.normal(0, 2, size).tolist(),
        "std": np.exp(rng.uniform(np.log(1e-3), np.log(3.0), size)).tolist(),
        "clip": clip,
    }


def _observations(policy: TFLitePolicy, norm: dict[str, Any] | None, n: int = 3000) -> np.ndarray:
    """`n` raw observations for `policy`'s input, float64 (cast them for float32 ones):
    normalised values from a standard normal and a wide uniform (beyond the clip and the int8
    range) mapped back through `norm`, and for an int8 input a quarter on the quantisation's .5
    ties (obs * a + b or obs / scale = k + 0.5 in exact arithmetic), where rounding decides."""
    size, scale, zero_point = policy.input.size, policy.input.scale, policy.input.zero_point
    rng = np.random.default_rng(size + n)
    extremes = [np.full((1, size), v) for v in (0.0, 1e4, -1e4, 2.5)]
    m = n - n // 4 if scale > 0 else n
    z = np.concatenate(
        [rng.standard_normal((m // 2, size)), rng.uniform(-8.0, 8.0, (m - m // 2 - 4, size)), *extremes]
    )
    mean = np.zeros(size) if norm is None else np.asarray(norm["mean"])
    std = np.full(size, 40 * scale or 1.0) if norm is None else np.asarray(norm["std"])
    obs = mean + std * z
    if scale > 0:
        k = rng.integers(-140, 140, (n - m, size)) + 0.5 - zero_point
        ties = k * scale if norm is None else mean + k * std * scale
        obs = np.concatenate([obs, ties])
    return obs


@pytest.fixture(scope="module")
def models(policy_models) -> dict[str, bytes]:
    """The int8 and fp32 models of both test suites, and the NaN model (a NaN must pass as one)."""
    agent = test_models()
    return {
        "int8-17": policy_models.int8,
        "fp32-17": policy_models.fp32,
        "int8-5": agent["good"],
        "fp32-5": agent["good2"],
        "nan-5": agent["nan"],
    }


NORMS = ("bare", "clip", "noclip")  # no input_normalisation; clipped at 2.5; not clipped


def _norm_for(kind: str, size: int) -> dict[str, Any] | None:
    return None if kind == "bare" else _norm(size, seed=size, clip=2.5 if kind == "clip" else None)


@pytest.mark.parametrize("name", ["int8-17", "fp32-17", "int8-5", "fp32-5", "nan-5"])
@pytest.mark.parametrize("norm_kind", NORMS)
def test_act_is_bit_for_bit_the_reference(models, name, norm_kind) -> None:
    model = models[name]
    probe = TFLitePolicy(model)
    norm = _norm_for(norm_kind, probe.input.size)
    ref = ReferencePolicy(model, norm)
    new = TFLitePolicy(model, input_normalisation=norm)
    obs64 = _observations(new, norm)
    obs = obs64.astype(np.float32)
    out = np.zeros(new.output.size, np.float32)
    want, got_act, got_out, got_place, got_f64, want_f64 = [], [], [], [], [], []
    q_differs = 0
    with np.errstate(all="ignore"):  # the extremes overflow the int8 range on purpose
        for o in obs:
            want.append(ref.act(o))
            ref_q = ref._in.copy()
            got_act.append(new.act(o))
            q_differs += not np.array_equal(new._in, ref_q)
            got_out.append(new.act(o, out=out).copy())
            new.observation_buffer[...] = o
            got_place.append(new.act_in_place().copy())
        for o in obs64[-600:]:  # float64 observations (ties included) take float64 arithmetic
            want_f64.append(ref.act(o))
            got_f64.append(new.act(o))
    assert q_differs == 0
    for got in (got_act, got_out, got_place):
        np.testing.assert_array_equal(_bits(np.stack(got)), _bits(np.stack(want)))
    np.testing.assert_array_equal(_bits(np.stack(got_f64)), _bits(np.stack(want_f64)))
    if name.startswith("nan"):
        assert np.isnan(np.stack(want)).all()
    else:  # the observations reach both sides of the output's range: not a constant action
        assert len(np.unique(np.stack(want)[:, 0])) > 10


def test_every_int8_code_dequantises_as_before(models) -> None:
    for name in ("int8-17", "int8-5"):
        ref, new = ReferencePolicy(models[name]), TFLitePolicy(models[name])
        codes = np.arange(-128, 128, dtype=np.int8)
        size = new.output.size
        for chunk in np.resize(codes, (-(-256 // size), size)):  # every code, in output-sized rows
            raw = chunk.reshape(new.output.shape)
            want = ref.dequantize_output(raw).copy()
            np.testing.assert_array_equal(_bits(new.dequantize_output(raw)), _bits(want))
            out = np.zeros(size, np.float32)
            np.testing.assert_array_equal(_bits(new.dequantize_output(raw, out=out)), _bits(want))
        # a float64 `out` keeps the float64 arithmetic it always had
        raw = codes[: new.output.size].reshape(new.output.shape)
        want64 = ref.dequantize_output(raw, out=np.zeros(new.output.size, np.float64))
        np.testing.assert_array_equal(new.dequantize_output(raw, out=np.zeros(new.output.size)), want64)


def test_act_in_place_returns_the_policys_own_buffer(models) -> None:
    """act_in_place hands back the policy's action buffer: the loop must copy it (it does)."""
    new = TFLitePolicy(models["int8-5"])
    new.observation_buffer[...] = 0.3
    first = new.act_in_place()
    assert first is new.act_in_place() and first.dtype == np.float32 and first.shape == (1,)
    assert new.observation_buffer.shape == (5,) and new.observation_buffer.dtype == np.float32


# --- through the control loop --------------------------------------------------------------------
class ReplayRobot(Robot):
    """Hands out recorded observations in order, one per step; 1 Hz so no step is ever late.
    Keeps the actions it is handed as they are (`kept`), as the sim twin's queue does."""

    name = "replay"

    def __init__(self, observations: np.ndarray, episode_len: int, action_size: int = 1):
        self.obs = np.asarray(observations, np.float32)
        self.len, self.act = episode_len, action_size
        self.n = self.t = 0
        self.kept: list[np.ndarray] = []

    observation_size = property(lambda self: self.obs.shape[1])
    action_size = property(lambda self: self.act)
    control_hz = property(lambda self: 1.0)

    def reset(self, seed=None):
        self.t = 0
        return self._next()

    def _next(self) -> np.ndarray:
        row = self.obs[self.n % len(self.obs)]
        self.n += 1
        return row.astype(np.float64)  # a robot may hand float64: the loop rounds it to float32

    def step(self, action, latency_s=0.0):
        self.kept.append(action)
        self.t += 1
        return self._next(), 0.0, self.t >= self.len


def _reference_episodes(ref: ReferencePolicy, record: dict, history: int, pad: np.ndarray) -> list:
    """The actions the old loop computed for each recorded episode: the stack (pad, then the
    observations oldest first) through the reference step."""
    out = []
    for ep in decode(record):
        frames = np.tile(pad, history).astype(np.float32)
        actions = []
        d = ep.obs.shape[1]
        for t in range(ep.steps):
            frames[:-d] = frames[d:]
            frames[-d:] = ep.obs[t]
            actions.append(ref.act(frames))
        out.append((ep, np.array(actions, np.float32).reshape(ep.steps, -1)))
    return out


@pytest.mark.parametrize(
    "name, norm_kind, history",
    [("int8-5", "clip", 5), ("fp32-5", "bare", 5), ("int8-17", "bare", 17), ("fp32-17", "clip", 17)],
)
def test_run_episodes_records_the_reference_actions_with_history(models, name, norm_kind, history) -> None:
    model = models[name]
    size = TFLitePolicy(model).input.size
    norm = _norm_for(norm_kind, size)
    new = TFLitePolicy(model, input_normalisation=norm)
    raw = _observations(new, norm, n=400).astype(np.float32)
    obs = raw.reshape(-1, size // history)  # consecutive values of the stacked input, one per step
    pad = obs[7]
    robot = ReplayRobot(obs, episode_len=150, action_size=new.output.size)
    report = run_episodes(
        new, robot, 3, 0, history=history, fast=True, record=True, history_pad=pad.tolist(), deadline_s=60.0
    )
    assert report["steps"] == 450 and report["fallback_ticks"] == 0 and report["clipped_actions"] == 0
    ref = ReferencePolicy(model, norm)
    episodes = _reference_episodes(ref, report["record"], history, pad)
    for ep, want in episodes:
        np.testing.assert_array_equal(_bits(ep.action), _bits(want))
        assert len(np.unique(want)) > 10
    # what the robot kept is what it was handed then, not the policy's buffer of a later step
    kept, handed = np.stack(robot.kept), np.concatenate([w for _, w in episodes])
    np.testing.assert_array_equal(_bits(kept), _bits(handed))


def test_run_episodes_on_a_recorded_cartpole_run(models) -> None:
    """History 1 on the sim twin: the record's observations are the robot's own."""
    pytest.importorskip("pybullet")
    from device_agents.robots import make_robot

    new = TFLitePolicy(models["int8-5"])
    with make_robot("sim:cartpole-lab-a", fast=True) as robot:
        report = run_episodes(new, robot, 20, 3, fast=True, record=True, deadline_s=60.0)
    ref = ReferencePolicy(models["int8-5"])
    episodes = _reference_episodes(ref, report["record"], 1, np.zeros(5, np.float32))
    assert sum(ep.steps for ep, _ in episodes) >= 50
    for ep, want in episodes:
        # the twin's limits are [-1, 1]; the loop clips to them (the tanh actor stays inside)
        np.testing.assert_array_equal(_bits(ep.action), _bits(np.clip(want, -1.0, 1.0)))


# --- the robot venv: tflite_runtime and numpy<2 ---------------------------------------------------
_ROBOT_SCRIPT = """
import json, sys
from typing import Any
import numpy as np
from device_agents import runtime
from device_agents.runtime import TFLitePolicy
{reference}
{spec}
result = {{"runtime": runtime.runtime_name(), "numpy": np.__version__, "cases": []}}
for arg in sys.argv[1:]:
    model_file, norm_file, obs_file = arg.split("::")
    norm = json.loads(open(norm_file).read())
    model = open(model_file, "rb").read()
    ref, new = ReferencePolicy(model, norm), TFLitePolicy(model, input_normalisation=norm)
    bad = 0
    with np.errstate(all="ignore"):
        for o64 in np.load(obs_file):
            o = o64.astype(np.float32)
            want = ref.act(o).view(np.uint32)
            new.observation_buffer[...] = o
            bad += not np.array_equal(new.act(o).view(np.uint32), want)
            bad += not np.array_equal(new.act_in_place().copy().view(np.uint32), want)
            bad += not np.array_equal(new.act(o64).view(np.uint32), ref.act(o64).view(np.uint32))
    result["cases"].append(bad)
print(json.dumps(result))
"""


def test_robot_venv_steps_bit_for_bit_as_before(models, tmp_path: Path) -> None:
    from tests.device_agents.robot_venv import RobotVenvError, robot_python

    try:
        python = robot_python()
    except RobotVenvError as e:
        pytest.skip(str(e))
    args = []
    for i, name in enumerate(("int8-17", "fp32-17", "int8-5", "fp32-5")):
        probe = TFLitePolicy(models[name])
        size = probe.input.size
        for j, kind in enumerate(NORMS):
            norm = _norm_for(kind, size)
            (tmp_path / f"m{i}.tflite").write_bytes(models[name])
            (tmp_path / f"n{i}{j}.json").write_text(json.dumps(norm))
            np.save(tmp_path / f"o{i}{j}.npy", _observations(probe, norm, n=1000))
            args.append(
                f"{tmp_path / f'm{i}.tflite'}::{tmp_path / f'n{i}{j}.json'}::{tmp_path / f'o{i}{j}.npy'}"
            )
    script = _ROBOT_SCRIPT.format(reference=inspect.getsource(ReferencePolicy), spec=inspect.getsource(_Spec))
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != runtime.ENV_VAR}
    env["PYTHONPATH"] = str(repo)
    proc = subprocess.run(
        [str(python), "-c", script, *args], env=env, capture_output=True, text=True, check=False, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["runtime"] == "tflite_runtime" and result["numpy"].startswith("1.")
    assert result["cases"] == [0] * len(args)


# --- the benchmark -------------------------------------------------------------------------------
def test_the_benchmark_times_invoke_bench_step_and_loop_in_one_run(models, tmp_path: Path) -> None:
    from robonas.bench.agent_step import bench_agent_step, format_agent_step

    path = tmp_path / "m.tflite"
    path.write_bytes(models["int8-5"])
    result = bench_agent_step(path, steps=600, rounds=3, warmup=50)
    assert result["robot"] == "null" and result["history"] == 1 and result["rounds"] == 3
    assert result["loop_steps"] == 3 * 200 and result["input_dtype"] == "int8"
    p50 = result["p50_us"]
    assert all(len(v) == 3 for v in result["round_p50_us"].values())
    # the bench step contains the invoke; no ratio is asserted (a benchmark figure, not a test)
    assert 0 < p50["invoke"] < p50["bench_step"] and p50["loop_step"] > 0
    assert result["ratios"]["loop_step"] == pytest.approx(p50["loop_step"] / p50["invoke"])
    text = format_agent_step(result)
    assert "loop step" in text and "x invoke" in text
    with pytest.raises(ValueError, match="input of 5 values is not 2 frames"):
        bench_agent_step(path, steps=10, robot="null", history=2)
