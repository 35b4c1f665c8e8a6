"""Encoders that turn one input into a token sequence for a recurrent core.

Every encoder maps ``x: (B, *input_shape) -> tokens: (B, T, D)`` and exposes
``num_tokens`` (T) and ``token_dim`` (D).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from cl_lightning.checks import OptionError, require_at_least
from cl_lightning.models.resnet import ResNet18Features

EncoderKind = Literal["auto", "vector", "rows", "cnn"]


class VectorTokens(nn.Module):
    """A learned projection of a flat vector to T tokens: Linear(in, T*D) -> (B, T, D)."""

    def __init__(self, input_shape: Sequence[int], num_tokens: int, token_dim: int) -> None:
        super().__init__()
        self.num_tokens, self.token_dim = num_tokens, token_dim
        self.proj = nn.Linear(math.prod(input_shape), num_tokens * token_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.proj(x.flatten(1)))
        return z.view(len(x), self.num_tokens, self.token_dim)


class RowTokens(nn.Module):
    """An image read row by row (sequential MNIST): (B, C, H, W) -> (B, H, C*W)."""

    def __init__(self, input_shape: Sequence[int]) -> None:
        super().__init__()
        c, h, w = input_shape
        self.num_tokens, self.token_dim = h, c * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, h, c * w)


class CNNTokens(nn.Module):
    """ResNet-18 feature-map positions as tokens: (B, C, H, W) -> (B, H/8 * W/8, 8*width)."""

    def __init__(self, input_shape: Sequence[int], width: int = 20) -> None:
        super().__init__()
        c, h, w = input_shape
        self.features = ResNet18Features(c, width)
        self.num_tokens = math.ceil(h / 8) * math.ceil(w / 8)
        self.token_dim = self.features.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(2).transpose(1, 2)


def build_encoder(input_shape: Sequence[int], kind: EncoderKind, num_tokens: int,
                  token_dim: int, cnn_width: int) -> nn.Module:
    """``auto``: vectors -> ``vector``; 1-channel images -> ``rows``; colour images -> ``cnn``."""
    if kind == "auto":
        kind = "vector" if len(input_shape) == 1 else ("rows" if input_shape[0] == 1 else "cnn")
    if kind == "vector":
        require_at_least(1, "model.net.", num_tokens=num_tokens, token_dim=token_dim)
        return VectorTokens(input_shape, num_tokens, token_dim)
    if len(input_shape) != 3:
        raise OptionError(f"model.net.encoder={kind!r} needs image inputs (C, H, W), got "
                         f"{tuple(input_shape)}; use encoder 'vector'")
    return RowTokens(input_shape) if kind == "rows" else CNNTokens(input_shape, cnn_width)
