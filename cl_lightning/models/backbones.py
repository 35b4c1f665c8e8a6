"""Plain classifier backbones. Every model here is built as ``Model(input_shape, num_classes,
**options)`` so the learner can construct it from the stream's sizes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from cl_lightning.checks import OptionError


class Classifier(nn.Module):
    """Base of every model the learner builds: ``Model(input_shape, num_classes, **options)``
    with ``forward(x: (B, *input_shape)) -> logits (B, num_classes)``. Subclass it to make
    your own model selectable with ``--model.net your.module.Model``."""


class MLP(Classifier):
    """Flatten -> [Linear -> ReLU (-> Dropout)] * len(hidden) -> Linear.

    x: (B, *input_shape) -> logits: (B, num_classes)

    Args:
        input_shape: shape of one input (linked from the stream).
        num_classes: number of output logits (linked from the stream).
        hidden: widths of the hidden layers.
        dropout: dropout after every hidden layer (0 = none).
        init: ``torch`` keeps PyTorch's default ``nn.Linear`` initialisation; ``xavier``
            draws every weight from Glorot's uniform U(-a, a), a = sqrt(6 / (fan_in +
            fan_out)), with zero biases, as mammoth's MNIST MLP does.
    """

    head_on_features = True  # forward(x) == head(features(x)): MAML may adapt only the head

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (256, 256),
        dropout: float = 0.0,
        init: Literal["torch", "xavier"] = "torch",
    ) -> None:
        super().__init__()
        if any(h < 1 for h in hidden):
            raise OptionError(f"model.net.hidden sizes must be >= 1, got {list(hidden)}")
        if not 0.0 <= dropout < 1.0:
            raise OptionError(f"model.net.dropout must be in [0, 1), got {dropout}")
        if init not in ("torch", "xavier"):
            raise OptionError(f"model.net.init must be 'torch' or 'xavier', got {init!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)
        if init == "xavier":
            for layer in self.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
