"""Sample-weighted epoch means of per-step values, kept as tensors.

Lightning's ``self.log(..., on_epoch=True)`` costs a few hundred microseconds per call, more
than the whole step of a small model. The learner adds each step's loss terms here (one
tensor add each) and logs the means once, at the end of the epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class EpochMeans:
    """Running ``(sum, count)`` per name; the mean of a name is ``sum / count``."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, total: Tensor, count: float) -> None:
        """Add ``total`` (a scalar: a value times its sample count, or a sum over
        samples) and its sample ``count``."""
        total = total.detach()
        self.sums[name] = total if name not in self.sums else self.sums[name] + total
        self.counts[name] = self.counts.get(name, 0.0) + float(count)

    def names(self) -> list[str]:
        return sorted(self.sums)

    def totals(self, names: Sequence[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """Sums and counts of ``names`` (0 for a name never added) -> two (k,) float64
        tensors on ``device``."""
        sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        for i, name in enumerate(names):
            if name in self.sums:
                sums[i] = self.sums[name].to(device, torch.float64)
        counts = torch.tensor([self.counts.get(n, 0.0) for n in names], dtype=torch.float64,
                              device=device)
        return sums, counts

    def reset(self) -> None:
        self.sums, self.counts = {}, {}


def epoch_means(means: EpochMeans, names: Sequence[str], device: torch.device,
                reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """The mean of every name in ``names`` that has samples; ``reduce`` sums a tensor over
    processes (under DDP) so every rank gets the mean over all ranks' samples."""
    sums, counts = means.totals(names, device)
    if reduce is not None:
        sums, counts = reduce(torch.stack([sums, counts])).unbind(0)
    return {n: float(s / c) for n, s, c in zip(names, sums.tolist(), counts.tolist(),
                                                strict=True) if c > 0}
