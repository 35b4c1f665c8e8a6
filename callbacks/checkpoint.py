"""TaskCheckpoint: task-end, epoch-end and interrupt checkpoints, written atomically.

- ``task{NN}.ckpt`` at the end of every ``every_n_tasks``-th task (kept);
- ``last.ckpt`` at every task end and every ``every_n_epochs``-th epoch end (rewritten);
- on SIGTERM or a first Ctrl+C (SIGINT): the current step finishes, every rank agrees to
  stop after the same step, ``last.ckpt`` is written and the process exits with status
  128 + the signal number (143 for SIGTERM, 130 for SIGINT; :func:`cl_lightning.cli.main`).
  A second Ctrl+C aborts at once without saving.

Every write goes through :class:`~cl_lightning.checkpoint_io.AtomicCheckpointIO` (installed
here as the strategy's CheckpointIO), so a crash while saving never destroys the previous
file. A run that stops on an error (a non-finite loss, an exception) saves nothing: the last
good checkpoint stays as it was.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cl_lightning.checkpoint_io import AtomicCheckpointIO
from cl_lightning.checks import require_at_least
from cl_lightning.lightning_private import stop_after_this_step

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TaskCheckpoint(ModelCheckpoint):
    """Checkpoints of a task stream, so ``fit --ckpt_path last`` resumes it from anywhere.

    Args:
        dirpath: where to save (default: ``<log_dir>/checkpoints``).
        filename: name pattern of the task-end checkpoints (``task`` = task index).
        every_n_tasks: keep ``task{NN}.ckpt`` at every n-th task end (0: none).
        every_n_epochs: rewrite ``last.ckpt`` at the end of every n-th epoch (task ends always
            rewrite it; 0: task ends only).
        save_on_interrupt: on SIGTERM / Ctrl+C, finish the current step, write ``last.ckpt``
            and exit (status 143 / 130). Off: Lightning's default handling.
        verbose: log every save.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "task{task:02.0f}",
                 every_n_tasks: int = 1, every_n_epochs: int = 1,
                 save_on_interrupt: bool = True, verbose: bool = False) -> None:
        require_at_least(0, "checkpoint.", every_n_tasks=every_n_tasks,
                         every_n_epochs=every_n_epochs)
        super().__init__(dirpath=dirpath, filename=filename, save_last=True, save_top_k=-1,
                         auto_insert_metric_name=False, save_on_train_epoch_end=True,
                         every_n_epochs=0, verbose=verbose)
        self.every_n_tasks = every_n_tasks
        self.last_every_n_epochs = every_n_epochs  # (ModelCheckpoint owns every_n_epochs)
        self.save_on_interrupt = save_on_interrupt
        self.stop_signal: int | None = None  # the signal that asked this rank to stop
        self.stopped_by: int | None = None  # the signal the whole run stopped for
        self._handlers: dict[int, Any] = {}

    # ----- checkpoint IO -----------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # every checkpoint (ours, Lightning's, the user's) goes through the strategy's IO
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    # ----- task and epoch ends -----------------------------------------------------------
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            epochs_done = trainer.current_epoch + 1
            per_task = trainer.datamodule.epochs_per_task
            task_end = epochs_done % per_task == 0
            candidates = self._monitor_candidates(trainer)
            if (task_end and self.every_n_tasks
                    and (epochs_done // per_task) % self.every_n_tasks == 0):
                self._save_topk_checkpoint(trainer, candidates)
            if task_end or (self.last_every_n_epochs
                             and epochs_done % self.last_every_n_epochs == 0):
                self._save_last_checkpoint(trainer, candidates)
        self._check_stop(trainer)  # a signal during the task-end evaluation stops here

    # ----- interrupts --------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning's own SIGTERM handler (registered when fit starts): ours replaces
        # it for the training loop; Lightning restores the originals at teardown
        self.stop_signal = self.stopped_by = None
        if not self.save_on_interrupt:
            return
        for signum in STOP_SIGNALS:
            try:
                self._handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: leave the handlers alone
                self._handlers.clear()
                return

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: abort now, save nothing
        if self.stop_signal is None:
            self.stop_signal = signum
            # os.write: print() from a handler can hit a reentrant call on stdout
            os.write(2, (f"\n{signal.Signals(signum).name} received: finishing the current "
                         "step, then saving last.ckpt and stopping (Ctrl+C again aborts "
                         "without saving)\n").encode())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._check_stop(trainer)

    def _check_stop(self, trainer: L.Trainer) -> None:
        """Agree across ranks whether any was signalled; if so, make every rank stop after
        this step (Lightning raises ``SIGTERMException`` once the step has completed)."""
        if not self._handlers:
            return
        requested = self.stop_signal or 0
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([requested], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = int(flag.item())
        if requested:
            self.stopped_by = requested
            # Lightning's own flag: the loops raise SIGTERMException at the end of the step
            # (or of the epoch), after every hook of the step has run
            stop_after_this_step(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return  # errors (non-finite loss, ...) save nothing: last.ckpt stays good
        signum = self.stopped_by or self.stop_signal or signal.SIGTERM
        exception.exit_code = 128 + int(signum)  # type: ignore[attr-defined]
        if not self.save_on_interrupt or trainer.state.fn != TrainerFn.FITTING:
            return
        path = self.last_model_path or self.format_checkpoint_name(
            self._monitor_candidates(trainer), self.CHECKPOINT_NAME_LAST)
        if self._last_global_step_saved == trainer.global_step and self.last_model_path == path:
            saved = "already up to date"  # stopped right after an epoch-end save
        else:
            self.last_model_path = path
            self._save_checkpoint(trainer, path)
            saved = "saved"
        rank_zero_info(f"Stopped by {signal.Signals(signum).name} at epoch "
                       f"{trainer.current_epoch}, global step {trainer.global_step}: {path} "
                       f"{saved}. Resume with: fit ... --ckpt_path last")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, previous in self._handlers.items():
            if signal.getsignal(signum) == self._on_signal:  # Lightning may have restored it
                signal.signal(signum, previous)
        self._handlers.clear()
        super().teardown(trainer, pl_module, stage)
