"""A frozen copy of the working model whose weights follow it as an exponential moving
average: ESMER's semantic memory, CLS-ER's plastic and stable models.

The copy is made from the working model on first use (so it has its architecture and
device); a checkpointed state loaded before then is applied at that moment.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from cl_lightning.esmer_math import ema_update


class EMAModel:
    """Holds one EMA copy of a model; ``update`` moves it towards the model's weights."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self._pending: dict[str, Any] | None = None

    def get(self, net: nn.Module, device: torch.device | str) -> nn.Module:
        """The EMA model, created as a copy of ``net`` (as it is now) on first use."""
        if self.model is None:
            self.model = copy.deepcopy(net).to(device)
            for p in self.model.parameters():
                p.requires_grad_(False)
            if self._pending is not None:
                self.model.load_state_dict(self._pending)
                self._pending = None
        return self.model

    def update(self, net: nn.Module, decay: float) -> None:
        """``theta_ema <- decay * theta_ema + (1 - decay) * theta`` (buffers untouched)."""
        ema_update(self.get(net, next(net.parameters()).device), net, decay)

    def broadcast_buffers(self) -> None:
        """Give every DDP rank rank 0's floating-point buffers (batch-norm statistics), as
        DDP does for the working model; the parameters agree already when every rank makes
        the same updates of the same all-reduced model."""
        if self.model is None:
            return
        for buf in self.model.buffers():
            if buf.is_floating_point():
                torch.distributed.broadcast(buf, src=0)

    def state_dict(self) -> dict[str, Any] | None:
        if self.model is not None:
            return self.model.state_dict()
        return self._pending

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        if self.model is None:
            self._pending = state
        else:
            self.model.load_state_dict(state)


def warn_if_slower_than_stream(where: str, alpha: float, update_prob: float,
                               stream_steps: float, alpha_name: str, prob_name: str) -> bool:
    """Warn (and return True) when an EMA of decay cap ``alpha``, updated after a step
    with probability ``update_prob``, averages over more steps than the whole stream has:
    ``1 / ((1 - alpha) * update_prob)`` steps against ``stream_steps``. Such an EMA never
    leaves the plain-average start of its decay ``min(1 - 1/(n + 1), alpha)``: at the end
    it is the mean of every step's weights, far behind the working model."""
    horizon = float("inf") if alpha >= 1 or update_prob <= 0 else 1 / ((1 - alpha) * update_prob)
    if not 0 < stream_steps < float("inf") or horizon <= stream_steps:
        return False  # a stream of unknown length (no batches counted, no epoch limit)
    rank_zero_warn(
        f"{where}: the EMA averages over about {horizon:,.0f} steps (1 / ((1 - {alpha_name}) "
        f"x {prob_name})), more than the {stream_steps:,.0f} steps of the whole stream, so "
        f"it stays far behind the working model; lower {alpha_name} or raise {prob_name}")
    return True


def frozen_logits(learner: Any, model: nn.Module, inputs: torch.Tensor, task: torch.Tensor,
                  **kwargs: Any) -> torch.Tensor:
    """``learner.train_logits`` of a frozen copy (an EMA model), in the working model's
    train/eval mode (its own batch-norm statistics, as the references do), computed in
    inference mode (no autograd bookkeeping: the logits are targets) and returned as a
    normal tensor, which a loss may save for its backward."""
    if model.training != learner.net.training:
        model.train(learner.net.training)
    with torch.inference_mode():
        logits = learner.train_logits(model, inputs, task, **kwargs)
    return logits.clone()


def same_function(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models compute the same function because one is an exact copy of the
    other: the same object, or the same class in the same train/eval mode with equal
    parameters and buffers (an EMA copy before its first update). Copies made by
    ``copy.deepcopy`` carry the same options; two independently configured models of one
    class with equal weights are not told apart from copies."""
    if a is b:
        return True
    if type(a) is not type(b) or a.training != b.training:
        return False
    sa, sb = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k])
        for k in sa)
