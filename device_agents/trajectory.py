"""What happened on the robot, step by step: the record a robot twin is identified from.

`Episode` is the unit: the observations the policy saw, the actions it sent, the rewards, the
robot's clock and the compute latency the agent knows it added before each action reached the
robot. Delays the agent cannot see (a bus, the actuator) are left for identification to find.

`Recorder` keeps the record bounded while the control loop fills it: the last `max_episodes`
episodes and at most `max_bytes` of arrays. Over the byte cap the oldest episodes go first; an
episode that alone exceeds it keeps only its last steps (a ring while it is recorded, so memory
stays bounded even on an episode that never ends), and the record says how many steps it lost.

`encode(episodes) -> dict` / `decode(dict) -> list[Episode]` is the record's JSON-safe form, the
one the REPORT carries and the host stores (PROTOCOL.md, "The record"). Format 1:

    {"format": 1, "codec": "zlib-base64", "obs_dim": D, "act_dim": A,
     "episodes": [{"steps": n, "seed": s | null, "truncated_steps": k}, ...],
     "dropped_episodes": m,
     "arrays": {"obs":       {"dtype": "<f4", "shape": [sum(n + 1), D], "filter": F, "data": B64},
                "action":    {"dtype": "<f4", "shape": [sum(n), A], ...},
                "reward":    {"dtype": "<f4", "shape": [sum(n)], ...},
                "clock_s":   {"dtype": "<f8", "shape": [sum(n)], ...},
                "latency_s": {"dtype": "<f4", "shape": [sum(n)], ...}}}

Each field is the episodes' arrays concatenated in order (little-endian, C order), passed
through a lossless filter, deflated with zlib and written as standard base64. The filter is
whichever of these deflates that array smallest: "none"; "shuffle" (the bytes grouped by
significance: all first bytes, then all second bytes, ...; sign and exponent bytes repeat);
"xor-shuffle" (each column's value bits XORed with the previous row's first, which leaves mostly
zero bits in a steady clock). `truncated_steps` counts the steps an episode lost from its start
to the byte cap (its obs[0] is then not the reset observation); `dropped_episodes` counts whole
episodes the caps dropped. Arrays are stored in these dtypes, so arrays already in them
round-trip bit for bit. Standard library and numpy only, and Python 3.9.
"""

from __future__ import annotations

import base64
import binascii
import collections
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agents.errors import DeviceError

FORMAT = 1
CODEC = "zlib-base64"
FILTERS = ("none", "shuffle", "xor-shuffle")
DEFAULT_MAX_EPISODES = 5
DEFAULT_MAX_BYTES = 2 * 1024 * 1024
MIN_MAX_BYTES = 1024
MAX_DIM = 4096  # observation or action values per step; larger is a malformed record

# (field, little-endian dtype, rank) in the order of Episode's fields
FIELDS: tuple[tuple[str, str, int], ...] = (
    ("obs", "<f4", 2),
    ("action", "<f4", 2),
    ("reward", "<f4", 1),
    ("clock_s", "<f8", 1),
    ("latency_s", "<f4", 1),
)
_UINT = {4: "<u4", 8: "<u8"}  # the same bits as unsigned integers, by itemsize
_MAX_RATIO = 1032  # deflate never expands data more than this
_FIRST_CAPACITY = 512  # steps an episode's buffers start with (they double up to the cap)


class RecordError(DeviceError):
    """A record that cannot be encoded or decoded; the message names the field."""


@dataclass(frozen=True)
class Episode:
    """One recorded episode of n control steps.

    obs:       (n + 1, obs_dim) float32; obs[i] is what the policy saw before step i, obs[n] the
               observation after the last step.
    action:    (n, act_dim) float32; the action the policy sent at step i, after clipping, in the
               robot's units (what `Robot.step` received).
    reward:    (n,) float32; the reward of step i.
    clock_s:   (n,) float64; the robot's monotonic clock when obs[i] was read.
    latency_s: (n,) float32; the compute latency the agent passed to `Robot.step` with action i
               (measured, or the robot computer's emulated time on a sim twin).
    seed:      the episode's reset seed, when one was given.
    """

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    clock_s: np.ndarray
    latency_s: np.ndarray
    seed: int | None = None

    @property
    def steps(self) -> int:
        return int(self.action.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays in their record dtypes (what the recorder's byte cap counts)."""
        return _episode_bytes(self.steps, int(self.obs.shape[-1]), int(self.action.shape[-1]))


def _step_bytes(obs_dim: int, act_dim: int) -> int:
    return 4 * obs_dim + 4 * act_dim + 4 + 8 + 4


def _episode_bytes(steps: int, obs_dim: int, act_dim: int) -> int:
    return 4 * obs_dim + steps * _step_bytes(obs_dim, act_dim)


def _positive_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RecordError(f"{name}: {value!r} is not an integer >= {minimum}")
    return value


class Recorder:
    """A bounded record of the last episodes, filled step by step by the control loop.

    Per episode: `begin(obs, clock_s, action_size, seed)`, then per step `step(action, reward,
    latency_s, obs, clock_s)` with the observation the step returned and the clock when it was
    read, then `end()`. `episodes` is the record (oldest first), `encode()` its wire form.
    """

    def __init__(self, max_episodes: int = DEFAULT_MAX_EPISODES, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_episodes = _positive_int("max_episodes", max_episodes, 1)
        self.max_bytes = _positive_int("max_bytes", max_bytes, MIN_MAX_BYTES)
        self._done: collections.deque[tuple[Episode, int]] = collections.deque()
        self.dropped_episodes = 0
        self._open = False

    # --- filling ---------------------------------------------------------------------------
    def begin(self, obs: np.ndarray, clock_s: float, action_size: int, seed: int | None = None) -> None:
        """Start an episode at its first observation (an open episode is discarded)."""
        first = np.array(obs, dtype=np.float32).ravel()
        self._obs_dim = int(first.size)
        self._act_dim = _positive_int("action_size", action_size, 1)
        self._room = self._steps_within(self._obs_dim, self._act_dim)
        self._bufs = self._buffers(min(self._room, _FIRST_CAPACITY))
        self._seen = 0
        self._seed = seed
        self._obs, self._clock = first, float(clock_s)
        self._open = True

    def _steps_within(self, obs_dim: int, act_dim: int) -> int:
        """The steps of one episode that fit the byte cap; at least one is always kept."""
        return max(1, (self.max_bytes - 4 * obs_dim) // _step_bytes(obs_dim, act_dim))

    def _buffers(self, capacity: int) -> dict[str, np.ndarray]:
        return {
            "obs": np.empty((capacity, self._obs_dim), np.float32),
            "action": np.empty((capacity, self._act_dim), np.float32),
            "reward": np.empty(capacity, np.float32),
            "clock_s": np.empty(capacity, np.float64),
            "latency_s": np.empty(capacity, np.float32),
        }

    def step(
        self, action: np.ndarray, reward: float, latency_s: float, obs: np.ndarray, clock_s: float
    ) -> None:
        """One control step: the action sent with its latency, its reward, the observation it
        returned and the robot's clock when that observation was read. Once the episode fills
        the byte cap, each step overwrites the oldest (a ring)."""
        if not self._open:
            raise RecordError("Recorder.step before Recorder.begin")
        act = np.asarray(action, dtype=np.float32).ravel()
        if act.size != self._act_dim:
            raise RecordError(
                f"action: {act.size} values, the episode began with action_size {self._act_dim}"
            )
        nxt = np.array(obs, dtype=np.float32).ravel()
        if nxt.size != self._obs_dim:
            raise RecordError(f"obs: {nxt.size} values, the episode began with {self._obs_dim}")
        capacity = len(self._bufs["reward"])
        if self._seen == capacity < self._room:  # grow (doubling) until the cap, then wrap
            grown = self._buffers(min(self._room, 2 * capacity))
            for name, buf in self._bufs.items():
                grown[name][:capacity] = buf
            self._bufs = grown
        k = self._seen % self._room
        b = self._bufs
        b["obs"][k], b["clock_s"][k], b["action"][k] = self._obs, self._clock, act
        b["reward"][k], b["latency_s"][k] = reward, latency_s
        self._seen += 1
        self._obs, self._clock = nxt, float(clock_s)

    def end(self) -> Episode:
        """Close the open episode and add it to the record; returns it."""
        if not self._open:
            raise RecordError("Recorder.end without an open episode")
        self._open = False
        n = min(self._seen, self._room)
        start = self._seen % self._room if self._seen > self._room else 0
        order = (np.arange(n) + start) % max(1, len(self._bufs["reward"]))
        cols = {name: buf[order] for name, buf in self._bufs.items()}  # oldest kept step first
        self._bufs = {}
        episode = Episode(
            obs=np.concatenate([cols["obs"], self._obs[None, :]]),
            action=cols["action"],
            reward=cols["reward"],
            clock_s=cols["clock_s"],
            latency_s=cols["latency_s"],
            seed=self._seed,
        )
        self._done.append((episode, self._seen - n))
        self._apply_caps()
        return episode

    def add(self, episode: Episode, truncated_steps: int = 0) -> None:
        """Add a whole episode (its last steps only, if it alone exceeds the byte cap), then
        apply the caps: the oldest episodes go first."""
        obs_dim, act_dim = int(episode.obs.shape[-1]), int(episode.action.shape[-1])
        keep = min(episode.steps, self._steps_within(obs_dim, act_dim))
        cut = episode.steps - keep
        if cut:
            episode = Episode(
                obs=episode.obs[cut:],
                action=episode.action[cut:],
                reward=episode.reward[cut:],
                clock_s=episode.clock_s[cut:],
                latency_s=episode.latency_s[cut:],
                seed=episode.seed,
            )
        self._done.append((episode, int(truncated_steps) + cut))
        self._apply_caps()

    def _apply_caps(self) -> None:
        while len(self._done) > self.max_episodes or (len(self._done) > 1 and self.nbytes > self.max_bytes):
            self._done.popleft()
            self.dropped_episodes += 1

    # --- reading ---------------------------------------------------------------------------
    @property
    def episodes(self) -> list[Episode]:
        return [e for e, _ in self._done]

    @property
    def truncated_steps(self) -> list[int]:
        return [k for _, k in self._done]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e, _ in self._done)

    def __len__(self) -> int:
        return len(self._done)

    def encode(self) -> dict[str, Any]:
        return encode(
            self.episodes, truncated_steps=self.truncated_steps, dropped_episodes=self.dropped_episodes
        )


# --- the codec ------------------------------------------------------------------------------
def _filtered(arr: np.ndarray, name: str) -> bytes:
    """The bytes of `arr` (little-endian, (rows, ...)) after filter `name`."""
    if name == "none" or not arr.size:
        return arr.tobytes()
    bits = arr.view(_UINT[arr.dtype.itemsize]).reshape(arr.shape[0], -1)
    if name == "xor-shuffle":
        bits = bits.copy()
        bits[1:] ^= bits[:-1].copy()  # each column against its previous row
    return np.ascontiguousarray(bits).view(np.uint8).reshape(-1, arr.dtype.itemsize).T.tobytes()


def _unfiltered(raw: bytes, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if name == "none" or not raw:
        return np.frombuffer(raw, dtype).reshape(shape)
    itemsize, cols = dtype.itemsize, math.prod(shape[1:])
    bits = np.frombuffer(raw, np.uint8).reshape(itemsize, -1).T.copy().view(_UINT[itemsize]).reshape(-1, cols)
    if name == "xor-shuffle":
        bits = np.bitwise_xor.accumulate(bits, axis=0)
    return bits.view(dtype).reshape(shape)


def _pack(values: np.ndarray, dtype: str) -> dict[str, Any]:
    """{dtype, shape, filter, data}: whichever filter deflates smallest."""
    arr = np.ascontiguousarray(values, dtype=np.dtype(dtype))
    best = min(((zlib.compress(_filtered(arr, f), 6), f) for f in FILTERS), key=lambda c: len(c[0]))
    return {
        "dtype": dtype,
        "shape": list(arr.shape),
        "filter": best[1],
        "data": base64.b64encode(best[0]).decode("ascii"),
    }


def _unpack(name: str, spec: Any, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    where = f"arrays.{name}"
    if not isinstance(spec, dict):
        raise RecordError(f"record {where}: expected an object {{dtype, shape, filter, data}}")
    if spec.get("dtype") != dtype:
        raise RecordError(f"record {where}.dtype: {spec.get('dtype')!r}, format {FORMAT} has {dtype!r}")
    if spec.get("shape") != list(shape):
        raise RecordError(f"record {where}.shape: {spec.get('shape')!r}, the episodes make {list(shape)}")
    filt = spec.get("filter")
    if filt not in FILTERS:
        raise RecordError(f"record {where}.filter: {filt!r} is not one of {', '.join(FILTERS)}")
    data = spec.get("data")
    if not isinstance(data, str):
        raise RecordError(f"record {where}.data: not a base64 string")
    want = np.dtype(dtype).itemsize * math.prod(shape)
    try:
        packed = base64.b64decode(data.encode("ascii"), validate=True)
        if want > _MAX_RATIO * len(packed) + 64:
            raise RecordError(f"record {where}.data: {len(packed)} bytes cannot inflate to the {want} needed")
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, want + 1)  # never inflate past what the shape needs
    except (binascii.Error, UnicodeEncodeError, ValueError, zlib.error) as e:
        raise RecordError(f"record {where}.data: does not decode ({e})") from None
    if len(raw) != want:
        got = f"more than {want}" if len(raw) > want else str(len(raw))
        raise RecordError(f"record {where}.data: inflates to {got} bytes, the shape needs {want}")
    if not inflater.eof or inflater.unused_data:
        raise RecordError(f"record {where}.data: the zlib stream does not end where the array does")
    native = np.dtype(dtype).newbyteorder("=")
    return _unfiltered(raw, filt, np.dtype(dtype), shape).astype(native)


def encode(
    episodes: Sequence[Episode],
    *,
    truncated_steps: Sequence[int] | None = None,
    dropped_episodes: int = 0,
) -> dict[str, Any]:
    """The JSON-safe, compact form of `episodes` (module docstring). Arrays are stored in the
    record's dtypes (float32; float64 for the clock): arrays already in them round-trip exactly."""
    episodes = list(episodes)
    truncated = [0] * len(episodes) if truncated_steps is None else [int(k) for k in truncated_steps]
    if len(truncated) != len(episodes):
        raise RecordError(f"truncated_steps: {len(truncated)} values for {len(episodes)} episodes")
    dims = {(int(e.obs.shape[-1]), int(e.action.shape[-1])) for e in episodes if e.obs.ndim == 2}
    if len(dims) > 1:
        raise RecordError(f"episodes: observation/action sizes differ between episodes {sorted(dims)}")
    obs_dim, act_dim = dims.pop() if dims else (0, 0)
    if episodes and (obs_dim < 1 or act_dim < 1):
        raise RecordError(f"episodes: observation/action sizes {obs_dim}/{act_dim}; both must be >= 1")
    for i, e in enumerate(episodes):
        n = e.steps
        want = {
            "obs": (n + 1, obs_dim),
            "action": (n, act_dim),
            "reward": (n,),
            "clock_s": (n,),
            "latency_s": (n,),
        }
        for name, shape in want.items():
            got = tuple(np.shape(getattr(e, name)))
            if got != shape:
                raise RecordError(f"episode {i} {name}: shape {got}, expected {shape} for {n} steps")
    arrays = {}
    for name, dtype, rank in FIELDS:
        parts = [np.asarray(getattr(e, name), dtype=np.dtype(dtype)) for e in episodes]
        width = {"obs": obs_dim, "action": act_dim}.get(name, 0)
        empty_shape = (0, width) if rank == 2 else (0,)
        joined = np.concatenate(parts) if parts else np.zeros(empty_shape, np.dtype(dtype))
        arrays[name] = _pack(joined, dtype)
    return {
        "format": FORMAT,
        "codec": CODEC,
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "episodes": [
            {"steps": e.steps, "seed": None if e.seed is None else int(e.seed), "truncated_steps": k}
            for e, k in zip(episodes, truncated)
        ],
        "dropped_episodes": int(dropped_episodes),
        "arrays": arrays,
    }


def _index(record: Any) -> tuple[list[dict[str, Any]], int, int]:
    """The validated episode table and sizes of a record, without touching its arrays."""
    if not isinstance(record, dict):
        raise RecordError(f"record: expected an object, got {type(record).__name__}")
    if record.get("format") != FORMAT:
        raise RecordError(f"record format: {record.get('format')!r}, this reader knows format {FORMAT}")
    if record.get("codec") != CODEC:
        raise RecordError(f"record codec: {record.get('codec')!r}, format {FORMAT} uses {CODEC!r}")
    dims = []
    for key in ("obs_dim", "act_dim"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DIM:
            raise RecordError(f"record {key}: {value!r} is not an integer in 0..{MAX_DIM}")
        dims.append(value)
    table = record.get("episodes")
    if not isinstance(table, list):
        raise RecordError("record episodes: expected a list of {steps, seed, truncated_steps}")
    for i, ep in enumerate(table):
        if not isinstance(ep, dict):
            raise RecordError(f"record episodes[{i}]: expected an object")
        for key in ("steps", "truncated_steps"):
            value = ep.get(key, 0 if key == "truncated_steps" else None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RecordError(f"record episodes[{i}].{key}: {value!r} is not an integer >= 0")
        seed = ep.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RecordError(f"record episodes[{i}].seed: {seed!r} is not an integer or null")
    if table and (dims[0] < 1 or dims[1] < 1):
        raise RecordError(f"record obs_dim/act_dim: {dims[0]}/{dims[1]}; episodes need both >= 1")
    dropped = record.get("dropped_episodes", 0)
    if isinstance(dropped, bool) or not isinstance(dropped, int) or dropped < 0:
        raise RecordError(f"record dropped_episodes: {dropped!r} is not an integer >= 0")
    return table, dims[0], dims[1]


def decode(record: Any) -> list[Episode]:
    """The episodes of an encoded record; RecordError (a DeviceError) naming the bad field."""
    table, obs_dim, act_dim = _index(record)
    arrays = record.get("arrays")
    if not isinstance(arrays, dict):
        raise RecordError("record arrays: expected an object {obs, action, reward, clock_s, latency_s}")
    steps = [int(ep["steps"]) for ep in table]
    total = sum(steps)
    shapes = {
        "obs": (total + len(steps), obs_dim),
        "action": (total, act_dim),
        "reward": (total,),
        "clock_s": (total,),
        "latency_s": (total,),
    }
    cols = {name: _unpack(name, arrays.get(name), dtype, shapes[name]) for name, dtype, _ in FIELDS}
    out = []
    o = s = 0  # row offsets into the obs and the per-step arrays
    for ep, n in zip(table, steps):
        out.append(
            Episode(
                obs=cols["obs"][o : o + n + 1],
                action=cols["action"][s : s + n],
                reward=cols["reward"][s : s + n],
                clock_s=cols["clock_s"][s : s + n],
                latency_s=cols["latency_s"][s : s + n],
                seed=ep.get("seed"),
            )
        )
        o, s = o + n + 1, s + n
    return out


def summary(record: Any) -> dict[str, Any]:
    """What a record holds, from its table alone: episodes, steps, truncated steps per episode,
    dropped episodes, and the characters of its arrays' data. RecordError if malformed."""
    table, obs_dim, act_dim = _index(record)
    arrays = record.get("arrays")
    data = (
        sum(len(a.get("data", "")) for a in arrays.values() if isinstance(a, dict))
        if isinstance(arrays, dict)
        else 0
    )
    return {
        "episodes": len(table),
        "steps": [int(ep["steps"]) for ep in table],
        "truncated_steps": [int(ep.get("truncated_steps", 0)) for ep in table],
        "dropped_episodes": int(record.get("dropped_episodes", 0)),
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "data_chars": data,
    }


__all__ = [
    "CODEC",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_EPISODES",
    "FORMAT",
    "Episode",
    "RecordError",
    "Recorder",
    "decode",
    "encode",
    "summary",
]
