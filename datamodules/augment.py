"""Batched training augmentations (pure tensor functions, on the batch's device)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cl_lightning.checks import require_at_least


def random_crop_flip(
    x: torch.Tensor,
    padding: int = 4,
    flip_prob: float = 0.5,
    fill: float | Sequence[float] | torch.Tensor = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample random crop of the padded image + random horizontal flip, vectorised.

    The equivalent of torchvision's ``RandomCrop(size=(H, W), padding=padding)`` followed by
    ``RandomHorizontalFlip(flip_prob)``, drawn independently for every sample, in one
    gather over the batch (no loop over samples).

    Args:
        x: (B, C, H, W) images (any float dtype, any device).
        padding: pixels of constant padding on each side; the crop's top-left corner is
            uniform in ``[0, 2 * padding]^2`` of the padded image.
        flip_prob: probability of flipping each sample left-right (0: never, 1: always).
        fill: padding value, a scalar or one value per channel (C,). For normalised
            images, ``-mean / std`` pads with black as torchvision does before normalising.
        generator: RNG of the draws (on CPU or on ``x``'s device); default torch's global
            RNG of ``x``'s device.

    Returns:
        (B, C, H, W), same dtype and device as ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip expects (B, C, H, W), got {tuple(x.shape)}")
    require_at_least(0, "", padding=padding)
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    b, c, h, w = x.shape
    draw_device = generator.device if generator is not None else x.device
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=draw_device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=draw_device)
    flip = torch.rand(b, generator=generator, device=draw_device) < flip_prob
    dy, dx, flip = dy.to(x.device), dx.to(x.device), flip.to(x.device)

    if padding > 0:
        fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1)
        if fill_t.numel() not in (1, c):
            raise ValueError(f"fill must be a scalar or have {c} values, got {fill_t.numel()}")
        padded = x.new_empty(b, c, h + 2 * padding, w + 2 * padding)
        padded[:] = fill_t.view(1, -1, 1, 1)
        padded[:, :, padding:padding + h, padding:padding + w] = x
    else:
        padded = x
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = torch.arange(w, device=x.device).expand(b, w)  # (B, W)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None],
                 cols[:, None, :]]  # (B, H, W, C): advanced indices first
    return out.permute(0, 3, 1, 2).contiguous()
