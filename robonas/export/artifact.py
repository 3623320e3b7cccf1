"""A deployable artifact on disk: `policy.tflite` + `manifest.json` + `manifest.sig` (optional).

Leans on `device_agents.signing` for canonical JSON, Ed25519 signatures and the verdict (the
robot runs the same code, so host and agent agree byte for byte) and on
`device_agents.runtime` for the TFLite file check, the tensors' dtypes and quantisation and the
check of `input_normalisation` (the robot reads the artifact directory with `TFLitePolicy(directory)`).

Layout, chosen to be the simplest thing to verify:
- `manifest.json` is written as exactly the canonical JSON that gets signed, so its bytes are the
  signed bytes; it carries the model's sha256, so one signature covers the model as well;
- `manifest.sig` is the detached base64 signature; an unsigned artifact simply has none (and
  `verify` reports it as unsigned, never as good);
- a signed manifest carries `sequence` (an integer >= 1, growing with every signature made with
  one key): agents refuse an artifact older than the newest they promoted from that key
  (`device_agents.slots.SlotStore.order_verdict`), so a replayed old artifact cannot downgrade a
  robot. Signing with a key file stamps it from the counter kept beside the key
  (`device_agents.signing.stamp_and_sign`).
Every file is written atomically (temp file in the same directory, fsync, os.replace).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agents.atomic import atomic_write
from device_agents.runtime import MANIFEST_FILE, MODEL_FILE
from robonas.errors import RobonasError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agents.runtime import _TensorSpec
    from device_agents.signing import Verdict
    from robonas.space import PolicyArch

FORMAT_VERSION = 1
SIGNATURE_FILE = "manifest.sig"  # model and manifest names are the runtime's (it reads them)


def _tensor(spec: _TensorSpec) -> dict[str, Any]:
    scale, zero_point = spec.scale, spec.zero_point
    return {
        "dtype": spec.dtype.name,
        "shape": list(spec.shape),
        "scale": float(scale),
        "zero_point": int(zero_point),
    }


def build_manifest(
    *,
    model: bytes,
    study: str,
    trial: int,
    arch: PolicyArch,
    spaces: dict[str, Any],
    frame_mean: np.ndarray,
    control_hz: float | None,
    parity: dict[str, Any],
    precision: str,
    input_normalisation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of `model`; tensor dtypes and quantisation are read from the model itself.

    `input_normalisation` ({mean, std, clip}, one mean/std per element of the stacked input) is
    for a model that takes normalised observations: the robot's `TFLitePolicy` applies it (fused
    into the int8 input quantisation). None means the model takes raw observations as they are.
    `frame_mean` (raw units, one frame) is what the robot pads the history with after a reset.
    """
    import robonas
    from device_agents.errors import DeviceError
    from device_agents.runtime import TFLitePolicy, runtime_name

    try:
        # also refuses bytes that are not a TFLite model, and a normalisation of the wrong size
        policy = TFLitePolicy(model, input_normalisation=input_normalisation)
    except DeviceError as e:
        raise RobonasError(f"cannot describe the model: {e}") from e
    obs = spaces["observation"]
    action = dict(spaces["action"])
    action["output"] = "index" if action.get("discrete") else "value"
    manifest = {
        "format_version": FORMAT_VERSION,
        "robonas_version": robonas.__version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "study": study,
        "trial": int(trial),
        "arch_id": arch.arch_id,
        "arch": arch.to_dict(),
        "env_id": spaces.get("env_id"),
        "control_hz": control_hz,
        "history": arch.history,
        "observation": {
            "frame_shape": list(obs["shape"]),
            "low": obs["low"],
            "high": obs["high"],
            "input_shape": [1, arch.input_dim],
            "history": arch.history,
            "history_order": "oldest_first",
            # raw values to fill the history with after a reset (normalise to SB3's zeros)
            "history_pad": [float(v) for v in np.asarray(frame_mean, np.float64).ravel()],
            "normalisation": (
                "folded into the model"
                if input_normalisation is None
                else "by the runtime: input_normalisation, fused into the input quantisation"
            ),
        },
        "action": action,
        "precision": precision,
        "input": _tensor(policy.input),
        "output": _tensor(policy.output),
        "checked_with": runtime_name(),
        "parity": parity,
        "sha256": hashlib.sha256(model).hexdigest(),
        "model_size": len(model),
        "model_file": MODEL_FILE,
    }
    if input_normalisation is not None:
        manifest["input_normalisation"] = policy.input_normalisation  # checked, plain floats
    return manifest


def write_artifact(
    directory: str | Path,
    model_bytes: bytes,
    manifest: dict[str, Any],
    private_key: Ed25519PrivateKey | str | os.PathLike[str] | None = None,
) -> Path:
    """Write the model, the manifest and (with `private_key`, an Ed25519 key or a key path) the
    detached signature. A stale `manifest.sig` from an earlier export is removed when unsigned.

    Signed manifests carry a `sequence` (agents refuse older ones). With a key *file* a fresh
    one is always stamped from the counter beside the key (`stamp_and_sign`). With a key
    *object* there is no counter: the caller's `manifest["sequence"]` is kept when it is an
    integer >= 1, otherwise the current unix time in milliseconds is used. An unsigned manifest
    is written as given (`robonas deploy --key` stamps one when it signs). The manifest written
    (with its sequence) is what `load_artifact` returns; `manifest` itself is not modified.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agents.signing import (
        SigningError,
        canonical_json,
        sign_manifest,
        stamp_and_sign,
        valid_sequence,
    )

    if manifest.get("sha256") != hashlib.sha256(model_bytes).hexdigest():
        raise RobonasError("manifest sha256 does not match the model bytes; rebuild the manifest")
    d = Path(directory)
    try:
        signature: str | None = None
        if isinstance(private_key, Ed25519PrivateKey):
            if not valid_sequence(manifest.get("sequence")):
                manifest = {**manifest, "sequence": time.time_ns() // 1_000_000}
            signature = sign_manifest(manifest, private_key)
        elif private_key is not None:
            manifest, signature = stamp_and_sign(manifest, private_key)
        manifest_bytes = canonical_json(manifest)
    except SigningError as e:
        raise RobonasError(f"cannot sign the manifest: {e}") from e
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(d / MODEL_FILE, bytes(model_bytes))
    atomic_write(d / MANIFEST_FILE, manifest_bytes)
    if signature is None:
        (d / SIGNATURE_FILE).unlink(missing_ok=True)
    else:
        atomic_write(d / SIGNATURE_FILE, signature.encode("ascii") + b"\n")
    # the renames themselves must survive a crash: fsync the directory entry
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return d


def _read_raw(directory: str | Path) -> tuple[Path, bytes, bytes, str | None]:
    d = Path(directory)
    if not d.is_dir():
        raise RobonasError(f"artifact {d}: not a directory")
    for name in (MODEL_FILE, MANIFEST_FILE):
        if not (d / name).is_file():
            raise RobonasError(
                f"artifact {d}: {name} is missing (expected {MODEL_FILE}, "
                f"{MANIFEST_FILE} and optionally {SIGNATURE_FILE})"
            )
    sig_path = d / SIGNATURE_FILE
    signature = sig_path.read_text().strip() if sig_path.is_file() else None
    return d, (d / MANIFEST_FILE).read_bytes(), (d / MODEL_FILE).read_bytes(), signature or None


def _parse_manifest(d: Path, raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RobonasError(f"artifact {d}: {MANIFEST_FILE} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), str):
        raise RobonasError(f"artifact {d}: {MANIFEST_FILE} has no sha256 string")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RobonasError(
            f"artifact {d}: format_version {manifest.get('format_version')!r}, "
            f"this robonas reads {FORMAT_VERSION}"
        )
    return manifest


def load_artifact(directory: str | Path) -> tuple[dict[str, Any], bytes, str | None]:
    """(manifest, model bytes, signature or None), after checking the manifest, that the model is
    a complete TFLite flatbuffer and that its sha256 is the manifest's. Does not check the
    signature (see `verify`)."""
    from device_agents.errors import DeviceError
    from device_agents.runtime import check_tflite

    d, raw_manifest, model, signature = _read_raw(directory)
    manifest = _parse_manifest(d, raw_manifest)
    try:
        check_tflite(model, str(d / MODEL_FILE))
    except DeviceError as e:
        raise RobonasError(f"artifact {d}: {e}") from e
    actual = hashlib.sha256(model).hexdigest()
    if actual != manifest["sha256"]:
        raise RobonasError(
            f"artifact {d}: {MODEL_FILE} has sha256 {actual}, the manifest says {manifest['sha256']}"
        )
    return manifest, model, signature


def verify(directory: str | Path, trusted_public_keys: Iterable[Any]) -> Verdict:
    """The agent's verdict on this artifact (`device_agents.signing.Verdict`): ok only when the
    model matches the manifest's sha256 and a trusted key signed the manifest; an unsigned
    artifact gets reason "unsigned". Missing files raise RobonasError (not an artifact at all)."""
    from device_agents.signing import BAD_MANIFEST, SigningError, Verdict, verify_artifact

    d, raw_manifest, model, signature = _read_raw(directory)
    try:
        manifest = _parse_manifest(d, raw_manifest)
    except RobonasError as e:
        return Verdict(False, BAD_MANIFEST, False, detail=str(e))
    try:
        return verify_artifact(manifest, signature, model, list(trusted_public_keys))
    except SigningError as e:
        raise RobonasError(f"trusted keys: {e}") from e


__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "SIGNATURE_FILE",
    "build_manifest",
    "load_artifact",
    "verify",
    "write_artifact",
]
