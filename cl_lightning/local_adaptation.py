"""Local adaptation on retrieved neighbours (MbPA: Sprechmann et al. 2018; MbPA++: de
Masson d'Autume et al. 2019), for a net whose output is a linear head on features.

At evaluation each query gets its own copy of the head, moved by a few gradient steps on
the cross-entropy of the query's recalled neighbours (their features, their stored
labels), pulled back to the trained head by an L2 term:

    theta_q <- theta_q - lr * (grad mean_j CE(head_theta_q(f_j), y_j) + l2 * (theta_q - theta))

The gradient of a linear softmax head is written in closed form, batched over the
queries (``(B, C, F)`` fast weights), so no per-query autograd graph is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cl_lightning.checks import require_at_least


def adapt_linear_head(weight: Tensor, bias: Tensor, feats: Tensor, labels: Tensor,
                      valid: Tensor, steps: int, lr: float, l2: float) -> tuple[Tensor, Tensor]:
    """Per-query fast weights of a linear head after ``steps`` gradient steps.

    weight: (C, F), bias: (C,) the trained head; feats: (B, k, F) each query's neighbours'
    features; labels: (B, k) long; valid: (B, k) bool (False: no neighbour there; a query
    without any keeps the trained head). Returns (B, C, F) and (B, C).
    """
    b, c = len(feats), weight.shape[0]
    w = weight.expand(b, *weight.shape).clone()
    v = bias.expand(b, c).clone()
    mask = valid.to(feats.dtype)[..., None] / valid.sum(1).clamp(min=1)[:, None, None]
    onehot = F.one_hot(labels, c).to(feats.dtype)
    for _ in range(steps):
        logits = torch.einsum("bkf,bcf->bkc", feats, w) + v[:, None]
        err = (logits.softmax(-1) - onehot) * mask  # d mean CE / d logits
        grad_w = torch.einsum("bkc,bkf->bcf", err, feats) + l2 * (w - weight)
        grad_v = err.sum(1) + l2 * (v - bias)
        w, v = w - lr * grad_w, v - lr * grad_v
    return w, v


def local_logits(weight: Tensor, bias: Tensor, feats: Tensor) -> Tensor:
    """(B, C) logits of each query's features (B, F) under its own head (B, C, F), (B, C)."""
    return torch.einsum("bf,bcf->bc", feats, weight) + bias


class LocalAdaptation:
    """Evaluation-time local adaptation of the head on each query's recalled neighbours
    (a net that recalls, with a linear ``head`` on ``features``). Evaluated as the extra
    variants ``local/<mode>`` next to the plain model.

    Args:
        steps: gradient steps per query.
        lr: their step size.
        l2: pull of the fast weights back to the trained head (MbPA's regulariser).
    """

    def __init__(self, steps: int = 5, lr: float = 0.5, l2: float = 0.1) -> None:
        require_at_least(1, "model.local_adaptation.", steps=steps)
        require_at_least(0.0, "model.local_adaptation.", lr=lr, l2=l2)
        self.steps, self.lr, self.l2 = steps, lr, l2

    def logits(self, head: torch.nn.Linear, query: Tensor, neighbours: Tensor,
               labels: Tensor, valid: Tensor) -> Tensor:
        """query: (B, F) features; neighbours: (B, k, F) their recalled neighbours'."""
        w, v = adapt_linear_head(head.weight, head.bias, neighbours, labels, valid,
                                 self.steps, self.lr, self.l2)
        return local_logits(w, v, query)
