"""The proxy membership attacker: an MLP on the element-wise squared denoising error
(smp-lora.md §4). Shared by the post-hoc proxy attack and by MP/SMP-LoRA training."""

from __future__ import annotations

import torch
from torch import nn


class ProxyMLP(nn.Module):
    """d -> 512 -> 256 -> 2 logits (0 = non-member, 1 = member), ReLU and Dropout(0.5) after each hidden layer."""

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (512, 256), dropout: float = 0.5):
        super().__init__()
        layers, previous = [], in_features
        for width in hidden:
            layers += [nn.Linear(previous, width), nn.ReLU(), nn.Dropout(dropout)]
            previous = width
        layers.append(nn.Linear(previous, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def membership_margin(logits: torch.Tensor) -> torch.Tensor:
    """Member logit minus non-member logit (higher means "member")."""
    return logits[:, 1] - logits[:, 0]
