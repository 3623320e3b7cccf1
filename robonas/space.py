"""The search space: `PolicyArch`, one policy network, and `SearchSpace`, the set searched.

`PolicyArch` is frozen, hashable and JSON-serialisable. It builds itself as a torch module
(torch imported lazily, so the CLI can print --help without it) and counts its own cost layer
by layer as `robonas.models.costs.LayerCost` rows. The counts are written by hand because they must be
known before any module is built (latency is predicted before training); the tests check them
against the built torch module (`sum(p.numel())`, `torch.utils.flop_counter.FlopCounterMode`).

`SearchSpace` is the set of architectures one search explores, read from the `[space]` table of
a launch TOML. It samples, mutates and encodes an architecture as a vector of integer choices
(numpy's `Generator` supplies the randomness, so a seeded search is reproducible).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from robonas.errors import ConfigError
from robonas.models.costs import LayerCost, totals

if TYPE_CHECKING:
    from robonas._torch_modules import Actor, Trunk

ACTIVATIONS = ("relu", "tanh", "elu", "silu")
# A trainer setting's value: what a TOML scalar can be.
TrainValue = bool | int | float | str
# Short names in `describe()` for the usual trainer settings.
_SHORT_NAMES = {
    "learning_rate": "lr",
    "n_steps": "nsteps",
    "batch_size": "batch",
    "n_epochs": "epochs",
    "gae_lambda": "lambda",
    "ent_coef": "ent",
    "clip_range": "clip",
    "buffer_size": "buffer",
    "train_freq": "freq",
    "gradient_steps": "gsteps",
    "target_entropy": "target_ent",
    "learning_starts": "starts",
}


def _fmt_value(v: TrainValue) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)


def _is_train_value(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str)) and not (isinstance(v, float) and not math.isfinite(v))


def _training_items(items: Any) -> tuple[tuple[str, TrainValue], ...]:
    """Trainer settings as a sorted tuple of (name, scalar) pairs; a ConfigError otherwise."""
    if isinstance(items, dict):
        items = tuple(items.items())
    try:
        pairs = [(k, v) for k, v in items]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"arch.training: {items!r} is not a table of settings") from e
    for k, v in pairs:
        if not isinstance(k, str) or not k:
            raise ConfigError(f"arch.training: {k!r} is not a setting name")
        if not _is_train_value(v):
            raise ConfigError(f"arch.training.{k}: {v!r} is not a number, string or true/false")
    names = [k for k, _ in pairs]
    if len(set(names)) != len(names):
        raise ConfigError(f"arch.training: a setting is given twice in {names!r}")
    # numpy scalars (from a decoded decision vector) become plain Python values
    return tuple(sorted((k, v.item() if hasattr(v, "item") else v) for k, v in pairs))


def _is_pos_int(value: Any) -> bool:
    # bool is an int subclass; True must not pass as a width of 1
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and bool(value > 0)


@dataclass(frozen=True)
class Layer:
    width: int
    activation: str

    def __post_init__(self) -> None:
        if not _is_pos_int(self.width):
            raise ConfigError(f"layer width: {self.width!r} is not a positive integer")
        object.__setattr__(self, "width", int(self.width))
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"layer activation: {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")


@dataclass(frozen=True)
class PolicyArch:
    """One policy network: hidden trunk layers plus options; the head is fixed by the env."""

    obs_dim: int
    act_dim: int
    layers: tuple[Layer, ...]
    layer_norm: bool = False
    residual: bool = False
    shared_trunk: bool = False
    history: int = 1
    # Trainer settings searched with the network (learning rate, rollout length, ...), sorted
    # by name; empty when only the network is searched. They are part of the candidate (and
    # of its arch_id), not of the exported network.
    training: tuple[tuple[str, TrainValue], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "training", _training_items(self.training))
        for name in ("obs_dim", "act_dim", "history"):
            value = getattr(self, name)
            if not _is_pos_int(value):
                raise ConfigError(f"arch.{name}: {value!r} is not a positive integer")
            object.__setattr__(self, name, int(value))
        if not self.layers:
            raise ConfigError("arch.layers: at least one hidden layer is required")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise ConfigError(f"arch.layers[{i}]: {layer!r} is not a Layer(width, activation)")
        for name in ("layer_norm", "residual", "shared_trunk"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ConfigError(f"arch.{name}: {value!r} is not true or false")
            object.__setattr__(self, name, bool(value))

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "obs_dim": self.obs_dim,
            "act_dim": self.act_dim,
            "layers": [[layer.width, layer.activation] for layer in self.layers],
            "layer_norm": self.layer_norm,
            "residual": self.residual,
            "shared_trunk": self.shared_trunk,
            "history": self.history,
            # only when searched, so a network-only candidate keeps its arch_id
            **({"training": dict(self.training)} if self.training else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PolicyArch:
        try:
            return cls(
                obs_dim=int(d["obs_dim"]),
                act_dim=int(d["act_dim"]),
                layers=tuple(Layer(int(w), str(a)) for w, a in d["layers"]),
                layer_norm=bool(d.get("layer_norm", False)),
                residual=bool(d.get("residual", False)),
                shared_trunk=bool(d.get("shared_trunk", False)),
                history=int(d.get("history", 1)),
                training=tuple(dict(d.get("training") or {}).items()),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"arch: cannot read {d!r}: {e}") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> PolicyArch:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ConfigError(f"arch: {s!r} is not JSON: {e}") from e
        return cls.from_dict(d)

    @property
    def arch_id(self) -> str:
        return hashlib.sha1(self.to_json().encode()).hexdigest()[:12]

    @property
    def input_dim(self) -> int:
        return self.obs_dim * self.history

    def describe(self) -> str:
        """Short label, e.g. "64relu-64relu ln res sep h2".

        Tokens after the layers: "ln" (layer norm), "res" (residual), "shared" or "sep"
        (actor/critic trunk), "h<n>" only when the observation history is longer than 1.
        """
        parts = ["-".join(f"{layer.width}{layer.activation}" for layer in self.layers)]
        if self.layer_norm:
            parts.append("ln")
        if self.residual:
            parts.append("res")
        parts.append("shared" if self.shared_trunk else "sep")
        if self.history > 1:
            parts.append(f"h{self.history}")
        parts += [f"{_SHORT_NAMES.get(k, k)}={_fmt_value(v)}" for k, v in self.training]
        return " ".join(parts)

    @property
    def network(self) -> PolicyArch:
        """The same network without the searched trainer settings (what is exported)."""
        return replace(self, training=()) if self.training else self

    # --- costs ----------------------------------------------------------------------------
    def _skips(self) -> list[bool]:
        """Which hidden layers add their input; mirrors `_torch_modules.Trunk`/`Block`."""
        skips, in_dim = [], self.input_dim
        for i, layer in enumerate(self.layers):
            skips.append(self.residual and i > 0 and in_dim == layer.width)
            in_dim = layer.width
        return skips

    def actor_layer_costs(self) -> list[LayerCost]:
        """One `LayerCost` per op of a batch-1 actor forward pass, in execution order.

        Conventions: a Linear(i, o) has i*o MACs and i*o + o params. LayerNorm, activation
        and skip-add layers count 0 MACs: they are elementwise (O(width)), and MACs here mean
        the multiply-accumulates of matrix products, which is what FlopCounterMode counts too.
        LayerNorm has 2*width params (weight and bias). act_in/act_out are element counts; an
        add reads both operands (2*width) and writes width.
        """
        costs: list[LayerCost] = []
        in_dim = self.input_dim
        for i, (layer, skip) in enumerate(zip(self.layers, self._skips(), strict=True)):
            w = layer.width
            costs.append(LayerCost(f"fc{i}", "linear", in_dim * w + w, in_dim * w, in_dim, w))
            if self.layer_norm:
                costs.append(LayerCost(f"ln{i}", "layernorm", 2 * w, 0, w, w))
            costs.append(LayerCost(f"act{i}", "activation", 0, 0, w, w))
            if skip:
                costs.append(LayerCost(f"skip{i}", "add", 0, 0, 2 * w, w))
            in_dim = w
        a = self.act_dim
        costs.append(LayerCost("head", "linear", in_dim * a + a, in_dim * a, in_dim, a))
        return costs

    def cost_summary(self) -> dict[str, int]:
        """Totals of `actor_layer_costs()`: params, macs, bytes (float32), layers."""
        return totals(self.actor_layer_costs())

    # --- torch ----------------------------------------------------------------------------
    def build_trunk(self) -> Trunk:
        """Hidden stack: input_dim -> layers[-1].width."""
        from robonas._torch_modules import Trunk

        return Trunk(self)

    def build_actor(self) -> Actor:
        """Trunk + Linear head with raw outputs (mean or logits); attributes `.trunk`, `.head`."""
        from robonas._torch_modules import Actor

        return Actor(self)


# --- the search space -------------------------------------------------------------------------
_CHOICE_FIELDS = ("depths", "widths", "activations", "layer_norm", "residual", "shared_trunk", "history")


@dataclass(frozen=True)
class SearchSpace:
    """The architectures one search explores, as independent choices per decision.

    Decision vector: [depth, width_1..width_D, act_1..act_D, layer_norm, residual,
    shared_trunk, history, setting_1..setting_T] with D = max(depths) and T searched trainer
    settings (`training`, sorted by name); each entry is an index into its choices.
    Slots of layers beyond an arch's depth are inactive and encode as 0, so
    decode(encode(a)) == a and encode(decode(v)) is v with inactive slots zeroed.
    """

    obs_dim: int
    act_dim: int
    depths: tuple[int, ...] = (1, 2, 3)
    widths: tuple[int, ...] = (16, 32, 64, 128)
    activations: tuple[str, ...] = ("relu", "tanh")
    layer_norm: tuple[bool, ...] = (False, True)
    residual: tuple[bool, ...] = (False, True)
    shared_trunk: tuple[bool, ...] = (False, True)
    history: tuple[int, ...] = (1,)
    # searched trainer settings: (name, choices), sorted by name
    training: tuple[tuple[str, tuple[TrainValue, ...]], ...] = ()
    # the tuned value of each searched setting, where it is one of the choices: strategies start
    # from it (see `at_start`)
    training_start: tuple[tuple[str, TrainValue], ...] = ()

    def __post_init__(self) -> None:
        self._init_training()
        for name in ("obs_dim", "act_dim"):
            value = getattr(self, name)
            if not _is_pos_int(value):
                raise ConfigError(f"space.{name}: {value!r} is not a positive integer")
        for name in _CHOICE_FIELDS:
            raw = getattr(self, name)
            if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
                raise ConfigError(f"space.{name}: {raw!r} is not a list of choices")
            values = tuple(raw)
            if not values:
                raise ConfigError(f"space.{name}: the list of choices is empty")
            for v in values:
                self._check_choice(name, v)
            if len(set(values)) != len(values):
                raise ConfigError(f"space.{name}: {list(values)!r} lists a choice twice")
            if name in ("depths", "widths", "history"):
                values = tuple(int(v) for v in values)
            object.__setattr__(self, name, values)

    def _init_training(self) -> None:
        table = self.training
        if isinstance(table, dict):
            table = tuple(table.items())
        choices: list[tuple[str, tuple[TrainValue, ...]]] = []
        for name, raw in table:
            if not isinstance(raw, (list, tuple)):
                raw = (raw,)
            values = tuple(raw)
            if not values:
                raise ConfigError(f"space.training.{name}: the list of choices is empty")
            for v in values:
                if not _is_train_value(v):
                    raise ConfigError(f"space.training.{name}: {v!r} is not a number, string or true/false")
            if len(set(values)) != len(values):
                raise ConfigError(f"space.training.{name}: {list(values)!r} lists a choice twice")
            choices.append((str(name), values))
        object.__setattr__(self, "training", tuple(sorted(choices)))
        known = dict(self.training)
        start = _training_items(self.training_start)
        for name, value in start:
            if name not in known or value not in known[name]:
                raise ConfigError(f"space.training_start.{name}: {value!r} is not one of its choices")
        object.__setattr__(self, "training_start", start)

    @staticmethod
    def _check_choice(name: str, v: Any) -> None:
        if name in ("depths", "widths", "history"):
            if not _is_pos_int(v):
                raise ConfigError(f"space.{name}: {v!r} is not a positive integer")
        elif name == "activations":
            if v not in ACTIVATIONS:
                raise ConfigError(f"space.activations: {v!r} is not one of {', '.join(ACTIVATIONS)}")
        elif not isinstance(v, bool):
            raise ConfigError(f"space.{name}: {v!r} is not true or false")

    @classmethod
    def from_config(
        cls, table: dict[str, Any], obs_dim: int, act_dim: int, start: dict[str, Any] | None = None
    ) -> SearchSpace:
        """Build from a TOML `[space]` table; keys are the choice fields, all optional, plus a
        `[space.training]` table of trainer settings to search (name -> list of choices).

        A scalar stands for a single choice (`history = 2` means `history = [2]`).
        `start`: tuned values of trainer settings; those among the choices are the start point.
        """
        if not isinstance(table, dict):
            raise ConfigError(f"space: {table!r} is not a table")
        valid = (*_CHOICE_FIELDS, "training")
        unknown = sorted(set(table) - set(valid))
        if unknown:
            raise ConfigError(f"space.{unknown[0]}: unknown key; valid keys are {', '.join(valid)}")
        training = table.get("training", {})
        if not isinstance(training, dict):
            raise ConfigError(f"space.training: {training!r} is not a table of settings")
        kwargs = {
            k: (tuple(v) if isinstance(v, (list, tuple)) else (v,))
            for k, v in table.items()
            if k != "training"
        }
        choices = {k: (tuple(v) if isinstance(v, (list, tuple)) else (v,)) for k, v in training.items()}
        start = {k: v for k, v in (start or {}).items() if k in choices and v in choices[k]}
        return cls(
            obs_dim=obs_dim,
            act_dim=act_dim,
            training=tuple(choices.items()),
            training_start=tuple(start.items()),
            **kwargs,
        )

    # --- decisions ------------------------------------------------------------------------
    @property
    def max_depth(self) -> int:
        return max(self.depths)

    def cardinalities(self) -> list[int]:
        """Number of choices of each decision, in decision-vector order."""
        d = self.max_depth
        return (
            [len(self.depths)]
            + [len(self.widths)] * d
            + [len(self.activations)] * d
            + [len(self.layer_norm), len(self.residual), len(self.shared_trunk), len(self.history)]
            + [len(values) for _, values in self.training]
        )

    def active_decisions(self, depth: int) -> list[int]:
        """Indices of the decisions that matter for an arch of this depth."""
        d = self.max_depth
        tail = [1 + 2 * d + k for k in range(4 + len(self.training))]
        return [0, *range(1, 1 + depth), *range(1 + d, 1 + d + depth), *tail]

    def contains(self, arch: PolicyArch) -> bool:
        return (
            arch.obs_dim == self.obs_dim
            and arch.act_dim == self.act_dim
            and len(arch.layers) in self.depths
            and all(x.width in self.widths and x.activation in self.activations for x in arch.layers)
            and arch.layer_norm in self.layer_norm
            and arch.residual in self.residual
            and arch.shared_trunk in self.shared_trunk
            and arch.history in self.history
            and [k for k, _ in arch.training] == [k for k, _ in self.training]
            and all(v in dict(self.training)[k] for k, v in arch.training)
        )

    def encode(self, arch: PolicyArch) -> list[int]:
        if not self.contains(arch):
            raise ConfigError(f"arch {arch.describe()!r} ({arch.arch_id}) is not in this space")
        d = self.max_depth
        vec = [0] * (1 + 2 * d + 4 + len(self.training))
        vec[0] = self.depths.index(len(arch.layers))
        for i, layer in enumerate(arch.layers):
            vec[1 + i] = self.widths.index(layer.width)
            vec[1 + d + i] = self.activations.index(layer.activation)
        vec[1 + 2 * d :] = [
            self.layer_norm.index(arch.layer_norm),
            self.residual.index(arch.residual),
            self.shared_trunk.index(arch.shared_trunk),
            self.history.index(arch.history),
            *(choices.index(v) for (_, choices), (_, v) in zip(self.training, arch.training, strict=True)),
        ]
        return vec

    def decode(self, vec: Sequence[int]) -> PolicyArch:
        """Arch of a decision vector; values in inactive slots are ignored."""
        cards = self.cardinalities()
        vec = list(vec)
        if len(vec) != len(cards):
            raise ConfigError(f"decision vector: length {len(vec)}, this space needs {len(cards)}")
        for i, (v, n) in enumerate(zip(vec, cards, strict=True)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v < n:
                raise ConfigError(f"decision vector[{i}]: {v!r} is not an index in 0..{n - 1}")
        d = self.max_depth
        depth = self.depths[vec[0]]
        ln, res, shared, hist = vec[1 + 2 * d : 5 + 2 * d]
        settings = vec[5 + 2 * d :]
        return PolicyArch(
            obs_dim=self.obs_dim,
            act_dim=self.act_dim,
            layers=tuple(
                Layer(self.widths[vec[1 + i]], self.activations[vec[1 + d + i]]) for i in range(depth)
            ),
            layer_norm=self.layer_norm[ln],
            residual=self.residual[res],
            shared_trunk=self.shared_trunk[shared],
            history=self.history[hist],
            training=tuple((k, choices[i]) for (k, choices), i in zip(self.training, settings, strict=True)),
        )

    def size(self) -> int:
        """Number of distinct architectures (distinct `PolicyArch` values).

        Counted as distinct descriptions: residual=True on a 1-layer net builds the same
        module as residual=False, yet they are different archs (and arch_ids).
        """
        per_layer = len(self.widths) * len(self.activations)
        flags = math.prod(len(getattr(self, n)) for n in _CHOICE_FIELDS[3:])
        settings = math.prod(len(values) for _, values in self.training)
        return sum(per_layer**d for d in self.depths) * flags * settings

    def at_start(self, arch: PolicyArch) -> PolicyArch:
        """The same network with the tuned trainer settings where they are among the choices: a
        strategy's first candidate, so a search starts from settings known to work."""
        if not self.training_start:
            return arch
        return replace(arch, training=tuple({**dict(arch.training), **dict(self.training_start)}.items()))

    # --- sampling -------------------------------------------------------------------------
    def sample(self, rng: np.random.Generator) -> PolicyArch:
        """Uniform over decisions (not over archs: each depth is equally likely)."""
        return self.decode([int(rng.integers(n)) for n in self.cardinalities()])

    def mutate(self, arch: PolicyArch, rng: np.random.Generator) -> PolicyArch:
        """Change exactly one active decision to a different choice.

        Picked uniformly among active decisions that have an alternative. A depth change keeps
        the common layers; new layers copy the last existing one (a near-neutral deepening, as
        in network-morphism mutations). A space with one arch returns the arch unchanged.
        """
        vec = self.encode(arch)
        cards = self.cardinalities()
        candidates = [i for i in self.active_decisions(len(arch.layers)) if cards[i] > 1]
        if not candidates:
            return arch
        i = candidates[int(rng.integers(len(candidates)))]
        new = int(rng.integers(cards[i] - 1))
        vec[i] = new if new < vec[i] else new + 1  # uniform over the other choices
        if i == 0:
            d, old_depth = self.max_depth, len(arch.layers)
            for j in range(old_depth, self.depths[vec[0]]):
                vec[1 + j] = vec[old_depth]
                vec[1 + d + j] = vec[d + old_depth]
        return self.decode(vec)
