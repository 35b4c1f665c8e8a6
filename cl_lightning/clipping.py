"""Gradient clipping by global L2 norm: torch's arithmetic, called directly.

Lightning clips through its precision plugin into ``torch.nn.utils.clip_grad_norm_``, which
groups the gradients by device and dtype on every call; for a small model that chain costs
a tenth of a step (Split-MNIST MLP, batch 10 + 10). :func:`clip_grad_norm_` does the
same arithmetic on gradients of one device and dtype (the result is bit-equal), and
:func:`learner_clips` says when the learner may take this path instead of Lightning's.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import Tensor

from cl_lightning.checks import OptionError


def clip_grad_norm_(grads: list[Tensor], max_norm: float) -> Tensor:
    """Scale ``grads`` in place so that their global L2 norm is at most ``max_norm`` ->
    the norm before clipping (a scalar tensor). All on one device with one dtype."""
    if not grads:
        return torch.tensor(0.0)
    with torch.no_grad():
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
    return total


def optimizer_grads(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The gradients of the optimizer's parameters that have one."""
    return [p.grad for group in optimizer.param_groups for p in group["params"]
            if p.grad is not None]


def clipping_on(clip_val: Any) -> bool:
    """Whether ``trainer.gradient_clip_val`` asks for clipping: a positive number."""
    return isinstance(clip_val, (int, float)) and not isinstance(clip_val, bool) and clip_val > 0


def unscaled_precision(precision_plugin: Any) -> bool:
    """Whether the gradients a step sees are the true ones: the plain precision plugin, or
    mixed precision without a gradient scaler (bf16)."""
    plugin_type = type(precision_plugin)
    return plugin_type is Precision or (plugin_type is MixedPrecision
                                        and precision_plugin.scaler is None)


def learner_clips(precision_plugin: Any, clip_val: Any, algorithm: Any) -> bool:
    """Whether the learner clips the gradients itself (:func:`clip_optimizer_grads_`)
    where Lightning would: norm clipping with a positive value, under the plain precision
    plugin or mixed precision without a gradient scaler (bf16: nothing to unscale; fp16's
    scaler unscales first, sharded and DeepSpeed strategies clip their own way). Lightning
    refuses to clip for an optimizer that unscales inside its step (a fused one) under any
    mixed precision; without a scaler the learner clips it as any other."""
    return (algorithm in (None, "norm") and unscaled_precision(precision_plugin)
            and clipping_on(clip_val))


def uniform_grads(grads: list[Tensor]) -> bool:
    """Whether the gradients share one device and floating dtype, dense, as the foreach
    kernels of :func:`clip_grad_norm_` take them."""
    if not grads:
        return True
    first = grads[0]
    return (first.device.type in ("cpu", "cuda") and first.dtype.is_floating_point
            and all(g.device == first.device and g.dtype == first.dtype
                    and g.layout == torch.strided for g in grads))


def clip_optimizer_grads_(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip the optimizer's gradients to a global L2 norm of ``max_norm``, bit-equal to
    Lightning's plain precision plugin: :func:`clip_grad_norm_` where they share one device
    and dtype, else torch's ``clip_grad_norm_`` over the parameters (Lightning's own call,
    which groups them by device and dtype)."""
    grads = optimizer_grads(optimizer)
    if uniform_grads(grads):
        clip_grad_norm_(grads, max_norm)
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def refuse_unclippable(optimizer: torch.optim.Optimizer, precision_plugin: Any,
                       clip_val: Any) -> None:
    """Refuse, before the first step, an optimizer that unscales the gradients inside its
    step (``fused=True``) under a gradient scaler (fp16 mixed precision) with clipping on:
    the gradients it would clip are still scaled, and Lightning stops at the first step."""
    unscales_itself = getattr(optimizer, "_step_supports_amp_scaling", False)
    scaled = getattr(precision_plugin, "scaler", None) is not None
    if unscales_itself and scaled and clipping_on(clip_val):
        raise OptionError(
            "model.optimizer: a fused optimizer cannot have its gradients clipped under "
            "16-bit mixed precision (its step unscales them); set "
            "model.optimizer.init_args.fused false, trainer.gradient_clip_val 0 or "
            "trainer.precision bf16-mixed")
