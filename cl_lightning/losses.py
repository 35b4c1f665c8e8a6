"""Per-sample losses of the training step (pure tensor functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def present_class_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                                rows: torch.Tensor) -> torch.Tensor:
    """Asymmetric cross-entropy of ER-ACE (Caccia et al., ICLR 2022).

    logits: ``(B, C)``; targets: ``(B,)``; rows: ``(B,)`` bool, the incoming samples.
    Returns ``(B,)``: for ``rows``, the cross-entropy over only the classes present among
    ``targets[rows]`` (the other logits are left out, so new data does not push old
    classes down); for the other rows, the full cross-entropy.
    """
    present = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    present[targets[rows]] = True
    drop = rows[:, None] & ~present[None, :]
    masked = logits.masked_fill(drop, torch.finfo(logits.dtype).min)
    return F.cross_entropy(masked, targets, reduction="none")
