"""The tensor math of ESMER (Sarfraz, Arani & Zonooz, ICLR 2023), as pure functions.

Notation of ``docs/usage.md`` (section "ESMER"): ``l_s`` per-sample loss of the semantic memory (the
EMA model), ``mu`` the loss memory, ``beta`` the error-sensitivity threshold.
"""

from __future__ import annotations

import torch


def modulation_weights(l_s: torch.Tensor, mu: float, beta: float) -> torch.Tensor:
    """Per-sample weights of the current-task loss, l_s: (B,) -> (B,).

    ``w_i = mu / l_s_i`` where ``l_s_i >= beta * mu``, else 1; all ones while ``mu <= 0``.
    """
    if mu <= 0:
        return torch.ones_like(l_s)
    high = l_s >= beta * mu
    return torch.where(high, mu / l_s.clamp_min(torch.finfo(l_s.dtype).tiny), torch.ones_like(l_s))


def admission_mask(l_s: torch.Tensor, mu: float, beta: float) -> torch.Tensor:
    """(B,) bool: samples the error-sensitive reservoir may take (all while ``mu == 0``)."""
    if mu <= 0:
        return torch.ones_like(l_s, dtype=torch.bool)
    return l_s <= beta * mu


def ema_decay(step: int, alpha: float) -> float:
    """``min(1 - 1/(step + 1), alpha)``: a plain average early on, then capped."""
    return min(1.0 - 1.0 / (step + 1), alpha)


def filtered_batch_loss(l_s: torch.Tensor, std_margin: float) -> float:
    """Mean of ``l_s`` after dropping samples above ``mean + std_margin * std``.

    ``std`` is the unbiased standard deviation (``torch.std``'s default, as the reference).
    A batch of one sample is kept whole.
    """
    if l_s.numel() < 2:
        return l_s.mean().item()
    threshold = l_s.mean() + std_margin * l_s.std()
    return l_s[l_s <= threshold].mean().item()


def update_loss_memory(mu: float, l_s: torch.Tensor, step: int, loss_alpha: float,
                       std_margin: float) -> float:
    """``mu <- a * mu + (1 - a) * filtered_mean(l_s)`` with ``a = ema_decay(step, loss_alpha)``."""
    a = ema_decay(step, loss_alpha)
    return a * mu + (1.0 - a) * filtered_batch_loss(l_s, std_margin)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``theta_ema <- decay * theta_ema + (1 - decay) * theta`` for every parameter.

    Buffers (batch-norm statistics) are not copied: the semantic memory keeps its own.
    """
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)
