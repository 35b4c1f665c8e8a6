"""Plain classifier backbones. Every model here is built as ``Model(input_shape, num_classes,
**options)`` so the learner can construct it from the stream's sizes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU (-> Dropout)] * len(hidden) -> Linear.

    x: (B, *input_shape) -> logits: (B, num_classes)
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (256, 256),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if any(h < 1 for h in hidden):
            raise ValueError(f"model.net.hidden sizes must be >= 1, got {list(hidden)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.net.dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
