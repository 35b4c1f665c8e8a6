"""LinearShiftStream: the embedded default stream (no download).

One latent class structure is shared by every task: ``num_classes`` Gaussian clusters with
prototypes ``mu_c ~ N(0, I)`` in ``input_dim`` dimensions and isotropic noise ``noise``.
Task ``t`` observes the latent point through its own random linear map and shift,
``x = Q_t z + b_t``, with ``Q_t`` a random orthogonal matrix (so every task is exactly
as hard as every other) and ``b_t ~ N(0, shift^2 I)``. Labels are the same in every task:
a domain-incremental stream. A model that fits task ``t`` knows nothing of task ``t'``
(its map is unrelated), so plain fine-tuning forgets, while one network can fit the union.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset

from cl_lightning.checks import require_at_least
from datamodules.base import ContinualDataModule, Scenario, TaskData


class LinearShiftStream(ContinualDataModule):
    """Domain-incremental stream of random linear views of one Gaussian-mixture task.

    Args:
        num_tasks: number of tasks in the stream.
        train_per_task: training samples per task (classes balanced).
        test_per_task: test samples per task (classes balanced).
        input_dim: dimension of the inputs (and of the latent space).
        num_classes: number of classes (shared by every task).
        noise: standard deviation of the within-class noise (prototypes have unit variance
            per dimension); calibrated so one task reaches 95-99% (docs/results.md).
        shift: standard deviation of each task's input shift.
        stream_seed: seed of the prototypes, the per-task maps and the samples.
        **kwargs: the options of :class:`ContinualDataModule` (scenario, epochs_per_task, ...).
    """

    supported_scenarios = ("domain-il",)

    def __init__(
        self,
        num_tasks: int = 20,
        train_per_task: int = 1000,
        test_per_task: int = 1000,
        input_dim: int = 64,
        num_classes: int = 10,
        noise: float = 1.5,
        shift: float = 4.0,
        stream_seed: int = 0,
        scenario: Scenario = "domain-il",
        **kwargs: Any,
    ) -> None:
        require_at_least(1, "data.", num_tasks=num_tasks, train_per_task=train_per_task,
                         test_per_task=test_per_task, input_dim=input_dim)
        require_at_least(2, "data.", num_classes=num_classes)
        require_at_least(0, "data.", noise=noise, shift=shift)
        super().__init__(scenario=scenario, **kwargs)
        self._num_tasks, self._num_classes, self.input_dim = num_tasks, num_classes, input_dim
        self.train_per_task, self.test_per_task = train_per_task, test_per_task
        self.noise, self.shift, self.stream_seed = noise, shift, stream_seed

    @property
    def num_tasks(self) -> int:
        return self._num_tasks

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.input_dim,)

    def natural_task_classes(self) -> list[tuple[int, ...]]:
        return [tuple(range(self.num_classes))] * self.num_tasks

    def stream_params(self) -> dict[str, Any]:
        return {"train_per_task": self.train_per_task, "test_per_task": self.test_per_task,
                "input_dim": self.input_dim, "noise": self.noise, "shift": self.shift,
                "stream_seed": self.stream_seed}

    def build_tasks(self) -> list[TaskData]:
        return self._make_tasks(self.num_tasks)

    def heldout_task(self) -> TaskData:
        """The task after the last one: another random map and shift of the same classes."""
        return self._make_tasks(self.num_tasks + 1)[-1]

    def _make_tasks(self, count: int) -> list[TaskData]:
        """The first ``count`` tasks of the stream's random sequence (each task's draws
        follow the previous task's, so a longer sequence extends a shorter one)."""
        g = torch.Generator().manual_seed(self.stream_seed)
        d, c = self.input_dim, self.num_classes
        prototypes = torch.randn(c, d, generator=g)
        tasks = []
        for _ in range(count):
            q, r = torch.linalg.qr(torch.randn(d, d, generator=g))
            q = q * torch.sign(torch.diagonal(r))  # Haar-distributed orthogonal map
            b = self.shift * torch.randn(d, generator=g)
            splits = []
            for n in (self.train_per_task, self.test_per_task):
                y = torch.arange(n) % c
                y = y[torch.randperm(n, generator=g)]
                z = prototypes[y] + self.noise * torch.randn(n, d, generator=g)
                splits.append((z @ q.T + b, y))
            (xtr, ytr), (xte, yte) = splits
            tasks.append(TaskData(TensorDataset(xtr, ytr), TensorDataset(xte, yte), ytr,
                                  tuple(range(c))))
        return tasks
