"""Run a policy `.tflite` model on the robot: pick an interpreter, check the file, step the policy.

Leans on whichever TFLite interpreter the robot has: `tflite_runtime` (most robots; needs
numpy<2) or `ai_edge_litert` (its successor; numpy 2). Both expose the same `Interpreter` class.
`ROBONAS_TFLITE_RUNTIME=tflite_runtime|ai_edge_litert` forces one.

Three things are done by hand, on purpose:
- The file check. `tflite_runtime` 2.14 does not verify a flatbuffer before using it: a
  truncated model segfaults the agent instead of raising. So before the interpreter sees the
  bytes we walk the parts of the TFLite schema the interpreter reads (model, subgraphs,
  tensors, operators, buffers, signatures) and check that every table, vector and string lies
  inside the file. Only the standard library's `struct` is needed, which keeps the robot free of
  the `flatbuffers`/TensorFlow schema packages.
- Quantisation of the input and dequantisation of the output (int8 models have int8 input and
  output tensors), done with numpy ufuncs into buffers allocated once, so a control step
  allocates no arrays of its own; see "The step" below.
- Observation normalisation; see "Observation normalisation" below.

The step (issue 18: the Python around the invoke cost twice the invoke). On a policy's few dozen
values every numpy call costs its fixed overhead (~0.3 us here), not its arithmetic, so the step
is the fewest calls that keep the arithmetic bit for bit what it was (tests/device_agents/
test_step_parity.py holds the earlier step as its reference):
- `observation_buffer` + `act_in_place()`: the control loop writes the (stacked) observation into
  the policy's own float32 buffer and steps with no argument: no asarray, reshape or size check,
  and the action comes back in the policy's own buffer (no copy; the caller copies what it keeps).
- the path (int8 or float input, normalised or not) and every operand are resolved once, into
  two closures (`_input_stage`, `_output_stage`) whose variables are read faster than a policy's
  attributes (about 1 us a step less than methods here); they hold the buffers and the
  interpreter, never the policy, so a dropped policy is freed at once. Scalar operands are 0-d
  float32 arrays: for a float32 operand they select the same float32 loop with the same value
  (float32(x)) as the python floats they replace, without a scalar conversion per call (0.33 us
  against 0.63 us a call here).
- an 8-bit output is dequantised by one lookup in a 256-entry table made at load time with the
  dequantisation's own ufuncs (`take(mode="wrap")`, so an int8 code indexes it directly), in
  place of a cast, a subtraction and a multiplication.
- the interpreter is written and read with `set_tensor`/`get_tensor`, its documented copies. A
  `tensor()` view would spare the copy of a few bytes, not a call: the view cannot be held across
  `invoke` (the runtime refuses to invoke while one exists), so it is made anew each step, which
  costs what `set_tensor` does.

Observation normalisation (the contract of the manifest's `input_normalisation`; the robot side
owns it, `robonas.export` writes to it). In training SB3's `VecNormalize` normalised every frame
as clip((obs - mean) / sqrt(var + epsilon), +-clip_obs), before `VecFrameStack` stacked the
history. That step is NOT in the exported graph: the manifest carries it as
`input_normalisation` = {mean: [...], std: [...], clip: c or null}, one mean and std per element
of the stacked input (std = sqrt(var + epsilon), tiled over the history), and this runtime applies
it; exported models take the NORMALISED observation. For an int8 input the affine map is fused
into the quantisation, q = clip(round(obs * a + b), lo, hi) with a = 1 / (std * scale),
b = zero_point - mean / (std * scale) per element. That is per-feature input quantisation, which
TFLite does not offer for activations: folding the normalisation into the graph instead leaves
one int8 scale for raw features of very different ranges, and narrow features drown (cart-pole:
cart position spans +-2.4 while cos(theta) moves by 0.003; the input rounding alone cost a mean
action error of 0.09 in [-1, 1]). Normalised, every feature gets ~255 steps over its own spread.
The clip folds into the integer bounds: rounding is monotone, so clipping z to +-clip before
quantising equals clipping q to [round(-clip / scale + zp), round(clip / scale + zp)] after. fp32
models use the same scheme ((x - mean) * inv_std, then the clip, as torch computes it), so there
is one graph, one manifest layout and one runtime path for both. `check_normalisation` validates
the field; `TFLitePolicy._set_normalisation` precomputes the maps.

An artifact directory given as the model (`manifest.json` + `policy.tflite`, read with the
standard library) applies its manifest's `input_normalisation`, so agent, bench and host share
one entry point, `act(raw_obs)`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np

from device_agents.errors import DeviceError, ModelError

ENV_VAR = "ROBONAS_TFLITE_RUNTIME"
# Preference order when both are installed: tflite_runtime is what robots ship today.
RUNTIMES = {
    "tflite_runtime": "tflite_runtime.interpreter",
    "ai_edge_litert": "ai_edge_litert.interpreter",
}
TFLITE_IDENTIFIER = b"TFL3"
# An artifact directory as robonas.export.artifact writes it.
MANIFEST_FILE, MODEL_FILE = "manifest.json", "policy.tflite"
NORMALISATION_KEYS = ("mean", "std", "clip")

ModelSource = Union[bytes, bytearray, memoryview, str, Path]

_loaded: tuple[str, Any] | None = None


def _import_runtime(name: str) -> Any:
    module = importlib.import_module(RUNTIMES[name])
    return module.Interpreter


def load_interpreter_class() -> Any:
    """The `Interpreter` class of the TFLite runtime in use (chosen once per process)."""
    global _loaded
    if _loaded is not None:
        return _loaded[1]
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced and forced not in RUNTIMES:
        raise DeviceError(
            f"{ENV_VAR}={forced!r} is not a TFLite runtime; choose one of {', '.join(RUNTIMES)}"
        )
    failures = []
    for name in [forced] if forced else list(RUNTIMES):
        try:
            interpreter_class = _import_runtime(name)
        except Exception as e:  # noqa: BLE001  (tflite_runtime under numpy 2 fails with more than ImportError)
            failures.append(f"{name}: {type(e).__name__}: {e}".splitlines()[0])
            continue
        _loaded = (name, interpreter_class)
        return interpreter_class
    raise DeviceError(
        "no usable TFLite interpreter (install tflite-runtime with numpy<2, or ai-edge-litert): "
        + "; ".join(failures)
    )


def runtime_name() -> str:
    load_interpreter_class()
    assert _loaded is not None
    return _loaded[0]


def runtime_version() -> str:
    name = runtime_name()
    version = getattr(importlib.import_module(name), "__version__", None)
    if version:
        return str(version)
    from importlib import metadata

    try:
        return metadata.version(name.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return "unknown"


# --- file check --------------------------------------------------------------------------------
# Schema fragments from tensorflow/lite/schema/schema.fbs, limited to the fields holding offsets:
# field index -> (name, kind). A kind is ("str",), ("vec", element size), ("table", schema or
# None) or ("tables", schema or None); None means "check the table's own bounds, not its fields".
_STR = ("str",)
_VEC4 = ("vec", 4)
_ANY_TABLE = ("table", None)
_QUANTIZATION = {
    0: ("min", _VEC4),
    1: ("max", _VEC4),
    2: ("scale", _VEC4),
    3: ("zero_point", ("vec", 8)),
    5: ("details", _ANY_TABLE),
}
_TENSOR = {
    0: ("shape", _VEC4),
    3: ("name", _STR),
    4: ("quantization", ("table", _QUANTIZATION)),
    6: ("sparsity", _ANY_TABLE),
    7: ("shape_signature", _VEC4),
    9: ("variant_tensors", ("tables", None)),
}
_OPERATOR = {
    1: ("inputs", _VEC4),
    2: ("outputs", _VEC4),
    4: ("builtin_options", _ANY_TABLE),
    5: ("custom_options", ("vec", 1)),
    7: ("mutating_variable_inputs", ("vec", 1)),
    8: ("intermediates", _VEC4),
    12: ("builtin_options_2", _ANY_TABLE),
}
_SUBGRAPH = {
    0: ("tensors", ("tables", _TENSOR)),
    1: ("inputs", _VEC4),
    2: ("outputs", _VEC4),
    3: ("operators", ("tables", _OPERATOR)),
    4: ("name", _STR),
}
_TENSOR_MAP = {0: ("name", _STR)}
_SIGNATURE = {
    0: ("inputs", ("tables", _TENSOR_MAP)),
    1: ("outputs", ("tables", _TENSOR_MAP)),
    2: ("signature_key", _STR),
    3: ("deprecated_tag", _STR),
}
_BUFFER = {0: ("data", ("vec", 1))}
_MODEL = {
    1: ("operator_codes", ("tables", {1: ("custom_code", _STR)})),
    2: ("subgraphs", ("tables", _SUBGRAPH)),
    3: ("description", _STR),
    4: ("buffers", ("tables", _BUFFER)),
    5: ("metadata_buffer", _VEC4),
    6: ("metadata", ("tables", {0: ("name", _STR)})),
    7: ("signature_defs", ("tables", _SIGNATURE)),
}
_BUFFER_OFFSET_FIELD, _BUFFER_SIZE_FIELD = 1, 2  # u64 data outside the flatbuffer, from file start


class _Truncated(Exception):
    pass


class _FlatbufferCheck:
    """Bounds check of a TFLite flatbuffer (see the module docstring for why it exists)."""

    def __init__(self, data: bytes):
        self.data = data
        self.n = len(data)

    def need(self, pos: int, size: int, what: str) -> None:
        if pos < 0 or size < 0 or pos + size > self.n:
            raise _Truncated(f"{what} at byte {pos} (+{size}) lies outside the {self.n}-byte file")

    def u32(self, pos: int, what: str) -> int:
        self.need(pos, 4, what)
        return struct.unpack_from("<I", self.data, pos)[0]

    def table_fields(self, pos: int, what: str) -> dict[int, int]:
        """Field index -> absolute position of each present field of the table at `pos`."""
        self.need(pos, 4, what)
        vtable = pos - struct.unpack_from("<i", self.data, pos)[0]
        self.need(vtable, 4, f"{what} vtable")
        vsize, tsize = struct.unpack_from("<HH", self.data, vtable)
        if vsize < 4 or vsize % 2:
            raise _Truncated(f"{what} has a malformed vtable (size {vsize})")
        self.need(vtable, vsize, f"{what} vtable")
        self.need(pos, tsize, what)
        fields = {}
        for i in range((vsize - 4) // 2):
            off = struct.unpack_from("<H", self.data, vtable + 4 + 2 * i)[0]
            if off:
                if off >= tsize:
                    raise _Truncated(f"{what} field {i} lies outside its table")
                fields[i] = pos + off
        return fields

    def follow(self, field_pos: int, what: str) -> int:
        return field_pos + self.u32(field_pos, what)

    def vector(self, pos: int, elem_size: int, what: str) -> int:
        length = self.u32(pos, what)
        self.need(pos + 4, length * elem_size, what)
        return length

    def table(self, pos: int, schema: dict | None, what: str) -> dict[int, int]:
        fields = self.table_fields(pos, what)
        for index, (field, kind) in (schema or {}).items():
            if index not in fields:
                continue
            name = f"{what}.{field}"
            target = self.follow(fields[index], name)
            if kind[0] == "str":
                self.need(target + 4, self.u32(target, name) + 1, name)  # +1: the NUL
            elif kind[0] == "vec":
                self.vector(target, kind[1], name)
            elif kind[0] == "table":
                self.table(target, kind[1], name)
            else:  # a vector of tables: each element is an offset relative to itself
                for i in range(self.vector(target, 4, name)):
                    elem = target + 4 + 4 * i
                    self.table(self.follow(elem, name), kind[1], f"{name}[{i}]")
        return fields

    def model(self) -> None:
        root = self.u32(0, "root offset")
        self.table(root, _MODEL, "model")
        self.external_buffers(root)

    def external_buffers(self, root: int) -> None:
        # Large models keep tensor data after the flatbuffer (Buffer.offset/size, u64).
        fields = self.table_fields(root, "model")
        if 4 not in fields:
            return
        buffers = self.follow(fields[4], "model.buffers")
        for i in range(self.u32(buffers, "model.buffers")):
            buf = self.table_fields(self.follow(buffers + 4 + 4 * i, "buffer"), f"buffer[{i}]")
            if _BUFFER_OFFSET_FIELD in buf and _BUFFER_SIZE_FIELD in buf:
                self.need(buf[_BUFFER_OFFSET_FIELD], 8, f"buffer[{i}].offset")
                self.need(buf[_BUFFER_SIZE_FIELD], 8, f"buffer[{i}].size")
                offset = struct.unpack_from("<Q", self.data, buf[_BUFFER_OFFSET_FIELD])[0]
                size = struct.unpack_from("<Q", self.data, buf[_BUFFER_SIZE_FIELD])[0]
                if offset > 1:  # 0 and 1 are the schema's "no external data" sentinels
                    self.need(offset, size, f"buffer[{i}] data")


def check_tflite(data: bytes, source: str = "model") -> None:
    """Raise ModelError unless `data` is a complete TFLite flatbuffer (identifier and bounds)."""
    if len(data) < 8 or bytes(data[4:8]) != TFLITE_IDENTIFIER:
        found = bytes(data[4:8]) if len(data) >= 8 else f"only {len(data)} bytes"
        raise ModelError(
            f"{source} is not a TFLite model: expected identifier {TFLITE_IDENTIFIER!r} at bytes "
            f"4..8, found {found!r}"
        )
    try:
        _FlatbufferCheck(bytes(data)).model()
    except _Truncated as e:
        raise ModelError(f"{source} is truncated or corrupt: {e}") from None
    except struct.error as e:  # unreachable after the bounds checks; kept as a last guard
        raise ModelError(f"{source} is corrupt: {e}") from e


def read_model(model: ModelSource) -> tuple[bytes, str]:
    """The model's bytes and a name for messages."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model), "model bytes"
    if isinstance(model, (str, Path)):
        path = Path(model)
        try:
            return path.read_bytes(), str(path)
        except OSError as e:
            raise ModelError(f"cannot read model file {str(path)!r}: {e.strerror or e}") from e
    raise ModelError(f"model: expected bytes or a file path, got {type(model).__name__}")


def read_artifact(directory: str | Path) -> tuple[bytes, str, dict[str, Any]]:
    """(model bytes, a name for messages, manifest) of an artifact directory.

    Checks what the runtime relies on: the manifest is a JSON object and, when it names one, the
    model's sha256 matches. (Signatures are the agent's business: `device_agents.signing`.)
    """
    d = Path(directory)
    manifest_path = d / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelError(f"artifact {str(d)!r}: cannot read {MANIFEST_FILE}: {e.strerror or e}") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"artifact {str(d)!r}: {MANIFEST_FILE} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise ModelError(f"artifact {str(d)!r}: {MANIFEST_FILE} is not a JSON object")
    name = manifest.get("model_file", MODEL_FILE)
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ModelError(f"artifact {str(d)!r}: model_file {name!r} is not a file name")
    data, source = read_model(d / name)
    sha = manifest.get("sha256")
    if sha is not None and hashlib.sha256(data).hexdigest() != str(sha).lower():
        raise ModelError(f"artifact {str(d)!r}: {name} does not match the manifest's sha256 {sha}")
    return data, source, manifest


def check_normalisation(norm: Any, size: int, source: str = "model") -> dict[str, Any]:
    """`input_normalisation` as float64 arrays {mean, std, clip}; ModelError names what is bad.

    mean and std have one value per element of the (stacked) input; std > 0; clip > 0 or None
    (no clip).
    """
    if not isinstance(norm, dict) or set(norm) != set(NORMALISATION_KEYS):
        got = sorted(norm) if isinstance(norm, dict) else type(norm).__name__
        raise ModelError(
            f"{source}: input_normalisation must be a dict with keys "
            f"{', '.join(NORMALISATION_KEYS)}; got {got}"
        )
    out: dict[str, Any] = {}
    for key in ("mean", "std"):
        try:
            v = np.asarray(norm[key], np.float64).ravel()
        except (TypeError, ValueError) as e:
            raise ModelError(f"{source}: input_normalisation.{key} is not a list of numbers: {e}") from e
        if v.size != size:
            raise ModelError(
                f"{source}: input_normalisation.{key} has {v.size} values, the model takes {size}"
            )
        if not np.all(np.isfinite(v)) or (key == "std" and not np.all(v > 0)):
            raise ModelError(
                f"{source}: input_normalisation.{key} must be finite"
                + (" and > 0" if key == "std" else "")
                + f": {v.tolist()}"
            )
        out[key] = v
    clip = norm["clip"]
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip <= 0
    ):
        raise ModelError(f"{source}: input_normalisation.clip {clip!r} is not a positive number or null")
    out["clip"] = None if clip is None else float(clip)
    return out


# --- the step, as closures (see "The step" in the module docstring) ---------------------------
def _dequantise(raw: np.ndarray, dst: np.ndarray, zero_point: float | None, scale: float) -> None:
    """dst = (raw - zero_point) * scale in float32 (raw as it is if zero_point is None)."""
    np.copyto(dst, np.reshape(raw, dst.shape), casting="unsafe")
    if zero_point is not None:
        # in float32: int8 arithmetic would overflow (127 - (-128))
        np.subtract(dst, zero_point, out=dst)
        np.multiply(dst, scale, out=dst)


def _input_stage(p: TFLitePolicy) -> Callable[[np.ndarray], None]:
    """`quantise(obs)`: `obs` (the input's shape, any float dtype) normalised and quantised into
    `p._in`. A closure over `p`'s buffers and operands (its variables are read faster than
    attributes), with no reference to `p`."""
    f32 = np.float32
    multiply, add, subtract, divide, rint = np.multiply, np.add, np.subtract, np.divide, np.rint
    maximum, minimum, copyto = np.maximum, np.minimum, np.copyto
    q, f = p._in, p._in_f
    # 0-d float32 operands: for a float32 operand, the same float32 loop and values as the python
    # floats they replace, without a scalar conversion per call
    lo, hi = np.array(p._in_min, f32), np.array(p._in_max, f32)
    if p.input.quantized and p.input_normalisation is not None:
        a, b = p._a, p._b

        def quantise(obs: np.ndarray) -> None:
            # q = round(obs * a + b): normalisation and quantisation in one per-element map;
            # the zero point is inside b, and the clip inside the saturation bounds
            multiply(obs, a, out=f)
            add(f, b, out=f)
            rint(f, out=f)
            # maximum/minimum rather than np.clip: 4x faster on a few dozen values
            maximum(f, lo, out=f)
            minimum(f, hi, out=f)
            copyto(q, f, casting="unsafe")

    elif p.input.quantized:
        scale_py, scale, zero = p.input.scale, np.array(p.input.scale, f32), np.array(p._in_zero, f32)

        def quantise(obs: np.ndarray) -> None:
            # q = round(x / scale) + zero_point, saturated: TFLite's own input quantisation (it
            # rounds ties away from zero, numpy to even; they differ only on exact .5 ties).
            # The 0-d float32 scale only for a float32 obs: for another dtype the python float
            # keeps the loop numpy always chose (float16 for float16, which a float32 operand
            # would promote; float64 for float64 either way).
            divide(obs, scale if obs.dtype == f32 else scale_py, out=f)
            rint(f, out=f)
            add(f, zero, out=f)
            maximum(f, lo, out=f)
            minimum(f, hi, out=f)
            copyto(q, f, casting="unsafe")

    elif p.input_normalisation is not None:
        # float model: exactly torch's (x - mean) * inv_std, then the clip. A float32 input
        # tensor takes the result directly; another dtype goes through the float32 scratch
        # buffer and a cast, as it always did
        mean, inv_std, dst = p._mean, p._inv_std, (q if q.dtype == f32 else f)
        clip = None if p._clip is None else (np.array(-p._clip, f32), np.array(p._clip, f32))

        def quantise(obs: np.ndarray) -> None:
            subtract(obs, mean, out=dst)
            multiply(dst, inv_std, out=dst)
            if clip is not None:
                maximum(dst, clip[0], out=dst)
                minimum(dst, clip[1], out=dst)
            if dst is not q:
                copyto(q, dst, casting="same_kind")

    else:

        def quantise(obs: np.ndarray) -> None:
            copyto(q, obs, casting="same_kind")

    return quantise


def _output_stage(p: TFLitePolicy) -> Callable[[], np.ndarray]:
    """`run()`: write `p._in` to the interpreter, invoke, dequantise the output into `p._out_f`
    and return it. A closure like `_input_stage`'s, over the interpreter's bound methods."""
    set_tensor, invoke, get_tensor = p._interp.set_tensor, p._interp.invoke, p._interp.get_tensor
    q, in_index, out_index, source = p._in, p.input.index, p.output.index, p.source
    out, view = p._out_f, p._out_view
    take = None if p._table is None else p._table.take
    zero = p._out_zero if p.output.quantized else None
    scale = p.output.scale

    def run() -> np.ndarray:
        try:
            set_tensor(in_index, q)
            invoke()
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"{source}: inference failed: {e}") from e
        raw = get_tensor(out_index)
        if take is not None:
            take(raw, out=view, mode="wrap")
        else:
            _dequantise(raw, view, zero, scale)
        return out

    return run


# --- the policy --------------------------------------------------------------------------------
_SUPPORTED_DTYPES = (np.float32, np.int8, np.uint8, np.int16)


class _TensorSpec:
    """Index, shape, dtype and (scale, zero_point) of one input or output tensor."""

    def __init__(self, details: dict[str, Any], role: str, source: str):
        self.index = int(details["index"])
        self.shape = tuple(int(d) for d in details["shape"])
        self.dtype = np.dtype(details["dtype"])
        if self.dtype.type not in _SUPPORTED_DTYPES:
            raise ModelError(
                f"{source}: {role} dtype {self.dtype} is not supported; "
                f"valid: {', '.join(np.dtype(t).name for t in _SUPPORTED_DTYPES)}"
            )
        scale, zero_point = details.get("quantization", (0.0, 0))
        self.scale = float(scale)
        self.zero_point = int(zero_point)
        self.size = int(np.prod(self.shape))

    @property
    def quantized(self) -> bool:
        return self.dtype.kind in "iu" and self.scale > 0.0


def _fully_connected_macs(interp: Any) -> int | None:
    """Multiply-accumulates of one invoke: the weight elements of every FULLY_CONNECTED op
    (robonas policies are MLPs; a batch-1 FC costs one MAC per weight). None when the runtime
    does not list its ops (`_get_ops_details` is private, present in tflite_runtime 2.14 and
    ai-edge-litert 2.x). A sim twin that emulates a slower robot computer needs this figure."""
    try:
        shapes = {t["index"]: tuple(int(d) for d in t["shape"]) for t in interp.get_tensor_details()}
        ops = interp._get_ops_details()
    except (AttributeError, RuntimeError, ValueError, KeyError):
        return None
    total = 0
    for op in ops:
        if op.get("op_name") == "FULLY_CONNECTED" and len(op.get("inputs", ())) >= 2:
            weights = shapes.get(int(op["inputs"][1]), ())
            total += int(np.prod(weights)) if weights else 0
    return total


class TFLitePolicy:
    """One policy model with one input (the observation) and one output (the action).

    `act(raw_obs)` is the whole control step: normalise and quantise, invoke, dequantise. The
    pieces are public too, so a benchmark can time the interpreter alone.

    `model` is the model's bytes, a `.tflite` path, or an artifact directory (`manifest.json` +
    `policy.tflite`; then its manifest's `input_normalisation` applies, the identity if it has
    none, and `manifest` holds it). `input_normalisation` is {mean: [...], std: [...], clip: c or
    None}, one mean/std per input element (see "Observation normalisation" in the module
    docstring); None feeds the observation to the model as it is (a model that folds
    normalisation in, or a bare model).
    """

    def __init__(
        self, model: ModelSource, threads: int = 1, input_normalisation: dict[str, Any] | None = None
    ):
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise DeviceError(f"threads: {threads!r} is not a positive integer")
        self.manifest: dict[str, Any] | None = None
        if isinstance(model, (str, Path)) and Path(model).is_dir():
            data, source, self.manifest = read_artifact(model)
            if input_normalisation is not None:
                raise ModelError(
                    f"{source}: input_normalisation comes from the artifact's "
                    "manifest; do not pass it as well"
                )
            input_normalisation = self.manifest.get("input_normalisation")
        else:
            data, source = read_model(model)
        check_tflite(data, source)
        interpreter_class = load_interpreter_class()
        self.source = source
        self.threads = threads
        self.model_size = len(data)
        self._data = data  # the interpreter reads from this buffer: keep it alive
        try:
            self._interp = interpreter_class(model_content=data, num_threads=threads)
            self._interp.allocate_tensors()
            inputs = self._interp.get_input_details()
            outputs = self._interp.get_output_details()
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"{source}: the interpreter refused the model: {e}") from e
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(
                f"{source}: a policy has exactly 1 input and 1 output tensor, "
                f"found {len(inputs)} and {len(outputs)}"
            )
        self.input = _TensorSpec(inputs[0], "input", source)
        self.output = _TensorSpec(outputs[0], "output", source)
        self.macs = _fully_connected_macs(self._interp)
        # Buffers allocated once and reused by every step (see "The step" in the module docstring).
        self._in = np.zeros(self.input.shape, self.input.dtype)
        self._in_f = np.zeros(self.input.shape, np.float32)
        self._out_f = np.zeros(self.output.size, np.float32)
        self._obs = np.zeros(self.input.size, np.float32)  # observation_buffer
        # float scalars: mixing python ints into float32 ufuncs costs a slower type resolution
        self._in_zero, self._out_zero = float(self.input.zero_point), float(self.output.zero_point)
        self._in_min = self._in_max = 0.0
        if self.input.quantized:
            info = np.iinfo(self.input.dtype)
            self._in_min, self._in_max = float(info.min), float(info.max)
        self.input_normalisation: dict[str, Any] | None = None
        self._clip: np.float32 | None = None
        if input_normalisation is not None:
            self._set_normalisation(check_normalisation(input_normalisation, self.input.size, source))
        self._prepare_step()

    def _set_normalisation(self, norm: dict[str, Any]) -> None:
        """Precompute the per-element affine map (once: a step then costs what it did before)."""
        self.input_normalisation = {
            "mean": norm["mean"].tolist(),
            "std": norm["std"].tolist(),
            "clip": norm["clip"],
        }
        mean, std, clip = norm["mean"], norm["std"], norm["clip"]
        shape = self.input.shape
        if self.input.quantized:
            # computed in float64, applied in float32
            k = 1.0 / (std * self.input.scale)
            self._a = (k).reshape(shape).astype(np.float32)
            self._b = (self.input.zero_point - mean * k).reshape(shape).astype(np.float32)
            if clip is not None:
                zp, s = self.input.zero_point, self.input.scale
                self._in_min = max(self._in_min, float(np.rint(-clip / s + zp)))
                self._in_max = min(self._in_max, float(np.rint(clip / s + zp)))
        else:
            # float model: exactly torch's (x - mean) * inv_std, then the clip
            self._mean = mean.reshape(shape).astype(np.float32)
            self._inv_std = (1.0 / std).reshape(shape).astype(np.float32)
            self._clip = None if clip is None else np.float32(clip)

    def _prepare_step(self) -> None:
        """Resolve once what every step needs: its path, its operands, the runtime's methods."""
        f32 = np.float32
        self._obs_in = self._obs.reshape(self.input.shape)  # views: writes reach the buffers
        self._out_view = self._out_f.reshape(self.output.shape)
        # An 8-bit output has 256 codes: dequantise each once, with the step's own arithmetic, and
        # a step is one lookup. Index i holds code i mod 256, so take(mode="wrap") indexes it
        # with the int8 code itself (-1 wraps to 255, the position of int8 -1).
        self._table: np.ndarray | None = None
        if self.output.quantized and self.output.dtype.itemsize == 1:
            codes = np.arange(256, dtype=np.uint8).view(self.output.dtype)
            table = np.zeros(256, f32)
            self._dequantise_ufuncs(codes, table)
            self._table = table
        self._quantise = _input_stage(self)
        self._run = _output_stage(self)
        quantise, run, obs = self._quantise, self._run, self._obs_in

        def act_in_place() -> np.ndarray:
            quantise(obs)
            return run()

        act_in_place.__doc__ = TFLitePolicy.act_in_place.__doc__
        # an instance attribute over the method: one call less per step (a closure, which holds
        # the buffers and the interpreter, not the policy: no reference cycle)
        self.act_in_place = act_in_place  # type: ignore[method-assign]  # see the comment above

    # --- description ---------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.input.shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.output.shape

    @property
    def input_dtype(self) -> np.dtype:
        return self.input.dtype

    @property
    def output_dtype(self) -> np.dtype:
        return self.output.dtype

    @property
    def input_quantization(self) -> tuple[float, int]:
        """(scale, zero_point); (0.0, 0) for a float tensor."""
        return self.input.scale, self.input.zero_point

    @property
    def output_quantization(self) -> tuple[float, int]:
        return self.output.scale, self.output.zero_point

    @property
    def observation_buffer(self) -> np.ndarray:
        """The raw observation `act_in_place` acts on: float32, (input_size,), the policy's own.

        Write it in place (the control loop keeps its history stack here); a float64 value
        written into it is rounded to float32 as `act` of a float32 observation would see it."""
        return self._obs

    # --- the step, in pieces -------------------------------------------------------------
    def quantize_input(self, obs: np.ndarray) -> np.ndarray:
        """Write the raw observation `obs` (float, input_size values) into the input buffer,
        normalised if the policy has an `input_normalisation`, in the tensor's dtype."""
        obs = np.asarray(obs)
        if obs.size != self.input.size:
            raise ModelError(
                f"{self.source}: observation has {obs.size} values, the model takes "
                f"{self.input.size} (shape {self.input.shape})"
            )
        self._quantise(obs.reshape(self.input.shape))  # a view for any contiguous observation
        return self._in

    def invoke(self) -> None:
        """Run the model on the input buffer last written by `quantize_input`."""
        try:
            self._interp.set_tensor(self.input.index, self._in)
            self._interp.invoke()
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"{self.source}: inference failed: {e}") from e

    def raw_output(self) -> np.ndarray:
        """The output tensor as the model produced it (int8 for an int8 model), a copy."""
        return self._interp.get_tensor(self.output.index)

    def _dequantise_ufuncs(self, raw: np.ndarray, dst: np.ndarray) -> None:
        """The dequantisation arithmetic, element by element (the 8-bit table is made with it)."""
        _dequantise(raw, dst, self._out_zero if self.output.quantized else None, self.output.scale)

    def dequantize_output(self, raw: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """The action as float32, shape (output_size,). Written into `out` if given, else into
        an internal buffer that the next step overwrites."""
        if raw is None:
            raw = self.raw_output()
        dst = self._out_f if out is None else out
        if self._table is not None and raw.dtype == self.output.dtype and dst.dtype == np.float32:
            self._table.take(np.reshape(raw, dst.shape), out=dst, mode="wrap")
        else:
            self._dequantise_ufuncs(raw, dst)
        return dst

    def act_in_place(self) -> np.ndarray:
        """One control step on `observation_buffer`: the policy's float32 action buffer
        (output_size,), overwritten by the next step (copy it to keep it).

        The same arithmetic as `act(observation_buffer)`, without its checks, its reshapes and
        its copy: the buffers are the policy's own, so their sizes are known. (Replaced per
        instance by the closure `_prepare_step` builds; this is its documentation and fallback.)"""
        self._quantise(self._obs_in)
        return self._run()

    def act(self, obs: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """One control step: float observation in, float32 action (output_size,) out.

        Returns a new array unless `out` (float32, output_size) is given to reuse.
        """
        self.quantize_input(obs)
        self.invoke()
        action = self.dequantize_output(out=out)
        return action.copy() if out is None else action
