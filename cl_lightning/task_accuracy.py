"""Per-task accuracy as a torchmetrics ``Metric``, so it is summed across DDP ranks."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from cl_lightning.checks import require_at_least


class TaskAccuracy(Metric):
    """Counts correct predictions per task; ``compute()`` returns percent per task.

    States are sums, so ``compute()`` under DDP reduces every rank's counts before dividing.
    Tasks with no evaluated sample come back as NaN.
    """

    full_state_update = False

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        require_at_least(1, "", num_tasks=num_tasks)
        self.num_tasks = num_tasks
        self.add_state("correct", torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, task: torch.Tensor) -> None:
        """preds, target, task: (B,) integer tensors."""
        hit = (preds == target).long()
        self.correct.index_add_(0, task, hit)
        self.total.index_add_(0, task, torch.ones_like(hit))

    def compute(self) -> torch.Tensor:
        """(num_tasks,) accuracy in percent, NaN where a task had no sample."""
        total = self.total.to(torch.float64)
        return torch.where(total > 0, 100.0 * self.correct / total.clamp_min(1), torch.nan)
