"""A permutation-equivariant actor-critic for slot observations (gathering).

The gathering input is one row per particle and the action one row per particle.
A plain MLP over the flattened rows must learn the same "push this particle" rule
once per slot, from a reward that sums every particle's progress; here one shared
network reads each row (plus the mean of all rows, for the others' heat) and writes
that row's action, so every particle's experience trains the same weights and the
rule holds whatever order the particles come in. Imported only where stable-baselines3
is (training, loading a checkpoint that names `SlotPolicy`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import create_mlp
from torch import nn


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Tanh layers sizes[0] -> ... -> sizes[-1] (SB3's own builder, its default activation)."""
    return nn.Sequential(*create_mlp(sizes[0], -1, sizes[1:], nn.Tanh))


class SlotExtractor(nn.Module):
    """Rows -> shared encoder; context = mean over present rows (last input column);
    actor latent per row from (row, context); critic latent from the context."""

    def __init__(self, slots: int, width: int, hidden: int) -> None:
        super().__init__()
        self.slots, self.width = slots, width
        self.encoder = _mlp([width, hidden, hidden])
        self.actor = _mlp([2 * hidden, hidden])
        self.critic = _mlp([hidden, hidden])
        self.latent_dim_pi = slots * hidden
        self.latent_dim_vf = hidden

    def _rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.reshape(x.shape[0], self.slots, self.width)
        e = self.encoder(rows)
        present = rows[..., -1:].clamp(0.0, 1.0)
        context = (e * present).sum(1) / present.sum(1).clamp(min=1.0)
        return e, context

    def forward_actor(self, x: torch.Tensor) -> torch.Tensor:
        e, context = self._rows(x)
        z = self.actor(torch.cat([e, context[:, None].expand_as(e)], dim=-1))
        return z.reshape(x.shape[0], -1)

    def forward_critic(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(self._rows(x)[1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_actor(x), self.forward_critic(x)


class SlotHead(nn.Module):
    """One linear map shared by all rows: per-row latent -> per-row action mean."""

    def __init__(self, slots: int, hidden: int, out: int) -> None:
        super().__init__()
        self.slots, self.hidden = slots, hidden
        self.linear = nn.Linear(hidden, out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        rows = z.reshape(z.shape[0], self.slots, self.hidden)
        return self.linear(rows).reshape(z.shape[0], -1)


class SlotPolicy(ActorCriticPolicy):
    """PPO policy whose observation and action split into `slots` equal rows."""

    def __init__(self, *args: Any, slots: int = 4, hidden: int = 64, **kwargs: Any) -> None:
        self.slots, self.hidden = slots, hidden
        super().__init__(*args, **kwargs)

    def _build_mlp_extractor(self) -> None:
        n_in = int(np.prod(self.observation_space.shape))
        if n_in % self.slots:
            raise ValueError(f"{n_in} inputs do not split into {self.slots} slots")
        self.mlp_extractor = SlotExtractor(self.slots, n_in // self.slots, self.hidden)

    def _build(self, lr_schedule: Any) -> None:
        super()._build(lr_schedule)
        n_out = int(np.prod(self.action_space.shape))
        if n_out % self.slots:
            raise ValueError(f"{n_out} actions do not split into {self.slots} slots")
        self.action_net = SlotHead(self.slots, self.hidden, n_out // self.slots)
        self.action_net.apply(partial(self.init_weights, gain=0.01))  # as SB3's output layer
        self.optimizer = self.optimizer_class(
            self.parameters(),
            lr=lr_schedule(1),
            **self.optimizer_kwargs,  # type: ignore[call-arg]
        )
