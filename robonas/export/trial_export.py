"""Export one trained trial to a deployable TFLite artifact (int8 by default), with a parity check.

Leans on `robonas.export.tflite_convert` (litert-torch for the float graph, ai-edge-quantizer for int8),
`device_agents.runtime.TFLitePolicy` (the interpreter the robot runs, so the parity figures are
those of the shipped bytes) and `robonas.export.artifact` (manifest, atomic files, Ed25519 signature).

`DeployableActor` is the torch reference of one control step, raw sensor values in, ready action
out. It is two pieces:
- observation normalisation as SB3's `VecNormalize` applied it in training, kept out of the
  exported graph: the manifest carries it (`input_normalisation`) and the robot applies it, as
  `device_agents.runtime` explains ("Observation normalisation", the contract `TFLitePolicy`'s
  `input_normalisation` follows);
- `PolicyHead`, the exported graph: the actor and the action post-processing of SB3's
  deterministic `predict`: PPO on a Box clips the Gaussian mean to the bounds; SAC squashes with
  tanh and rescales [-1, 1] to [low, high]; a Discrete space takes the argmax of the logits.
The int8 quantiser is therefore calibrated on normalised observations, and the parity check runs
the whole robot path (raw obs -> TFLitePolicy with normalisation -> action) against
`DeployableActor` on raw obs.

Discrete actions leave the model as ONE float: the action index. ARG_MAX followed by a cast to
float converts cleanly through both tools (checked: one int8 output tensor, no bool tensors,
which a one-hot built from EQUAL/CAST would need), the robot does one `round()`, and integers
0..n-1 survive int8 dequantisation to within half a step ((n-1)/255) for n <= 128.
History: frames are stacked oldest first as in `VecFrameStack`; after a reset SB3 pads with zeros
*after* normalisation, which in raw units is the normalisation mean, so the manifest carries
that vector (`observation.history_pad`) for the robot to pad with.

The rollouts (calibration and parity) are written here rather than with SB3 because they drive
the policy on raw observations, the same way the robot does, one env per seed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from robonas.errors import ConfigError, RobonasError, StoreError
from robonas.space import PolicyArch

if TYPE_CHECKING:
    from robonas.store import Store, StudyRow, TrialRow

TRANSFORMS = ("clip", "tanh_rescale", "argmax")
# Seeds of the rollouts: calibration and parity use disjoint ranges, away from the training
# evaluation seeds (eval_seed defaults to 1000), so the parity observations are held out.
CALIBRATION_SEED = 50_000
PARITY_SEED = 60_000
# At most this many calibration samples reach the quantiser (it runs one interpreter call per
# sample); spread evenly over the rollouts so every episode phase is represented.
MAX_CALIBRATION_SAMPLES = 2000
REQUIRED_FILES = ("actor", "obs_norm", "spaces")


class ExportRefused(RobonasError):
    """The converted model lost too much return against the torch policy; nothing was written."""

    def __init__(self, message: str, parity: dict[str, Any]):
        super().__init__(message)
        self.parity = parity


# --- the policy ---------------------------------------------------------------------------------
class PolicyHead(nn.Module):
    """The exported graph: normalised observation (1, input_dim) -> ready action (1, output_dim)."""

    # buffers (registered for continuous actions only)
    low: torch.Tensor
    high: torch.Tensor

    def __init__(self, actor: nn.Module, transform: str, low: torch.Tensor | None, high: torch.Tensor | None):
        super().__init__()
        self.actor = actor
        self.transform = transform
        if low is not None and high is not None:
            self.register_buffer("low", low)
            self.register_buffer("high", high)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.actor(z)
        if self.transform == "argmax":
            return torch.argmax(y, dim=-1, keepdim=True).to(torch.float32)
        if self.transform == "tanh_rescale":
            return self.low + 0.5 * (torch.tanh(y) + 1.0) * (self.high - self.low)
        return torch.minimum(torch.maximum(y, self.low), self.high)


class DeployableActor(nn.Module):
    """Raw observation (1, obs_dim*history) float32 -> ready action (1, act_dim) or (1, 1) index:
    normalisation (`normalise`), then `head`, the part that is exported."""

    # buffers
    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(
        self, arch: PolicyArch, actor: nn.Module, obs_norm: dict[str, np.ndarray], spaces: dict[str, Any]
    ):
        super().__init__()
        self.arch = arch
        self.actor = actor.eval()
        self.spaces = spaces
        action = spaces["action"]
        self.transform = action.get("transform")
        if self.transform not in TRANSFORMS:
            raise ConfigError(
                f"spaces.json action.transform: {self.transform!r} is not one of {', '.join(TRANSFORMS)}"
            )
        self.discrete = bool(action["discrete"])
        mean = np.asarray(obs_norm["mean"], np.float64).ravel()
        var = np.asarray(obs_norm["var"], np.float64).ravel()
        if mean.size != arch.obs_dim or var.size != arch.obs_dim:
            raise ConfigError(
                f"obs_norm: mean/var have {mean.size}/{var.size} values, the arch's obs_dim is {arch.obs_dim}"
            )
        self.frame_mean = mean.astype(np.float32)
        self.clip_obs = float(obs_norm["clip_obs"])
        # per frame statistics, tiled over the history (VecNormalize runs before VecFrameStack)
        self._std = np.tile(np.sqrt(var + float(obs_norm["epsilon"])), arch.history)
        self._mean = np.tile(mean, arch.history)
        self.register_buffer("mean", torch.tensor(self._mean, dtype=torch.float32))
        self.register_buffer("inv_std", torch.tensor(1.0 / self._std, dtype=torch.float32))
        low = high = None
        if self.discrete:
            self.output_dim = 1
        else:
            lo, hi = _finite_bounds(action, arch.act_dim)
            low = torch.tensor(lo, dtype=torch.float32)
            high = torch.tensor(hi, dtype=torch.float32)
            self.output_dim = arch.act_dim
        self.head = PolicyHead(self.actor, self.transform, low, high)

    def input_normalisation(self) -> dict[str, Any]:
        """The manifest's `input_normalisation`: per element of the stacked input (history
        expanded), what `TFLitePolicy(..., input_normalisation=...)` takes."""
        return {
            "mean": [float(v) for v in self._mean],
            "std": [float(v) for v in self._std],
            "clip": self.clip_obs,
        }

    def normalise_torch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp((x - self.mean) * self.inv_std, -self.clip_obs, self.clip_obs)

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        """Raw stacked observations (N, input_dim) -> what the exported head takes, float32."""
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(raw, np.float32).reshape(-1, self.arch.input_dim))
            return self.normalise_torch(x).numpy()

    @classmethod
    def from_files(
        cls, actor_path: str | Path, obs_norm_path: str | Path, spaces_path: str | Path, arch: PolicyArch
    ) -> DeployableActor:
        """From the files training wrote (actor.pt, obs_norm.npz, spaces.json: `trial_weights`)."""
        if not isinstance(arch, PolicyArch):
            raise ConfigError(f"arch: {arch!r} is not a PolicyArch (the trial's architecture)")
        for p in (actor_path, obs_norm_path, spaces_path):
            if not Path(p).is_file():
                raise RobonasError(f"weights file {p} is missing")
        try:
            spaces = json.loads(Path(spaces_path).read_text())
            with np.load(obs_norm_path) as f:
                obs_norm = {k: f[k] for k in ("mean", "var", "clip_obs", "epsilon")}
            state = torch.load(actor_path, weights_only=True, map_location="cpu")
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise RobonasError(f"cannot read the weights in {Path(actor_path).parent}: {e}") from e
        actor = arch.build_actor()
        try:
            actor.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise RobonasError(f"{actor_path} does not fit arch {arch.describe()!r}: {e}") from e
        return cls(arch, actor, obs_norm, spaces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.normalise_torch(x))

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Torch reference of one control step: stacked raw observation -> action (output_dim,)."""
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(obs, np.float32).reshape(1, -1))
            return self(x).numpy()[0]


def _finite_bounds(action: dict[str, Any], act_dim: int) -> tuple[np.ndarray, np.ndarray]:
    low = [-np.inf if v is None else float(v) for v in action["low"]]
    high = [np.inf if v is None else float(v) for v in action["high"]]
    if len(low) != act_dim or len(high) != act_dim:
        raise ConfigError(
            f"spaces.json action bounds have {len(low)}/{len(high)} values, the arch's act_dim is {act_dim}"
        )
    if action["transform"] == "tanh_rescale" and not all(map(math.isfinite, low + high)):
        raise ConfigError("spaces.json: tanh_rescale needs finite action bounds")
    # An unbounded side is not clipped: a float32 limit clips nothing yet keeps the graph simple.
    big = float(np.finfo(np.float32).max)
    return np.clip(low, -big, big), np.clip(high, -big, big)


# --- rollouts -----------------------------------------------------------------------------------
def _to_env_action(action: np.ndarray, spaces: dict[str, Any]) -> int | np.ndarray:
    a = spaces["action"]
    if a["discrete"]:
        return int(np.clip(np.rint(action[0]), 0, a["n"] - 1))
    return np.asarray(action, np.float32).reshape(a["shape"])


def rollouts(
    actor: DeployableActor,
    act: Callable[[np.ndarray], np.ndarray],
    env_id: str,
    env_kwargs: dict[str, Any],
    seeds: list[int],
    randomization: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One episode per seed driven by `act` (stacked raw obs -> action); (returns, inputs seen).

    The history is kept the way the robot keeps it: oldest frame first, padded after a reset with
    the normalisation mean (the raw value that normalises to SB3's zero padding).
    """
    from robonas.search.training import make_env

    h, obs_dim = actor.arch.history, actor.arch.obs_dim
    returns, inputs = [], []
    env = make_env(env_id, env_kwargs, randomization)
    try:
        for seed in seeds:
            obs, _ = env.reset(seed=int(seed))
            frames = np.tile(actor.frame_mean, h)
            total, done = 0.0, False
            while not done:
                frames = np.concatenate([frames[obs_dim:], np.asarray(obs, np.float32).ravel()])
                inputs.append(frames)
                obs, reward, terminated, truncated, _ = env.step(_to_env_action(act(frames), actor.spaces))
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return np.asarray(returns), np.asarray(inputs, np.float32).reshape(-1, actor.arch.input_dim)


def calibration_inputs(
    actor: DeployableActor,
    env_id: str,
    env_kwargs: dict[str, Any],
    episodes: int,
    randomization: dict[str, Any] | None,
) -> np.ndarray:
    """Raw stacked observations from rollouts of the torch policy under the study's robustness
    randomisation (a wider spread of states than nominal runs: the int8 ranges must cover them)."""
    if not env_id.startswith("sim/"):
        randomization = None  # only sim envs can be randomised; gymnasium ones run nominal
    seeds = [CALIBRATION_SEED + i for i in range(episodes)]
    _, inputs = rollouts(actor, actor.act, env_id, env_kwargs, seeds, randomization or None)
    if len(inputs) > MAX_CALIBRATION_SAMPLES:
        inputs = inputs[np.linspace(0, len(inputs) - 1, MAX_CALIBRATION_SAMPLES).astype(int)]
    return inputs


def parity(
    actor: DeployableActor, model: bytes, env_id: str, env_kwargs: dict[str, Any], episodes: int
) -> dict[str, Any]:
    """Action error on held-out observations and sim return of the TFLite model (`head`
    exported, run with the actor's input normalisation, as the robot runs it) vs torch on raw obs.

    The torch policy's own episodes (parity seeds, nominal dynamics) supply the held-out
    observations; the TFLite model then plays the same seeds through the interpreter.
    """
    from device_agents.runtime import TFLitePolicy

    policy = TFLitePolicy(model, input_normalisation=actor.input_normalisation())
    seeds = [PARITY_SEED + i for i in range(episodes)]
    torch_returns, held_out = rollouts(actor, actor.act, env_id, env_kwargs, seeds)
    ref = np.stack([actor.act(x) for x in held_out])
    got = np.stack([policy.act(x) for x in held_out])
    if actor.discrete:
        got = np.rint(got)  # what the robot executes
    err = np.abs(got - ref)
    tflite_returns, _ = rollouts(actor, policy.act, env_id, env_kwargs, seeds)
    figures: dict[str, Any] = {
        "episodes": episodes,
        "seeds": [seeds[0], seeds[-1]],
        "held_out_observations": len(held_out),
        "action_max_abs_error": float(err.max()),
        "action_mean_abs_error": float(err.mean()),
        "torch_return": float(torch_returns.mean()),
        "tflite_return": float(tflite_returns.mean()),
        "return_drop": float(torch_returns.mean() - tflite_returns.mean()),
    }
    if actor.discrete:
        figures["action_mismatch_rate"] = float((err > 0).mean())
    return figures


# --- export of a stored trial -------------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: dict[str, Any]
    artifact_id: int


def _pick_trial(store: Store, study: StudyRow, trial_id: int | None) -> TrialRow:
    if trial_id is None:
        from robonas.study_views import ranked_trials

        table = ranked_trials(store, study.name)
        if not table.rows:
            raise RobonasError(f"study {study.name!r} has no complete trial to export")
        best = table.best_within_budget()
        if best is None:
            raise RobonasError(
                f"study {study.name!r}: no complete trial fits the latency budget "
                "by the newest latency model (see `robonas top`); export one "
                "with --trial ID to ship it anyway"
            )
        trial_id = best.trial
    try:
        trial = store.get_trial(trial_id)
    except StoreError as e:
        raise StoreError(f"trial {trial_id}: {e}") from e
    if trial.study_id != study.id:
        raise RobonasError(f"trial {trial_id} belongs to another study, not {study.name!r}")
    if trial.status != "complete":
        raise RobonasError(f"trial {trial_id} is {trial.status}, only complete trials can be exported")
    return trial


def trial_weights(store: Store, trial: TrialRow) -> dict[str, str]:
    """The files training wrote for `trial` (actor, obs_norm, spaces), checked to exist."""
    rows = store.artifacts(trial.id, "weights")
    if not rows:
        raise RobonasError(f"trial {trial.id} has no weights artifact (was it trained by this robonas?)")
    meta = rows[-1].meta
    missing = [k for k in REQUIRED_FILES if not meta.get(k) or not Path(meta[k]).is_file()]
    if missing:
        raise RobonasError(
            f"trial {trial.id}: weights file(s) {', '.join(missing)} missing under {rows[-1].path}"
        )
    return meta


def _check_index_range(model: bytes, n: int) -> None:
    """The int8 output's range is the range of indices seen while calibrating; an action the
    calibration rollouts never took would saturate to a smaller index on the robot."""
    from device_agents.runtime import TFLitePolicy

    scale, zero_point = TFLitePolicy(model).output_quantization
    top = (127 - zero_point) * scale
    if top < n - 1 - 0.5:
        raise RobonasError(
            f"int8 output can only express action indices up to {top:.2f}, the space has {n} "
            "actions: the calibration rollouts never took the largest; use more "
            "export.calibration_episodes or export fp32"
        )


def _control_hz(env_id: str, env_kwargs: dict[str, Any]) -> float | None:
    from robonas.search.training import make_env

    env = make_env(env_id, env_kwargs)
    try:
        hz = getattr(env.unwrapped, "control_hz", None) or env.metadata.get("render_fps")
        return None if hz is None else float(hz)
    finally:
        env.close()


def export_trial(
    store: Store,
    study_name: str,
    trial_id: int | None = None,
    *,
    fp32: bool = False,
    key_path: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> ExportResult:
    """Convert, check and write one complete trial (the study's best when trial_id is None).

    Raises ExportRefused when the TFLite model's mean return falls more than
    `export.max_return_drop` x (return_hi - return_lo) below the torch policy's.
    """
    from robonas.artifact_location import study_artifact_root
    from robonas.config import parse_config
    from robonas.export.artifact import build_manifest, load_artifact, write_artifact
    from robonas.export.tflite_convert import to_tflite_fp32, to_tflite_int8

    study = store.get_study(study_name)
    trial = _pick_trial(store, study, trial_id)
    files = trial_weights(store, trial)
    config = parse_config(study.config.get("search") or {}, f"study {study_name!r} config")
    resolved = study.config.get("resolved") or {}
    if "return_lo" not in resolved or "return_hi" not in resolved:
        raise RobonasError(
            f"study {study_name!r} has no resolved return range (return_lo, "
            "return_hi); has its search started?"
        )
    lo, hi = float(resolved["return_lo"]), float(resolved["return_hi"])

    arch = trial.arch
    actor = DeployableActor.from_files(files["actor"], files["obs_norm"], files["spaces"], arch)
    env_id = actor.spaces.get("env_id") or config.env.id
    env_kwargs = dict(config.env.kwargs)
    precision = "fp32" if fp32 else "int8"
    # the graph takes normalised observations; the robot normalises (see the module docstring)
    if fp32:
        model = to_tflite_fp32(actor.head, arch.input_dim)
    else:
        # the robustness ranges ("fleet": the identified twins' ranges the study resolved)
        ranges = resolved.get("fleet_randomization") if config.robustness == "fleet" else config.robustness
        calib = calibration_inputs(
            actor, env_id, env_kwargs, config.export.calibration_episodes, dict(ranges or {})
        )
        model = to_tflite_int8(actor.head, actor.normalise(calib))
        if actor.discrete:
            _check_index_range(model, actor.spaces["action"]["n"])

    figures = parity(actor, model, env_id, env_kwargs, config.export.parity_episodes)
    allowed = config.export.max_return_drop * (hi - lo)
    figures.update(
        max_return_drop=config.export.max_return_drop, allowed_drop=allowed, return_lo=lo, return_hi=hi
    )
    if figures["return_drop"] > allowed:
        raise ExportRefused(
            f"export of trial {trial.id} ({precision}) refused: mean return {figures['tflite_return']:.1f}"
            f" vs torch {figures['torch_return']:.1f} over {figures['episodes']} episodes, a drop of "
            f"{figures['return_drop']:.1f} > allowed {allowed:.1f} "
            f"({config.export.max_return_drop:g} x return range {hi - lo:.1f}); action error max "
            f"{figures['action_max_abs_error']:.4g}, mean {figures['action_mean_abs_error']:.4g}",
            figures,
        )

    manifest = build_manifest(
        model=model,
        study=study.name,
        trial=trial.id,
        arch=arch,
        spaces=actor.spaces,
        frame_mean=actor.frame_mean,
        control_hz=_control_hz(env_id, env_kwargs),
        parity=figures,
        precision=precision,
        input_normalisation=actor.input_normalisation(),
    )
    dest = (
        Path(out_dir)
        if out_dir is not None
        else (
            study_artifact_root(store, study)
            / "studies"
            / study.name
            / "artifacts"
            / f"trial-{trial.id}-{precision}"
        )
    )
    if key_path is not None:
        from device_agents.signing import SigningError, load_private_key

        try:
            load_private_key(key_path)  # a bad key fails here, with its own message
        except SigningError as e:
            raise RobonasError(f"signing key: {e}") from e
    # a key *path*: the artifact's sequence comes from the counter beside the key (agents refuse
    # artifacts older than the newest they run)
    write_artifact(dest, model, manifest, key_path)
    manifest = load_artifact(dest)[0] if key_path is not None else manifest  # with its sequence
    row = store.add_artifact(
        trial.id, f"tflite-{precision}", str(dest), hashlib.sha256(model).hexdigest(), meta=manifest
    )
    return ExportResult(dest, manifest, row.id)


__all__ = [
    "DeployableActor",
    "ExportRefused",
    "ExportResult",
    "PolicyHead",
    "calibration_inputs",
    "export_trial",
    "parity",
    "rollouts",
]
