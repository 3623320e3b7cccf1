"""robonas.export.artifact: files written, loaded and verified; tampering, wrong keys, bad files; the
input normalisation in the manifest, read back by the robot's `TFLitePolicy(directory)`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from device_agents.signing import canonical_json, generate_keypair
from robonas.errors import RobonasError
from robonas.export.artifact import (
    MANIFEST_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    build_manifest,
    load_artifact,
    verify,
    write_artifact,
)
from robonas.export.tflite_convert import to_tflite_fp32
from robonas.space import Layer, PolicyArch

ARCH = PolicyArch(5, 1, (Layer(8, "relu"),))
SPACES = {
    "env_id": "sim/CartPole-v0",
    "observation": {"shape": [5], "low": [None] * 5, "high": [None] * 5},
    "action": {"discrete": False, "shape": [1], "low": [-1.0], "high": [1.0], "transform": "clip"},
}


@pytest.fixture(scope="module")
def model() -> bytes:
    return to_tflite_fp32(ARCH.build_actor(), ARCH.input_dim)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return generate_keypair(d, "host"), generate_keypair(d, "intruder")


NORM = {"mean": [0.5, -1.0, 2.0, 0.0, 0.25], "std": [2.4, 0.003, 1.0, 0.5, 4.0], "clip": 10.0}


def _manifest(model: bytes, input_normalisation: dict | None = NORM) -> dict:
    return build_manifest(
        model=model,
        study="s",
        trial=3,
        arch=ARCH,
        spaces=SPACES,
        frame_mean=np.array(NORM["mean"]),
        control_hz=50.0,
        parity={"return_drop": 0.5},
        precision="fp32",
        input_normalisation=input_normalisation,
    )


@pytest.fixture
def signed(tmp_path, model, keys) -> Path:
    (host_key, _), _ = keys
    return write_artifact(tmp_path / "a", model, _manifest(model), host_key)


def test_manifest_fields(model) -> None:
    m = _manifest(model)
    assert m["format_version"] == 1 and m["arch"] == ARCH.to_dict() and m["trial"] == 3
    assert m["input"] == {"dtype": "float32", "shape": [1, 5], "scale": 0.0, "zero_point": 0}
    assert m["output"]["shape"] == [1, 1] and m["model_size"] == len(model)
    assert m["action"]["output"] == "value" and m["observation"]["input_shape"] == [1, 5]
    assert m["created_at"].endswith("+00:00")


def test_manifest_input_normalisation(model) -> None:
    m = _manifest(model)
    assert m["input_normalisation"] == NORM
    assert m["observation"]["history_pad"] == NORM["mean"]  # raw units
    assert "by the runtime" in m["observation"]["normalisation"]
    raw_input = _manifest(model, None)
    assert "input_normalisation" not in raw_input
    assert raw_input["observation"]["normalisation"] == "folded into the model"
    with pytest.raises(RobonasError, match=r"input_normalisation\.std has 4 values, the model takes 5"):
        _manifest(model, {**NORM, "std": [1.0] * 4})


def test_robot_reads_the_written_artifact(signed, model) -> None:
    """The robot's entry point on what write_artifact wrote: raw obs in, normalised inside."""
    from device_agents.runtime import TFLitePolicy

    policy = TFLitePolicy(signed)
    assert policy.input_normalisation == NORM
    raw = np.array([1.0, -0.99, 3.0, 100.0, 0.25], np.float32)  # feature 3 is clipped
    z = np.clip((raw - np.array(NORM["mean"])) / np.array(NORM["std"]), -10, 10)
    bare = TFLitePolicy(model)
    np.testing.assert_allclose(policy.act(raw), bare.act(z.astype(np.float32)), rtol=1e-5)
    assert not np.allclose(policy.act(raw), bare.act(raw))  # it did normalise


def test_round_trip_and_signature(signed, model, keys) -> None:
    (_, host_pub), _ = keys
    manifest, data, signature = load_artifact(signed)
    assert data == model and signature
    # the file is exactly the signed bytes
    assert (signed / MANIFEST_FILE).read_bytes() == canonical_json(manifest)
    verdict = verify(signed, [host_pub])
    assert verdict.ok and verdict.reason == "ok"


def test_model_altered_by_one_byte_fails(signed, keys) -> None:
    (_, host_pub), _ = keys
    data = bytearray((signed / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (signed / MODEL_FILE).write_bytes(bytes(data))
    verdict = verify(signed, [host_pub])
    assert not verdict.ok and verdict.reason == "sha256 mismatch"


@pytest.mark.parametrize("old, new", [(b'"trial":3', b'"trial":4'), (b'"study":"s"', b'"study":"t"')])
def test_manifest_altered_by_one_byte_fails(signed, keys, old, new) -> None:
    (_, host_pub), _ = keys
    raw = (signed / MANIFEST_FILE).read_bytes()
    assert raw.count(old) == 1
    (signed / MANIFEST_FILE).write_bytes(raw.replace(old, new))
    verdict = verify(signed, [host_pub])
    assert not verdict.ok and verdict.reason == "bad signature"


def test_manifest_broken_by_one_byte_is_a_bad_manifest(signed, keys) -> None:
    (_, host_pub), _ = keys
    raw = bytearray((signed / MANIFEST_FILE).read_bytes())
    raw[0:1] = b"["  # no longer a JSON object
    (signed / MANIFEST_FILE).write_bytes(bytes(raw))
    verdict = verify(signed, [host_pub])
    assert not verdict.ok and verdict.reason == "bad manifest"
    with pytest.raises(RobonasError, match="not valid JSON"):
        load_artifact(signed)


def test_signed_by_another_key_fails(tmp_path, model, keys) -> None:
    (_, host_pub), (intruder_key, intruder_pub) = keys
    d = write_artifact(tmp_path / "b", model, _manifest(model), intruder_key)
    verdict = verify(d, [host_pub])
    assert not verdict.ok and verdict.reason == "bad signature"
    assert verify(d, [intruder_pub]).ok


def test_unsigned_is_flagged_and_stale_signature_removed(signed, model, keys) -> None:
    (_, host_pub), _ = keys
    assert (signed / SIGNATURE_FILE).exists()
    write_artifact(signed, model, _manifest(model))  # re-export unsigned into the same place
    assert not (signed / SIGNATURE_FILE).exists()
    verdict = verify(signed, [host_pub])
    assert not verdict.ok and verdict.reason == "unsigned" and verdict.sha256_ok
    assert load_artifact(signed)[2] is None


def test_truncated_model(signed) -> None:
    data = (signed / MODEL_FILE).read_bytes()
    (signed / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(RobonasError, match="truncated or corrupt"):
        load_artifact(signed)


def test_not_a_tflite_model(signed) -> None:
    (signed / MODEL_FILE).write_bytes(b"PK\x03\x04 this is a zip, not a model" * 4)
    with pytest.raises(RobonasError, match="not a TFLite model"):
        load_artifact(signed)


def test_wrong_sha256_in_manifest(signed) -> None:
    manifest = json.loads((signed / MANIFEST_FILE).read_bytes())
    manifest["sha256"] = "0" * 64
    (signed / MANIFEST_FILE).write_bytes(canonical_json(manifest))
    with pytest.raises(RobonasError, match=r"has sha256 [0-9a-f]{64}, the manifest says 0{64}"):
        load_artifact(signed)


def test_missing_files(tmp_path, signed) -> None:
    with pytest.raises(RobonasError, match="not a directory"):
        load_artifact(tmp_path / "nowhere")
    (signed / MANIFEST_FILE).unlink()
    with pytest.raises(RobonasError, match=r"manifest\.json is missing"):
        load_artifact(signed)
    with pytest.raises(RobonasError, match=r"manifest\.json is missing"):
        verify(signed, [])


def test_write_refuses_a_manifest_of_other_bytes(tmp_path, model) -> None:
    with pytest.raises(RobonasError, match="sha256 does not match"):
        write_artifact(tmp_path / "c", model + b"\0", _manifest(model))
    assert not (tmp_path / "c").exists()


def test_build_manifest_refuses_non_tflite() -> None:
    with pytest.raises(RobonasError, match="not a TFLite model"):
        build_manifest(
            model=b"nonsense",
            study="s",
            trial=1,
            arch=ARCH,
            spaces=SPACES,
            frame_mean=np.zeros(5),
            control_hz=None,
            parity={},
            precision="fp32",
        )


def test_signing_with_a_key_file_stamps_a_growing_sequence(tmp_path, model, keys) -> None:
    """Each signature with a key file gets a newer `sequence`, inside the signed bytes."""
    (host_key, host_pub), _ = keys
    given = _manifest(model)
    first = write_artifact(tmp_path / "v1", model, given, host_key)
    second = write_artifact(tmp_path / "v2", model, given, host_key)
    assert "sequence" not in given  # the caller's dict is not modified
    s1, s2 = (load_artifact(d)[0]["sequence"] for d in (first, second))
    assert isinstance(s1, int) and s2 > s1 >= 1
    assert verify(first, [host_pub]).ok and verify(second, [host_pub]).ok
    # a manifest carrying its own older number is re-stamped, not trusted
    third = write_artifact(tmp_path / "v3", model, {**given, "sequence": 5}, host_key)
    assert load_artifact(third)[0]["sequence"] > s2


def test_a_key_object_keeps_the_callers_sequence_or_gets_unix_ms(tmp_path, model, keys) -> None:
    import time

    from device_agents.signing import load_private_key

    (host_key, host_pub), _ = keys
    key = load_private_key(host_key)
    d = write_artifact(tmp_path / "given", model, {**_manifest(model), "sequence": 42}, key)
    assert load_artifact(d)[0]["sequence"] == 42 and verify(d, [host_pub]).ok
    before = time.time_ns() // 1_000_000
    d = write_artifact(tmp_path / "clock", model, _manifest(model), key)
    seq = load_artifact(d)[0]["sequence"]
    assert before <= seq <= time.time_ns() // 1_000_000 and verify(d, [host_pub]).ok
    # unsigned: written as given, no number invented
    d = write_artifact(tmp_path / "unsigned", model, _manifest(model))
    assert "sequence" not in load_artifact(d)[0]
