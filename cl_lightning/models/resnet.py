"""ResNet-18 for small images (CIFAR-size): 3x3 stem, no max-pool, widths nf*(1,2,4,8).

``width=64`` is the standard ResNet-18; ``width=20`` is the reduced ResNet-18 used by the
GEM/DER line of continual-learning benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cl_lightning.checks import OptionError, require_at_least
from cl_lightning.models.backbones import Classifier


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18Features(nn.Module):
    """x: (B, C, H, W) -> feature map (B, 8*width, H/8, W/8)."""

    def __init__(self, in_channels: int, width: int = 64) -> None:
        super().__init__()
        require_at_least(1, "ResNet ", width=width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))


class ResNet18(Classifier):
    """ResNet-18 classifier (global average pooling + linear head).

    Args:
        input_shape: (C, H, W) of one image (linked from the stream).
        num_classes: number of logits (linked from the stream).
        width: channels of the first stage (64 full, 20 reduced).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 64) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise OptionError(f"ResNet18 needs image inputs (C, H, W), got {tuple(input_shape)}")
        self.features = ResNet18Features(input_shape[0], width)
        self.head = nn.Linear(self.features.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))
