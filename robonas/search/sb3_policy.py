"""stable-baselines3 policies whose networks are built from a `PolicyArch`.

SB3 does the RL (rollouts, losses, distributions, saving); this module only swaps the networks
it builds for the ones the architecture describes, so that what is trained is exactly what is
exported. Both classes take the architecture as the `arch` policy kwarg
(`PPO(ArchActorCriticPolicy, env, policy_kwargs={"arch": arch})`); SB3 pickles it into the
saved zip, so `PPO.load` rebuilds the same networks.

PPO (`ArchActorCriticPolicy`): SB3 asks `_build_mlp_extractor()` for a module mapping features to
(latent_pi, latent_vf). `ArchExtractor` gives it `arch.build_trunk()` for the policy and either
the same module (shared_trunk) or a second trunk for the value function. SB3's own `action_net`
(Linear(out_dim, act_dim): the Gaussian mean or the logits) is the arch's head, so the actor is
`policy_trunk` + `action_net`, which is exactly `arch.build_actor()` (see `actor_state_dict`).

SAC (`ArchSACPolicy`): kept simple. The actor's `latent_pi` becomes `arch.build_trunk()` and
`mu` (Linear(out_dim, act_dim), before SB3's tanh squashing) is the head. Each Q network gets a
trunk of the same architecture over the concatenated (observation, action) input (history 1,
since the observation is already stacked), followed by Linear(out_dim, 1).

Two-phase initialisation: SB3 builds the networks from inside `BasePolicy.__init__` (via
`_build`), so the architecture is stored on the instance *before* `super().__init__` runs; nothing
is built twice or patched afterwards except in SAC's documented `make_actor`/`make_critic` hooks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.preprocessing import get_action_dim
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.sac.policies import Actor, ContinuousCritic, SACPolicy
from torch import nn

from robonas.errors import ConfigError
from robonas.space import PolicyArch


def _arch_constructor_parameters(data: dict[str, Any], arch: PolicyArch) -> dict[str, Any]:
    """What SB3 saves to rebuild the policy on load: the arch, not SB3's own MLP settings."""
    data.pop("net_arch", None)
    data.pop("activation_fn", None)
    data["arch"] = arch
    return data


def _check_arch(arch: Any, features_dim: int) -> PolicyArch:
    if not isinstance(arch, PolicyArch):
        raise ConfigError(f"policy_kwargs['arch']: {arch!r} is not a PolicyArch")
    if arch.input_dim != features_dim:
        raise ConfigError(
            f"arch input_dim {arch.input_dim} (obs_dim {arch.obs_dim} x history {arch.history}) "
            f"does not match the environment's flattened observation size {features_dim}"
        )
    return arch


class ArchExtractor(nn.Module):
    """The `mlp_extractor` SB3 expects: features -> (latent_pi, latent_vf)."""

    def __init__(self, arch: PolicyArch) -> None:
        super().__init__()
        self.policy_net = arch.build_trunk()
        # One module registered under two names when shared: its parameters get both gradients.
        self.value_net = self.policy_net if arch.shared_trunk else arch.build_trunk()
        self.latent_dim_pi = self.policy_net.out_dim
        self.latent_dim_vf = self.value_net.out_dim

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent_pi = self.policy_net(features)
        latent_vf = latent_pi if self.value_net is self.policy_net else self.value_net(features)
        return latent_pi, latent_vf

    def forward_actor(self, features: torch.Tensor) -> torch.Tensor:
        return self.policy_net(features)

    def forward_critic(self, features: torch.Tensor) -> torch.Tensor:
        return self.value_net(features)


class ArchActorCriticPolicy(ActorCriticPolicy):
    """PPO/A2C policy: trunk(s) from the arch, SB3's action_net as the head."""

    def __init__(self, *args: Any, arch: PolicyArch, **kwargs: Any) -> None:
        if "net_arch" in kwargs or "activation_fn" in kwargs:
            raise ConfigError("policy_kwargs: net_arch/activation_fn are set by the arch; remove them")
        self.arch = arch  # needed by _build_mlp_extractor, which SB3 calls from super().__init__
        super().__init__(*args, **kwargs)

    def _build_mlp_extractor(self) -> None:
        _check_arch(self.arch, self.features_dim)
        # SB3 annotates the attribute as its own MlpExtractor; its custom-network docs ask only
        # for a module with the same forward methods and latent_dim_pi/latent_dim_vf.
        self.mlp_extractor = ArchExtractor(self.arch)  # type: ignore[assignment]  # duck-typed MlpExtractor

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return _arch_constructor_parameters(super()._get_constructor_parameters(), self.arch)

    def actor_state_dict(self) -> dict[str, torch.Tensor]:
        """A state_dict that loads into `arch.build_actor()` with strict=True."""
        return _actor_state(self.arch, self.mlp_extractor.policy_net, self.action_net)


class ArchSACPolicy(SACPolicy):
    """SAC policy: actor trunk and each Q network's trunk built from the arch."""

    def __init__(self, *args: Any, arch: PolicyArch, **kwargs: Any) -> None:
        if "net_arch" in kwargs or "activation_fn" in kwargs:
            raise ConfigError("policy_kwargs: net_arch/activation_fn are set by the arch; remove them")
        self.arch = arch
        # Widths only size SB3's placeholder MLPs consistently (mu's input = last width).
        kwargs["net_arch"] = [layer.width for layer in arch.layers]
        super().__init__(*args, **kwargs)

    def make_actor(self, features_extractor: BaseFeaturesExtractor | None = None) -> Actor:
        actor = super().make_actor(features_extractor)
        _check_arch(self.arch, actor.features_dim)
        actor.latent_pi = self.arch.build_trunk().to(self.device)  # type: ignore[assignment]  # SB3 types latent_pi as nn.Sequential; any features->latent module works
        return actor

    def make_critic(self, features_extractor: BaseFeaturesExtractor | None = None) -> ContinuousCritic:
        critic = super().make_critic(features_extractor)
        act_dim = get_action_dim(self.action_space)
        q_arch = dataclasses.replace(self.arch, obs_dim=self.arch.input_dim + act_dim, history=1)
        for idx in range(len(critic.q_networks)):
            trunk = q_arch.build_trunk()
            q_net = nn.Sequential(trunk, nn.Linear(trunk.out_dim, 1)).to(self.device)
            critic.add_module(f"qf{idx}", q_net)  # replaces SB3's MLP under the same name
            critic.q_networks[idx] = q_net
        return critic

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return _arch_constructor_parameters(super()._get_constructor_parameters(), self.arch)

    def actor_state_dict(self) -> dict[str, torch.Tensor]:
        mu = self.actor.mu
        # with gSDE, SB3 appends a Hardtanh clip to mu; the head is the Linear before it
        head = mu[0] if isinstance(mu, nn.Sequential) else mu
        return _actor_state(self.arch, self.actor.latent_pi, head)


def _actor_state(arch: PolicyArch, trunk: nn.Module, head: nn.Module) -> dict[str, torch.Tensor]:
    actor = arch.build_actor()
    actor.trunk.load_state_dict(trunk.state_dict())
    actor.head.load_state_dict(head.state_dict())
    return {k: v.detach().clone().cpu() for k, v in actor.state_dict().items()}
