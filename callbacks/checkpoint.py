"""TaskCheckpoint: a ModelCheckpoint that saves at task ends (and ``last``)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from cl_lightning.checks import require_at_least


class TaskCheckpoint(ModelCheckpoint):
    """Saves ``task{NN}.ckpt`` at the end of every ``every_n_tasks``-th task and
    ``last.ckpt`` at every epoch end, so ``fit --ckpt_path last`` resumes the stream.

    Args:
        dirpath: where to save (default: ``<log_dir>/checkpoints``).
        filename: name pattern of the task-end checkpoints (``task`` = task index).
        every_n_tasks: keep a checkpoint at every n-th task end (0: only ``last``).
        save_last: also keep ``last.ckpt`` (updated every epoch).
        **kwargs: further ``ModelCheckpoint`` options.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "task{task:02.0f}",
                 every_n_tasks: int = 1, save_last: bool = True,
                 auto_insert_metric_name: bool = False, **kwargs: Any) -> None:
        require_at_least(0, "checkpoint.", every_n_tasks=every_n_tasks)
        super().__init__(dirpath=dirpath, filename=filename, save_last=save_last, save_top_k=-1,
                         auto_insert_metric_name=auto_insert_metric_name,
                         save_on_train_epoch_end=True, **kwargs)
        self.every_n_tasks = every_n_tasks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Task ends are epoch multiples of epochs_per_task; known only once data is linked.
        self._every_n_epochs = self.every_n_tasks * trainer.datamodule.epochs_per_task
