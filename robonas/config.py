"""Search configuration: a TOML file in `launch/` -> a validated `SearchConfig`.

Validation leans on pydantic (unknown keys are refused, types and ranges are checked); this
module only turns pydantic's report into one line that names the field, the bad value and what
would be valid. Checks that need other parts of robonas (env ids, device profiles, the search
space, randomisation ranges) run in `SearchConfig.validate_references`, still before anything
is written to the store.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from robonas.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StudySection(_Section):
    name: str | None = Field(default=None, min_length=1, description="default study name")


class EnvSection(_Section):
    id: str = Field(description="registered env id, e.g. sim/CartPole-v0")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to sim.make")
    return_target: float = Field(description="return that counts as solved: top of the AUC range")
    return_floor: float | None = Field(
        default=None, description="bottom of the AUC range; default: the random policy's measured return"
    )
    return_max: float | None = Field(
        default=None, description="the most an episode can pay; caps the asymptotic-return estimate"
    )


class StrategySection(_Section):
    name: Literal["random", "evolution", "reinforce", "tpe", "nsga2"] = "evolution"
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)


class BudgetSection(_Section):
    trials: int = Field(gt=0, description="trained trials (rejected candidates do not count)")
    steps_per_trial: int = Field(gt=0, description="env steps of training per trial")
    checkpoints: int = Field(default=5, ge=2, description="evaluations along the learning curve")
    eval_episodes: int = Field(default=5, gt=0)
    early_eval_episodes: int | None = Field(
        default=None,
        gt=0,
        description="episodes at checkpoints before the last third of the curve (default: eval_episodes)",
    )
    eval_seed: int = 1000
    trial_timeout_s: float = Field(default=1800.0, gt=0)
    max_rejections: int = Field(default=200, gt=0, description="stop after this many over-budget candidates")


class TrainingSection(_Section):
    algo: Literal["ppo", "sac"] = "ppo"
    n_envs: int = Field(default=4, gt=0)
    hyperparams: dict[str, Any] = Field(default_factory=dict)
    randomization: dict[str, Any] | Literal["fleet"] | None = Field(
        default=None,
        description='ranges to train under, or "fleet": the identified twins\' ranges (nominal if unset)',
    )
    # TensorBoard logs per trial, in the trial's folder (pip install 'robonas[tensorboard]')
    tensorboard: bool = False


class PruningSection(_Section):
    """Asynchronous successive halving on the checkpoints (robonas.search.pruning)."""

    kind: Literal["none", "asha"] = "none"
    eta: int = Field(default=3, ge=2, description="a trial goes on past a rung when in the top 1/eta")
    grace: int = Field(default=3, ge=2, description="trials at a rung before any is stopped there")
    min_rung: int = Field(default=1, ge=1, description="no rung before this checkpoint (1-based)")


class SeedCheckSection(_Section):
    """Before the best is reported, the best candidates are trained again on other seeds."""

    top: int = Field(default=2, ge=0, description="how many of the best candidates are checked")
    seeds: int = Field(default=2, ge=1, description="seeds each checked candidate is trained on")


class ObjectiveSection(_Section):
    auc: float = Field(default=0.5, ge=0)
    real_return: float = Field(default=0.5, ge=0)
    ranking: Literal["mean", "lcb"] = "mean"
    lcb_z: float = Field(default=1.0, ge=0)
    # once robots have twins: the predicted real return over the fleet is its mean or its worst robot
    fleet: Literal["mean", "worst"] = "mean"


class DeviceSection(_Section):
    profile: str = Field(description="a device profile name from launch/devices/")
    latency_budget_ms: float = Field(gt=0, description="p99 inference latency budget")


class ExecutorSection(_Section):
    kind: Literal["local", "ray"] = "local"
    workers: int | None = Field(default=None, gt=0)
    # Ray only: the cluster to join (default: RAY_ADDRESS, else a local Ray started on demand)
    # and the CPUs one trial asks for
    address: str | None = None
    cpus_per_trial: float = Field(default=1.0, gt=0)
    # how often a trial whose process (or Ray worker) died without a result is run again
    max_retries: int = Field(default=2, ge=0)
    # a search process's claim on a trial lasts this long without renewal (see search/claims.py)
    lease_s: float = Field(default=60.0, ge=5.0)


class ArtifactsSection(_Section):
    """Where trial weights and exported artifacts go (robonas.artifact_location)."""

    dir: str | None = Field(
        default=None, description="a directory every worker can read; required with a shared store"
    )


class ExportSection(_Section):
    max_return_drop: float = Field(
        default=0.05, ge=0, le=1, description="largest int8 return drop, as a share of the return range"
    )
    calibration_episodes: int = Field(default=8, gt=0)
    parity_episodes: int = Field(default=5, gt=0)


class CalibrationSection(_Section):
    canary_returns: bool = Field(
        default=False,
        description="count canary episodes as real returns (they are checks, not measurements)",
    )
    auto_refit: bool = Field(
        default=True, description="refit the latency and gap models after runs that bring new reports"
    )


class SearchConfig(_Section):
    study: StudySection = Field(default_factory=StudySection)
    env: EnvSection
    space: dict[str, Any] = Field(default_factory=dict)
    strategy: StrategySection = Field(default_factory=StrategySection)
    budget: BudgetSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    # ranges the robustness figure is measured under, or "fleet": the identified twins' ranges
    robustness: dict[str, Any] | Literal["fleet"] = Field(default_factory=dict)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    device: DeviceSection
    gap: dict[str, float] = Field(default_factory=dict)
    executor: ExecutorSection = Field(default_factory=ExecutorSection)
    artifacts: ArtifactsSection = Field(default_factory=ArtifactsSection)
    export: ExportSection = Field(default_factory=ExportSection)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    pruning: PruningSection = Field(default_factory=PruningSection)
    seed_check: SeedCheckSection = Field(default_factory=SeedCheckSection)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """Hash of what defines a study's trials (env, space, strategy, training, budget per trial).

        Changing these under an existing study would mix incomparable trials, so a resume with
        a different fingerprint is refused. The trial count may grow between runs.
        """
        d = self.to_dict()
        keep = {k: d[k] for k in ("env", "space", "strategy", "training", "robustness", "device")}
        # where the logs go changes no trial
        keep["training"] = {k: v for k, v in keep["training"].items() if k != "tensorboard"}
        keep["budget"] = {k: v for k, v in d["budget"].items() if k not in ("trials", "max_rejections")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def with_overrides(
        self,
        *,
        trials: int | None = None,
        steps: int | None = None,
        workers: int | None = None,
        executor: str | None = None,
    ) -> SearchConfig:
        budget = self.budget.model_copy(
            update={k: v for k, v in (("trials", trials), ("steps_per_trial", steps)) if v is not None}
        )
        if executor is not None and executor not in ("local", "ray"):
            raise ConfigError(f"--executor: {executor!r} is not one of local, ray")
        updates: dict[str, Any] = {"workers": workers} if workers else {}
        if executor is not None:
            updates["kind"] = executor
        for name, value in (("--trials", trials), ("--steps", steps), ("--workers", workers)):
            if value is not None and value <= 0:
                raise ConfigError(f"{name}: {value} is not a positive integer")
        executor_section = self.executor.model_copy(update=updates)
        return self.model_copy(update={"budget": budget, "executor": executor_section})

    def validate_references(self) -> None:
        """Check names that refer to other registries: env id, device, randomisation table."""
        import sim
        from robonas.models.devices import load_device

        if self.env.id not in sim.ENV_IDS:
            raise ConfigError(f"env.id: unknown env {self.env.id!r}; valid: {', '.join(sim.ENV_IDS)}")
        load_device(self.device.profile)
        training_space = self.space.get("training", {})
        if training_space:
            from robonas.search.training import check_searched_settings

            if not isinstance(training_space, dict):
                raise ConfigError(f"space.training: {training_space!r} is not a table of settings")
            check_searched_settings(self.training.algo, self.env.id, training_space)
        from sim.randomization import RandomizationConfig

        for key, table in (
            ("robustness", self.robustness),
            ("training.randomization", self.training.randomization),
        ):
            if isinstance(table, dict) and table:
                try:
                    RandomizationConfig.from_dict(table)
                except ValueError as e:
                    raise ConfigError(f"{key}: {e}") from e

    @property
    def uses_fleet(self) -> bool:
        """Whether a range table comes from the fleet's identified twins."""
        return "fleet" in (self.robustness, self.training.randomization)


def _format_validation_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown key {loc!r}"
    if kind == "missing":
        return f"{source}: missing required key {loc!r}"
    return f"{source}: {loc}: {first['msg']} (got {first.get('input')!r})"


def parse_config(data: dict[str, Any], source: str = "config") -> SearchConfig:
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(source, e)) from e


def load_config(path: str | Path) -> SearchConfig:
    """Read and validate a search config file; every problem is a ConfigError naming the field."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror or e}") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: malformed TOML: {e}") from e
    return parse_config(data, str(p))
