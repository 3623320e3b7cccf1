"""Replay one trained trial in its environment: its return per episode and an animated GIF, the
way rl-zoo3's `enjoy` shows a trained agent.

Two policies can drive the env, both deterministic, both on raw observations:
- the trial's torch policy: `DeployableActor.from_files` on the files training wrote
  (`trial_weights`), i.e. SB3's `predict(deterministic=True)` with the study's observation
  normalisation;
- an exported artifact (`policy.tflite` + `manifest.json`), run by
  `device_agents.runtime.TFLitePolicy` with the manifest's `input_normalisation`, the history
  padded with `observation.history_pad` and the action clipped (an index rounded) to the
  manifest's limits, as the robot's control loop does: the returns are what the robot's
  interpreter earns in the nominal simulator.
The episode loop is `robonas.export.trial_export.rollouts`'s (oldest frame first, one seed per
episode), so replaying the parity seeds gives the parity figures back.

The env is built as training built it (`robonas.search.training.make_env`, the study's env
kwargs). Frames come from the env's own `render_mode="rgb_array"`: the sim envs render with
pybullet's TinyRenderer (`getCameraImage`), which needs no display. The GIF is written with
Pillow's GIF writer (Pillow is installed as a dependency of matplotlib, a host dependency).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from robonas.errors import ConfigError, RobonasError, StoreError

if TYPE_CHECKING:
    import gymnasium as gym

    from robonas.store import Store, StudyRow, TrialRow

DEFAULT_EPISODES = 3
MAX_EPISODES = 1000
DEFAULT_VIDEO_FRAMES = 300
# Browsers play a GIF frame delay under 20 ms as 100 ms (a slow-motion video), so a faster env is
# recorded every k-th step, k the smallest giving >= 20 ms a frame; GIF delays are centiseconds.
MIN_FRAME_MS = 20


@dataclass(frozen=True)
class Video:
    path: Path
    frames: int  # frames captured (Pillow merges identical consecutive ones when it writes)
    frame_ms: int  # delay of each frame in the GIF
    every: int  # control steps per frame


@dataclass(frozen=True)
class ReplayResult:
    study: str
    trial: int
    env_id: str
    policy: str  # "torch", or "tflite-<precision>" for an artifact
    artifact: str | None
    seeds: tuple[int, ...]
    returns: tuple[float, ...]
    lengths: tuple[int, ...]
    video: Video | None

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std_return(self) -> float:
        return float(np.std(self.returns))

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "trial": self.trial,
            "env_id": self.env_id,
            "policy": self.policy,
            "artifact": self.artifact,
            "episodes": len(self.returns),
            "seeds": list(self.seeds),
            "returns": list(self.returns),
            "lengths": list(self.lengths),
            "mean_return": self.mean_return,
            "std_return": self.std_return,
            "video": None
            if self.video is None
            else {
                "path": str(self.video.path),
                "frames": self.video.frames,
                "frame_ms": self.video.frame_ms,
                "steps_per_frame": self.video.every,
            },
        }


@dataclass(frozen=True)
class _Driver:
    """What the episode loop needs of a policy: stacked raw observation -> env action."""

    name: str
    env_id: str
    obs_dim: int
    history: int
    pad: np.ndarray  # one raw frame the history is filled with after a reset
    act: Callable[[np.ndarray], int | np.ndarray]


# --- checks -------------------------------------------------------------------------------------
def _whole(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    ok = (
        isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    )
    if not ok:
        valid = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"
        raise ConfigError(f"{name}: {value!r} is not valid; give {valid}")
    return int(value)


def _video_path(video: str | Path | None) -> Path | None:
    if video is None:
        return None
    path = Path(video)
    if path.suffix.lower() != ".gif":
        raise ConfigError(f"--video: {str(path)!r} is not a .gif path (replay writes animated GIFs)")
    if path.is_dir():
        raise ConfigError(f"--video: {str(path)!r} is a directory; give a file name such as out.gif")
    return path


def _trial(store: Store, study: StudyRow, trial_id: int) -> TrialRow:
    try:
        trial = store.get_trial(trial_id)
    except StoreError as e:
        raise StoreError(f"trial {trial_id}: {e}") from e
    if trial.study_id != study.id:
        raise RobonasError(f"trial {trial_id} belongs to another study, not {study.name!r}")
    return trial


# --- the two policies ---------------------------------------------------------------------------
def _torch_driver(store: Store, trial: TrialRow, default_env: str) -> _Driver:
    from robonas.export.trial_export import DeployableActor, trial_weights

    files = trial_weights(store, trial)
    actor = DeployableActor.from_files(files["actor"], files["obs_norm"], files["spaces"], trial.arch)
    action = actor.spaces["action"]

    def act(frames: np.ndarray) -> int | np.ndarray:
        a = actor.act(frames)
        if actor.discrete:  # the index as a float, as the exported graph gives it
            return int(np.clip(np.rint(a[0]), 0, int(action["n"]) - 1))
        return np.asarray(a, np.float32).reshape(action["shape"])

    return _Driver(
        name="torch",
        env_id=str(actor.spaces.get("env_id") or default_env),
        obs_dim=actor.arch.obs_dim,
        history=actor.arch.history,
        pad=np.asarray(actor.frame_mean, np.float32),
        act=act,
    )


def _limits(values: Any, size: int, unbounded: float, where: str) -> np.ndarray:
    if values is None:
        return np.full(size, unbounded)
    if not isinstance(values, list) or len(values) != size:
        raise RobonasError(f"{where}: {values!r} is not a list of {size} limit(s)")
    return np.asarray([unbounded if v is None else float(v) for v in values], np.float64)


def _artifact_driver(directory: str | Path, study: str, trial: int, default_env: str) -> _Driver:
    from device_agents.control_loop import policy_settings
    from device_agents.errors import DeviceError
    from device_agents.runtime import TFLitePolicy
    from robonas.export.artifact import load_artifact

    d = Path(directory)
    if not d.is_dir():
        raise RobonasError(f"--artifact: {str(d)!r} is not a directory (policy.tflite + manifest.json)")
    manifest, model, _signature = load_artifact(d)
    if manifest.get("study") != study or manifest.get("trial") != trial:
        raise RobonasError(
            f"artifact {d} is trial {manifest.get('trial')} of study {manifest.get('study')!r}, "
            f"not trial {trial} of {study!r}"
        )
    try:
        # as the agent loads it: the model's bytes and the manifest's normalisation
        policy = TFLitePolicy(model, input_normalisation=manifest.get("input_normalisation"))
    except DeviceError as e:
        raise RobonasError(f"artifact {d}: {e}") from e
    settings = policy_settings(manifest)
    history = int(settings["history"])
    if policy.input.size % history:
        raise RobonasError(f"artifact {d}: model input of {policy.input.size} values, history {history}")
    obs_dim = policy.input.size // history
    pad_raw = settings["history_pad"]
    pad = np.zeros(obs_dim, np.float32) if pad_raw is None else np.asarray(pad_raw, np.float32).ravel()
    if pad.size != obs_dim:
        raise RobonasError(f"artifact {d}: observation.history_pad has {pad.size} values, not {obs_dim}")
    action = manifest.get("action") or {}
    if settings["action_output"] == "index":
        n = action.get("n")
        if not isinstance(n, int) or n < 1:
            raise RobonasError(f"artifact {d}: an index output needs action.n, got {n!r}")

        def act(frames: np.ndarray) -> int | np.ndarray:
            return int(np.clip(np.rint(policy.act(frames)[0]), 0, n - 1))

    else:
        shape = [int(v) for v in action.get("shape") or [policy.output.size]]
        size = int(np.prod(shape))
        if size != policy.output.size:
            raise RobonasError(f"artifact {d}: action shape {shape}, the model outputs {policy.output.size}")
        low = _limits(action.get("low"), size, -np.inf, f"artifact {d}: action.low")
        high = _limits(action.get("high"), size, np.inf, f"artifact {d}: action.high")

        def act(frames: np.ndarray) -> int | np.ndarray:
            # the robot clips every action to the manifest's limits (device_agents.control_loop)
            return np.clip(policy.act(frames), low, high).astype(np.float32).reshape(shape)

    return _Driver(
        name=f"tflite-{manifest.get('precision', 'unknown')}",
        env_id=str(manifest.get("env_id") or default_env),
        obs_dim=obs_dim,
        history=history,
        pad=pad,
        act=act,
    )


# --- frames -------------------------------------------------------------------------------------
class _Frames:
    """Every `every`-th rendered frame of the run, until `limit` are kept."""

    def __init__(self, limit: int, every: int):
        self.limit, self.every = limit, every
        self.frames: list[np.ndarray] = []
        self._ticks = 0

    def capture(self, env: gym.Env[Any, Any]) -> None:
        tick, self._ticks = self._ticks, self._ticks + 1
        if len(self.frames) >= self.limit or tick % self.every:
            return
        import gymnasium as gym

        try:
            frame = env.render()
        except (gym.error.Error, ImportError) as e:  # e.g. a classic-control env without pygame
            raise RobonasError(f"env {env.spec.id if env.spec else env}: cannot render a frame: {e}") from e
        img = np.asarray(frame)
        if img.ndim != 3 or img.shape[2] not in (3, 4) or img.size == 0:
            raise RobonasError(
                f"env render() gave {type(frame).__name__} of shape {img.shape}, not an RGB image"
            )
        self.frames.append(np.ascontiguousarray(img[:, :, :3], dtype=np.uint8))


def _control_hz(env: gym.Env[Any, Any]) -> float:
    hz = getattr(env.unwrapped, "control_hz", None) or env.metadata.get("render_fps") or 30.0
    return float(hz)


def write_gif(path: Path, frames: list[np.ndarray], frame_ms: int) -> None:
    """An endlessly looping GIF, written to a temporary name and moved into place."""
    from PIL import Image

    if not frames:
        raise RobonasError(f"--video: no frames to write to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
        os.replace(tmp, path)
    except OSError as e:
        raise RobonasError(f"--video: cannot write {path}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)


# --- the replay ---------------------------------------------------------------------------------
def _play(
    env: gym.Env[Any, Any], driver: _Driver, seeds: list[int], frames: _Frames | None
) -> tuple[list[float], list[int]]:
    h, obs_dim = driver.history, driver.obs_dim
    returns, lengths = [], []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        if frames is not None:
            frames.capture(env)
        stack = np.tile(driver.pad, h)
        total, steps, done = 0.0, 0, False
        while not done:
            stack = np.concatenate([stack[obs_dim:], np.asarray(obs, np.float32).ravel()])
            obs, reward, terminated, truncated, _ = env.step(driver.act(stack))
            total += float(reward)
            steps += 1
            done = bool(terminated or truncated)
            if frames is not None:
                frames.capture(env)
        returns.append(total)
        lengths.append(steps)
    return returns, lengths


def replay(
    store: Store,
    study_name: str,
    trial_id: int,
    *,
    artifact: str | Path | None = None,
    episodes: int = DEFAULT_EPISODES,
    seed: int = 0,
    video: str | Path | None = None,
    video_frames: int = DEFAULT_VIDEO_FRAMES,
) -> ReplayResult:
    """Run trial `trial_id` of `study_name` for `episodes` episodes (seeds seed, seed+1, ...):
    its torch policy, or the exported `artifact` through the robot's TFLite runtime. With `video`
    (a .gif path) the first `video_frames` frames of the run are written there, from the reset.

    Raises RobonasError (ConfigError, StoreError) for every bad input, naming it.
    """
    from robonas.config import parse_config
    from robonas.search.training import make_env

    episodes = _whole("episodes", episodes, 1, MAX_EPISODES)
    seed = _whole("seed", seed, 0)
    video_frames = _whole("video frames", video_frames, 1)
    gif = _video_path(video)
    study = store.get_study(study_name)
    trial = _trial(store, study, trial_id)
    config = parse_config(study.config.get("search") or {}, f"study {study_name!r} config")
    if artifact is not None:
        driver = _artifact_driver(artifact, study.name, trial.id, config.env.id)
    else:
        driver = _torch_driver(store, trial, config.env.id)
    env_kwargs: dict[str, Any] = dict(config.env.kwargs)
    if gif is not None:
        env_kwargs["render_mode"] = "rgb_array"
    env = make_env(driver.env_id, env_kwargs)
    try:
        space = env.observation_space
        frame = int(np.prod(space.shape)) if space.shape else 0
        if frame != driver.obs_dim:
            raise RobonasError(
                f"{driver.env_id} observes {frame} values, the {driver.name} policy takes {driver.obs_dim}"
            )
        frames = None
        period_ms = 1000.0 / _control_hz(env)
        every = max(1, math.ceil(MIN_FRAME_MS / period_ms - 1e-9))
        if gif is not None:
            frames = _Frames(video_frames, every)
        seeds = [seed + i for i in range(episodes)]
        returns, lengths = _play(env, driver, seeds, frames)
    finally:
        env.close()
    shown = None
    if gif is not None and frames is not None:
        frame_ms = max(MIN_FRAME_MS, round(every * period_ms / 10) * 10)
        write_gif(gif, frames.frames, frame_ms)
        shown = Video(gif, len(frames.frames), frame_ms, every)
    return ReplayResult(
        study=study.name,
        trial=trial.id,
        env_id=driver.env_id,
        policy=driver.name,
        artifact=None if artifact is None else str(artifact),
        seeds=tuple(seeds),
        returns=tuple(returns),
        lengths=tuple(lengths),
        video=shown,
    )


__all__ = ["ReplayResult", "Video", "replay", "write_gif"]
