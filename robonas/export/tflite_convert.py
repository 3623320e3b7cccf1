"""Convert a torch policy module to a TFLite flatbuffer: float32, or full int8.

Leans on Google's AI Edge tools, which need no TensorFlow install:
- `litert-torch` lowers the torch module (via torch.export) to a float32 `.tflite`;
- `ai-edge-quantizer` quantises that model statically (`static_wi8_ai8`: int8 weights and int8
  activations, calibrated on sample observations), which also makes the input and output
  tensors int8, so the robot runs integer kernels from end to end;
- `ai-edge-litert`'s interpreter reads the model's signature (names of the input tensor) for
  the calibration data and checks the result.

The models take one observation of shape (1, input_dim) float32 (batch size 1: a robot acts on
one observation per control tick). The libraries print progress bars, reports and C++ log lines;
`_quiet()` sends file descriptors 1 and 2 to a temporary file while they run and puts the tail of
it in the error message if conversion fails. (fd redirection is process-wide: do not convert on
two threads of one process at once.)
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from robonas.errors import ConfigError, RobonasError

if TYPE_CHECKING:
    import torch

_LOG_TAIL_LINES = 3


@contextlib.contextmanager
def _quiet() -> Iterator[list[str]]:
    """Silence stdout/stderr (Python and C++) inside; the yielded list gets the log tail."""
    tail: list[str] = []
    saved_env = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"  # litert-torch's rich progress lines
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = (os.dup(1), os.dup(2))
    with tempfile.TemporaryFile(mode="w+b") as log, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(sys.__stdout__), contextlib.redirect_stderr(sys.__stderr__):
                yield tail
        finally:
            for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
                if stream is None:  # sys.__stdout__/__stderr__ are None without a console
                    continue
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            if saved_env is None:
                os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
            else:
                os.environ["LITERT_TORCH_SHOW_PROGRESS"] = saved_env
            log.seek(0)
            lines = log.read().decode(errors="replace").strip().splitlines()
            tail.extend(line.strip() for line in lines[-_LOG_TAIL_LINES:])


def _failure(what: str, e: Exception, tail: list[str]) -> RobonasError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    message = f"{what}: {type(e).__name__}: {first}"
    # the libraries' last log lines help when the exception says little; skip them if they
    # only repeat it (torch.export logs the same error it raises)
    if tail and not any(first and first in line for line in tail):
        message += " (log: " + " | ".join(tail) + ")"
    return RobonasError(message)


def _check_input_dim(input_dim: int) -> int:
    if not isinstance(input_dim, (int, np.integer)) or isinstance(input_dim, bool) or input_dim < 1:
        raise ConfigError(f"input_dim: {input_dim!r} is not a positive integer")
    return int(input_dim)


def to_tflite_fp32(module: torch.nn.Module, input_dim: int) -> bytes:
    """A float32 `.tflite` of `module`, input (1, input_dim) float32, batch size 1."""
    input_dim = _check_input_dim(input_dim)
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    was_training = module.training
    module.eval()  # export the inference graph (no dropout, running statistics)
    what = f"cannot convert {type(module).__name__} with input (1, {input_dim}) to TFLite"
    tail: list[str] = []
    try:
        with _quiet() as tail:
            import litert_torch

            model = litert_torch.convert(module, (torch.zeros(1, input_dim),))
            data = bytes(model.model_content())
    except Exception as e:
        raise _failure(what, e, tail) from e
    finally:
        module.train(was_training)
    return data


def _signature_input(fp32: bytes) -> tuple[str, str]:
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_content=fp32).get_signature_list()
    if len(signatures) != 1:
        raise RobonasError(f"expected one signature in the float model, found {list(signatures)}")
    ((key, sig),) = signatures.items()
    if len(sig["inputs"]) != 1:
        raise RobonasError(f"expected one input in signature {key!r}, found {sig['inputs']}")
    return key, sig["inputs"][0]


def _check_int8_io(data: bytes) -> None:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data)
    for role, details in (("input", interp.get_input_details()), ("output", interp.get_output_details())):
        dtypes = [np.dtype(d["dtype"]).name for d in details]
        if dtypes != ["int8"]:
            raise RobonasError(f"int8 quantisation left the model's {role} tensors as {dtypes}")


def to_tflite_int8(module: torch.nn.Module, calibration_inputs: np.ndarray) -> bytes:
    """A full-int8 `.tflite` of `module`: int8 weights, activations, input and output tensors.

    `calibration_inputs` (N, input_dim) float32 are representative observations (from simulated
    rollouts); their ranges set the quantisation scales, so values outside them saturate.
    """
    calib = np.asarray(calibration_inputs)
    if calib.ndim != 2 or calib.shape[0] < 1 or calib.shape[1] < 1:
        raise ConfigError(
            f"calibration_inputs: shape {calib.shape} is not (N, input_dim) with N, input_dim >= 1"
        )
    if calib.dtype.kind not in "fiu" or not np.all(np.isfinite(calib)):
        raise ConfigError(
            f"calibration_inputs: dtype {calib.dtype} must be a finite float array (NaN/inf found "
            "or not numeric)"
        )
    calib = calib.astype(np.float32, copy=False)
    fp32 = to_tflite_fp32(module, calib.shape[1])
    what = f"cannot quantise {type(module).__name__} to int8"
    tail: list[str] = []
    try:
        with _quiet() as tail:
            from ai_edge_quantizer import calibrator, quantizer, recipe, recipe_manager
            from ai_edge_quantizer.utils import qsv_utils

            key, input_name = _signature_input(fp32)
            int8_recipe = recipe.static_wi8_ai8()
            manager = recipe_manager.RecipeManager()
            manager.load_quantization_recipe(int8_recipe)
            # Quantizer.calibrate keeps a moving average (0.95) of each tensor's per-sample
            # min/max; with batch size 1 that is the range of a *typical* observation, so
            # anything wider saturates (we measured 35% of the output range as error). The
            # calibrator's own min_max_update keeps the true range over all samples instead.
            calib_run = calibrator.Calibrator(fp32, num_threads=1, qsv_update_func=qsv_utils.min_max_update)
            # one sample per calibration step, batch size 1 like the model
            samples = [{input_name: row[None, :]} for row in calib]
            calib_run.calibrate({key: samples}, manager)
            ranges = calib_run.get_model_qsvs()
            quant = quantizer.Quantizer(fp32, int8_recipe)
            result = quant.quantize(ranges, enable_progress_report=False)
            data = bytes(result.quantized_model)
            _check_int8_io(data)
    except RobonasError:
        raise
    except Exception as e:
        raise _failure(what, e, tail) from e
    return data
