"""The record of what happened on the robot: exact codec, bounds, refusals, and the control loop
filling it the same way on the sim twin and on the serial back end (a fake MCU on a pty)."""

from __future__ import annotations

import base64
import copy
import json
import time
import zlib

import numpy as np
import pytest

from device_agents.control_loop import run_episodes
from device_agents.errors import DeviceError
from device_agents.robots import make_robot
from device_agents.robots.base import Robot
from device_agents.trajectory import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_EPISODES,
    Episode,
    Recorder,
    RecordError,
    decode,
    encode,
    summary,
)

FIELDS = ("obs", "action", "reward", "clock_s", "latency_s")


def _episode(rng: np.random.Generator, n: int, obs_dim: int = 5, act_dim: int = 1, seed=None) -> Episode:
    return Episode(
        obs=rng.standard_normal((n + 1, obs_dim)).astype(np.float32),
        action=rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
        reward=np.ones(n, np.float32),
        clock_s=1234.5 + 0.02 * np.arange(n) + rng.uniform(0, 1e-4, n),
        latency_s=rng.uniform(1e-5, 1e-3, n).astype(np.float32),
        seed=seed,
    )


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _assert_same(got: list[Episode], want: list[Episode]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.seed == w.seed and g.steps == w.steps
        for f in FIELDS:
            assert _same_bits(getattr(g, f), getattr(w, f)), f


# ----------------------------------------------------------------------------- the codec
def test_encode_decode_round_trip_is_exact_and_json_safe():
    rng = np.random.default_rng(0)
    eps = [
        _episode(rng, 7, seed=3),
        _episode(rng, 1, seed=None),
        _episode(rng, 0, seed=5),
        _episode(rng, 300),
    ]
    eps[0].obs[2, 1] = np.nan  # a sensor fault, kept bit for bit
    eps[0].obs[3, 0] = -np.inf
    eps[3].clock_s[:] = 1e6 + 0.02 * np.arange(300)  # a steady clock: the xor filter's case
    record = encode(eps)
    text = json.dumps(record, allow_nan=False)  # JSON-safe: no NaN leaks into the JSON
    _assert_same(decode(json.loads(text)), eps)
    _assert_same(decode(record), eps)
    assert record["format"] == 1 and record["obs_dim"] == 5 and record["act_dim"] == 1
    assert [e["steps"] for e in record["episodes"]] == [7, 1, 0, 300]
    assert [e["seed"] for e in record["episodes"]] == [3, None, 5, None]
    assert record["arrays"]["obs"]["shape"] == [7 + 1 + 0 + 300 + 4, 5]
    assert record["arrays"]["clock_s"]["dtype"] == "<f8" and record["arrays"]["obs"]["dtype"] == "<f4"
    assert record["arrays"]["clock_s"]["filter"] == "xor-shuffle"
    # compact: well under the raw bytes for a steady clock and constant rewards
    assert len(record["arrays"]["clock_s"]["data"]) < 0.3 * 8 * 308
    assert len(record["arrays"]["reward"]["data"]) < 100
    assert decode(encode([])) == [] and summary(encode([]))["episodes"] == 0


def test_encode_states_sizes_and_refuses_inconsistent_episodes():
    rng = np.random.default_rng(1)
    a, b = _episode(rng, 4, obs_dim=5), _episode(rng, 4, obs_dim=3)
    with pytest.raises(RecordError, match="sizes differ"):
        encode([a, b])
    bad = Episode(a.obs, a.action, a.reward[:3], a.clock_s, a.latency_s)
    with pytest.raises(RecordError, match="episode 0 reward: shape"):
        encode([bad])
    with pytest.raises(RecordError, match="truncated_steps"):
        encode([a], truncated_steps=[0, 1])
    s = summary(encode([a, a], truncated_steps=[0, 9], dropped_episodes=2))
    assert s["steps"] == [4, 4] and s["truncated_steps"] == [0, 9] and s["dropped_episodes"] == 2


def _good() -> dict:
    return encode([_episode(np.random.default_rng(2), 6, seed=1), _episode(np.random.default_rng(3), 4)])


def _set(path: str, value):
    def mutate(r: dict) -> dict:
        *keys, last = path.split(".")
        node = r
        for k in keys:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
        return r

    return mutate


_DELETE = object()


def _deflated(raw: bytes) -> str:
    return base64.b64encode(zlib.compress(raw)).decode()


MALFORMED = [
    ("not an object", lambda r: None, "record: expected an object"),
    ("format", _set("format", 2), "record format: 2"),
    ("codec", _set("codec", "lz4"), "record codec"),
    ("obs_dim", _set("obs_dim", True), "record obs_dim"),
    ("act_dim", _set("act_dim", -1), "record act_dim"),
    ("episodes", _set("episodes", {}), "record episodes"),
    ("steps", _set("episodes.0.steps", -1), r"record episodes\[0\].steps"),
    ("seed", _set("episodes.1.seed", "x"), r"record episodes\[1\].seed"),
    ("truncated", _set("episodes.0.truncated_steps", 1.5), r"record episodes\[0\].truncated_steps"),
    ("dropped", _set("dropped_episodes", -2), "record dropped_episodes"),
    ("arrays", _set("arrays", []), "record arrays"),
    ("missing array", _set("arrays.latency_s", _DELETE), "record arrays.latency_s"),
    ("dtype", _set("arrays.clock_s.dtype", "<f4"), "record arrays.clock_s.dtype"),
    ("shape", _set("arrays.obs.shape", [13, 5]), "record arrays.obs.shape"),
    ("steps vs shape", _set("episodes.0.steps", 7), r"record arrays.obs.shape"),
    ("filter", _set("arrays.reward.filter", "delta"), "record arrays.reward.filter"),
    ("not base64", _set("arrays.action.data", "!!!"), "record arrays.action.data: does not decode"),
    ("not a string", _set("arrays.action.data", 5), "record arrays.action.data: not a base64 string"),
    ("not zlib", _set("arrays.action.data", base64.b64encode(b"plain").decode()), "arrays.action.data"),
    (
        "too short",
        _set("arrays.reward.data", _deflated(b"\0" * 8)),
        "inflates to 8 bytes, the shape needs 40",
    ),
    ("too long", _set("arrays.reward.data", _deflated(b"\0" * 400)), "inflates to more than 40 bytes"),
    (
        "trailing bytes",
        _set("arrays.reward.data", base64.b64encode(zlib.compress(b"\0" * 40) + b"xx").decode()),
        "does not end where the array does",
    ),
    ("bomb", _set("episodes.0.steps", 10**12), "record arrays.obs.shape|cannot inflate"),
]


@pytest.mark.parametrize("mutate, match", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_records_are_refused_naming_the_field(mutate, match):
    with pytest.raises(RecordError, match=match) as e:
        decode(mutate(copy.deepcopy(_good())))
    assert isinstance(e.value, DeviceError)


def test_a_huge_claimed_shape_is_refused_before_inflating():
    record = copy.deepcopy(_good())
    record["episodes"][0]["steps"] = 10**9
    record["arrays"]["obs"]["shape"] = [10**9 + 4 + 2, 5]
    with pytest.raises(RecordError, match="cannot inflate"):
        decode(record)


# ----------------------------------------------------------------------------- the recorder
def _fill(rec: Recorder, n: int, obs_dim: int = 5, seed: int = 0, t0: float = 0.0) -> None:
    rec.begin(np.full(obs_dim, -1.0), t0, action_size=1, seed=seed)
    for i in range(n):
        rec.step(np.array([i]), 1.0, 1e-4, np.full(obs_dim, float(i)), t0 + 0.02 * (i + 1))
    rec.end()


def test_recorder_keeps_the_last_episodes():
    rec = Recorder()
    assert rec.max_episodes == DEFAULT_MAX_EPISODES == 5 and rec.max_bytes == DEFAULT_MAX_BYTES
    for s in range(8):
        _fill(rec, 10, seed=s)
    assert [e.seed for e in rec.episodes] == [3, 4, 5, 6, 7] and rec.dropped_episodes == 3
    ep = rec.episodes[-1]
    assert ep.obs.shape == (11, 5) and ep.action.shape == (10, 1) and ep.reward.shape == (10,)
    np.testing.assert_array_equal(ep.obs[0], -1.0)  # the reset observation
    np.testing.assert_array_equal(ep.obs[1:, 0], np.arange(10))  # obs[i+1]: what step i returned
    np.testing.assert_array_equal(ep.action[:, 0], np.arange(10))
    np.testing.assert_allclose(ep.clock_s, 0.02 * np.arange(10))  # the clock of obs[i]
    assert ep.obs.dtype == np.float32 and ep.clock_s.dtype == np.float64
    assert summary(rec.encode())["dropped_episodes"] == 3


def test_recorder_byte_cap_drops_the_oldest_then_truncates_one_long_episode():
    # 5 obs + 1 action: 20 + 4 + 4 + 8 + 4 = 40 bytes a step, 20 for the last observation
    rec = Recorder(max_episodes=10, max_bytes=4000)
    for s in range(4):
        _fill(rec, 30, seed=s)  # 1220 bytes each: three fit
    assert [e.seed for e in rec.episodes] == [1, 2, 3] and rec.nbytes <= 4000
    assert rec.dropped_episodes == 1
    _fill(rec, 1000, seed=9)  # alone over the cap: its last 99 steps are kept
    assert [e.seed for e in rec.episodes] == [9] and rec.dropped_episodes == 4
    ep = rec.episodes[0]
    assert ep.steps == (4000 - 20) // 40 == 99 and ep.nbytes <= 4000
    assert rec.truncated_steps == [1000 - 99]
    np.testing.assert_array_equal(ep.action[:, 0], np.arange(1000 - 99, 1000))  # the last steps, in order
    np.testing.assert_array_equal(ep.obs[:, 0], np.arange(1000 - 100, 1000))
    np.testing.assert_allclose(ep.clock_s, 0.02 * np.arange(1000 - 99, 1000))
    record = rec.encode()
    assert record["episodes"] == [{"steps": 99, "seed": 9, "truncated_steps": 901}]
    assert record["dropped_episodes"] == 4
    _assert_same(decode(record), rec.episodes)
    # the same rule for an episode added whole
    rec2 = Recorder(max_bytes=4000)
    rec2.add(ep, truncated_steps=901)
    rec2.add(decode(encode([_episode(np.random.default_rng(0), 500)]))[0])
    assert rec2.truncated_steps == [500 - 99] and rec2.episodes[0].steps == 99


def test_recorder_refuses_misuse():
    with pytest.raises(RecordError, match="max_bytes"):
        Recorder(max_bytes=10)
    with pytest.raises(RecordError, match="max_episodes"):
        Recorder(max_episodes=0)
    rec = Recorder()
    with pytest.raises(RecordError, match=r"before Recorder\.begin"):
        rec.step(np.zeros(1), 0.0, 0.0, np.zeros(5), 0.0)
    rec.begin(np.zeros(5), 0.0, action_size=1)
    with pytest.raises(RecordError, match="action: 2 values"):
        rec.step(np.zeros(2), 0.0, 0.0, np.zeros(5), 0.0)
    with pytest.raises(RecordError, match="obs: 4 values"):
        rec.step(np.zeros(1), 0.0, 0.0, np.zeros(4), 0.0)


# ----------------------------------------------------------------------------- the control loop
class PD:
    """A controller that balances the cart-pole twins (obs: x, x_dot, cos, sin, theta_dot)."""

    runtime_name, runtime_version = "stub", "0"

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []

    def act(self, obs):
        self.inputs.append(np.array(obs, copy=True))
        u = 0.1 * obs[0] + 0.5 * obs[1] + 5.0 * obs[3] + 0.5 * obs[4]
        return np.array([np.clip(u, -1.0, 1.0)], np.float32)


def _spy(robot: Robot) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """Wrap robot.reset/step to log what the back end was given and what it returned."""
    log: list = []
    reset, step = robot.reset, robot.step

    def spy_reset(seed=None):
        obs = reset(seed)
        log.append(("reset", seed, np.array(obs, copy=True)))
        return obs

    def spy_step(action, latency_s=0.0):
        obs, reward, done = step(action, latency_s)
        log.append(("step", np.array(action, copy=True), latency_s, np.array(obs, copy=True), reward))
        return obs, reward, done

    robot.reset, robot.step = spy_reset, spy_step  # type: ignore[method-assign]
    return log


@pytest.fixture(params=["sim", "serial"])
def cartpole(request):
    pytest.importorskip("sim")
    if request.param == "sim":
        r = make_robot("sim:cartpole-lab-a", fast=True)
        yield r
        r.close()
        return
    from tests.e2e.fake_mcu import FakeMCU

    mcu = FakeMCU("cartpole-lab-a").start()
    r = make_robot(f"serial:{mcu.port}?baudrate=115200")
    yield r
    r.close()
    mcu.close()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "real-time"])
def test_the_control_loop_records_what_the_robot_saw_and_got(cartpole, fast):
    """Sim twin and serial MCU alike: n+1 observations and n actions per episode, the actions
    and latencies the back end received, the observations it returned, clocks increasing."""
    log = _spy(cartpole)
    policy = PD()
    steps = 40 if fast else 12
    report = run_episodes(policy, cartpole, 3, 7, max_steps=steps, fast=fast, record=True)
    eps = decode(report["record"])
    assert [e.steps for e in eps] == report["lengths"] == [steps] * 3
    assert [e.seed for e in eps] == [7, 8, 9]
    assert sum(e.reward.sum() for e in eps) == pytest.approx(sum(report["returns"]))
    resets = [i for i, row in enumerate(log) if row[0] == "reset"]
    for e, start in zip(eps, resets, strict=True):
        assert e.obs.shape == (steps + 1, 5) and e.action.shape == (steps, 1)
        assert e.reward.shape == e.clock_s.shape == e.latency_s.shape == (steps,)
        rows = log[start + 1 : start + 1 + steps]
        np.testing.assert_array_equal(e.obs[0], log[start][2])  # the reset observation
        np.testing.assert_array_equal(e.obs[1:], np.stack([r[3] for r in rows]))
        np.testing.assert_array_equal(e.action, np.stack([r[1] for r in rows]))
        np.testing.assert_array_equal(e.latency_s, np.float32([r[2] for r in rows]))
        np.testing.assert_array_equal(e.reward, np.float32([r[4] for r in rows]))
        assert np.all(np.diff(e.clock_s) > 0)
        if fast:  # the ticks of a real-time run: exactly one period a step
            np.testing.assert_allclose(np.diff(e.clock_s), 0.02, rtol=1e-9)
        else:  # the robot computer's clock: about one period a step
            assert np.median(np.diff(e.clock_s)) == pytest.approx(0.02, abs=0.005)
            assert abs(e.clock_s[-1] - time.monotonic()) < 60
    assert eps[0].clock_s[-1] < eps[1].clock_s[0] < eps[2].clock_s[0]  # one clock across episodes
    # the policy saw exactly the recorded observations (history 1), step by step
    seen = np.stack(policy.inputs)
    np.testing.assert_array_equal(seen, np.concatenate([e.obs[:-1] for e in eps]))


def test_the_loop_reports_no_record_unless_asked_and_fills_a_given_recorder():
    pytest.importorskip("sim")
    robot = make_robot("sim:cartpole-lab-a", fast=True)
    try:
        plain = run_episodes(PD(), robot, 1, 0, max_steps=5, fast=True)
        assert "record" not in plain
        rec = Recorder(max_episodes=2)
        for seed in range(3):
            out = run_episodes(PD(), robot, 1, seed, max_steps=5, fast=True, recorder=rec)
        assert [e.seed for e in decode(out["record"])] == [1, 2] and rec.dropped_episodes == 1
    finally:
        robot.close()


def test_five_long_cartpole_episodes_fit_one_frame():
    """The size asked about: 5 cart-pole episodes of 500 steps, as JSON and on the wire."""
    from device_agents.protocol import MAX_PAYLOAD

    pytest.importorskip("sim")
    robot = make_robot("sim:cartpole-lab-a", fast=True)
    try:
        report = run_episodes(PD(), robot, 5, 0, max_steps=500, fast=True, record=True)
    finally:
        robot.close()
    assert report["lengths"] == [500] * 5
    record = report["record"]
    text = json.dumps(record, separators=(",", ":")).encode()
    wire = zlib.compress(text, 6)
    raw = sum(e.nbytes for e in decode(record))
    print(f"5 x 500 cart-pole steps: {raw} B of arrays, {len(text)} B JSON, {len(wire)} B on the wire")
    assert raw == 5 * (20 + 500 * 40)
    assert len(text) < 0.85 * raw and len(wire) <= MAX_PAYLOAD
