"""Torch modules built from a `PolicyArch` (kept apart so that robonas.space imports no torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from robonas.space import PolicyArch

_ACTIVATION_MODULES = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "silu": nn.SiLU}


class Block(nn.Module):
    """Linear -> (LayerNorm) -> activation, plus the input when `residual` is set."""

    def __init__(self, in_dim: int, width: int, activation: str, layer_norm: bool, residual: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, width)
        self.norm = nn.LayerNorm(width) if layer_norm else None
        self.act = _ACTIVATION_MODULES[activation]()
        # A skip only where shapes allow it: no hidden projection, so costs stay what they look.
        self.residual = residual and in_dim == width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if self.norm is not None:
            y = self.norm(y)
        y = self.act(y)
        return y + x if self.residual else y


class Trunk(nn.Module):
    def __init__(self, arch: PolicyArch) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        in_dim = arch.input_dim
        for i, layer in enumerate(arch.layers):
            # the first block never skips: its input is the observation, not a hidden state
            blocks.append(
                Block(in_dim, layer.width, layer.activation, arch.layer_norm, arch.residual and i > 0)
            )
            in_dim = layer.width
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Actor(nn.Module):
    def __init__(self, arch: PolicyArch) -> None:
        super().__init__()
        self.trunk = Trunk(arch)
        self.head = nn.Linear(self.trunk.out_dim, arch.act_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))
