"""TPE and NSGA-II through Optuna's ask/tell API (optuna is imported lazily, on construction).

Each strategy owns an in-memory Optuna study with a seeded sampler. An ask is `study.ask()`
followed by conditional suggestions: depth first, then width and activation for only that many
layers (so Optuna's group decomposition sees per-depth sub-spaces), then the global flags and
the searched trainer settings ("train.<name>"). The first trial is enqueued with the tuned trainer
settings (`SearchSpace.training_start`), so the search starts from values known to work.
A tell finishes the matching trial; metrics None marks it FAIL, which both samplers ignore.

- TPEStrategy maximises metrics["objective"]. Multivariate, grouped TPE with the constant
  liar, so outstanding asks from parallel workers are not proposed twice.
- NSGA2Strategy maximises metrics["predicted_real_return"] and minimises metrics["p99_ms"].
  A missing return falls back to "objective"; a missing p99 counts as 0.0, which makes the
  search single-objective on return (report both for every trial or for none).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, ClassVar, cast

from robonas.errors import ConfigError
from robonas.space import Layer, PolicyArch, SearchSpace, TrainValue
from robonas.strategies.base import Pending, Strategy

if TYPE_CHECKING:
    from optuna import Study
    from optuna.trial import Trial


class _OptunaStrategy(Strategy):
    def __init__(self, space: SearchSpace, seed: int = 0, **options: Any) -> None:
        super().__init__(space, seed, **options)
        import optuna

        # An in-memory study per search: optuna's "study created" INFO lines would only clutter
        # the search's progress display.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():
            # `group` and friends are flagged experimental; the flag is not news to a user
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study = self._make_study()
        if space.training_start:
            # the first trial starts from the tuned trainer settings; the network is sampled
            self.study.enqueue_trial({f"train.{k}": v for k, v in space.training_start})
        self._pending: Pending[Trial] = Pending()

    def _make_study(self) -> Study:
        """The seeded in-memory study (called once, from __init__, with optuna imported)."""
        raise NotImplementedError

    def _values(self, metrics: dict[str, float]) -> float | list[float]:
        raise NotImplementedError

    def _suggest(self, trial: Trial) -> PolicyArch:
        s = self.space
        depth = trial.suggest_categorical("depth", list(s.depths))
        layers = tuple(
            Layer(
                trial.suggest_categorical(f"width_{i}", list(s.widths)),
                trial.suggest_categorical(f"act_{i}", list(s.activations)),
            )
            for i in range(depth)
        )
        return PolicyArch(
            obs_dim=s.obs_dim,
            act_dim=s.act_dim,
            layers=layers,
            layer_norm=trial.suggest_categorical("layer_norm", list(s.layer_norm)),
            residual=trial.suggest_categorical("residual", list(s.residual)),
            shared_trunk=trial.suggest_categorical("shared_trunk", list(s.shared_trunk)),
            history=trial.suggest_categorical("history", list(s.history)),
            training=tuple(
                (name, cast(TrainValue, trial.suggest_categorical(f"train.{name}", list(values))))
                for name, values in s.training
            ),
        )

    def ask(self) -> PolicyArch:
        trial = self.study.ask()
        arch = self._suggest(trial)
        self._pending.add(arch, trial)
        return arch

    def tell(self, arch: PolicyArch, metrics: dict[str, float] | None) -> None:
        from optuna.trial import TrialState

        trial = self._pending.pop(arch)
        if metrics is None:
            self.study.tell(trial, state=TrialState.FAIL)
        else:
            self.study.tell(trial, self._values(metrics))


def _check_int(key: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"strategy.{key}: {value!r} is not an integer >= {low}")


class TPEStrategy(_OptunaStrategy):
    name = "tpe"
    defaults: ClassVar[dict[str, Any]] = {"n_startup_trials": 10, "n_ei_candidates": 24}

    def _make_study(self) -> Study:
        from optuna import create_study
        from optuna.samplers import TPESampler

        _check_int("n_startup_trials", self.options["n_startup_trials"], 0)
        _check_int("n_ei_candidates", self.options["n_ei_candidates"], 1)
        sampler = TPESampler(
            seed=self.seed,
            n_startup_trials=self.options["n_startup_trials"],
            n_ei_candidates=self.options["n_ei_candidates"],
            multivariate=True,
            group=True,
            constant_liar=True,
        )
        return create_study(direction="maximize", sampler=sampler)

    def _values(self, metrics: dict[str, float]) -> float:
        return self.objective(metrics)


class NSGA2Strategy(_OptunaStrategy):
    name = "nsga2"
    defaults: ClassVar[dict[str, Any]] = {"population_size": 20, "mutation_prob": None, "crossover_prob": 0.9}

    def _make_study(self) -> Study:
        from optuna import create_study
        from optuna.samplers import NSGAIISampler

        _check_int("population_size", self.options["population_size"], 2)
        sampler = NSGAIISampler(
            seed=self.seed,
            population_size=self.options["population_size"],
            mutation_prob=self.options["mutation_prob"],
            crossover_prob=self.options["crossover_prob"],
        )
        return create_study(directions=["maximize", "minimize"], sampler=sampler)

    def _values(self, metrics: dict[str, float]) -> list[float]:
        ret = metrics.get("predicted_real_return")
        p99 = metrics.get("p99_ms")
        return [
            float(ret) if ret is not None else self.objective(metrics),
            float(p99) if p99 is not None else 0.0,
        ]
