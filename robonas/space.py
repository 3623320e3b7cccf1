"""The search space: `PolicyArch`, one policy network, and `SearchSpace`, the set searched.

`PolicyArch` is frozen, hashable and JSON-serialisable. It builds itself as a torch module
(torch imported lazily, so the CLI can print --help without it) and counts its own cost.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from robonas.errors import ConfigError

ACTIVATIONS = ("relu", "tanh", "elu", "silu")


@dataclass(frozen=True)
class Layer:
    width: int
    activation: str

    def __post_init__(self) -> None:
        if not isinstance(self.width, int) or isinstance(self.width, bool) or self.width <= 0:
            raise ConfigError(f"layer width: {self.width!r} is not a positive integer")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"layer activation: {self.activation!r} is not one of {', '.join(ACTIVATIONS)}"
            )


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        for name in ("obs_dim", "act_dim", "history"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"arch.{name}: {value!r} is not a positive integer")
        if not self.layers:
            raise ConfigError("arch.layers: at least one hidden layer is required")

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
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"arch: cannot read {d!r}: {e}") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> PolicyArch:
        return cls.from_dict(json.loads(s))

    @property
    def arch_id(self) -> str:
        return hashlib.sha1(self.to_json().encode()).hexdigest()[:12]

    @property
    def input_dim(self) -> int:
        return self.obs_dim * self.history

    # --- torch ----------------------------------------------------------------------------
    def build_trunk(self):  # -> torch.nn.Module
        """Hidden stack: input_dim -> layers[-1].width."""
        from robonas._torch_modules import Trunk

        return Trunk(self)

    def build_actor(self):  # -> torch.nn.Module
        """Trunk + Linear head with raw outputs (mean or logits); attributes `.trunk`, `.head`."""
        from robonas._torch_modules import Actor

        return Actor(self)
