"""Type names shared by the learner and its parts."""

from __future__ import annotations

from collections.abc import Callable

import torch

ModelFn = Callable[..., torch.Tensor]
"""``(x, **kwargs) -> logits``: a model, or an adapted one (kwargs such as ``recall`` go to
the net)."""
Support = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""A support set ``(inputs, labels, task ids)``."""
Store = dict[str, torch.Tensor]
"""Labelled items a model may recall from: ``x`` (raw inputs), ``y``, ``task``."""
