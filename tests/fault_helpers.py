"""Test-only callbacks for fault-tolerance tests (importable by class path from a CLI run)."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L
import torch

from cl_lightning.plugins import LearnerPlugin, StepOutput


class SignalAt(L.Callback):
    """Send ``signum`` to this process at the end of batch ``batch`` of epoch ``epoch``
    (``batch`` -1: the epoch's last batch), on rank ``rank`` only."""

    def __init__(self, epoch: int, batch: int = -1, signum: int = int(signal.SIGTERM),
                 rank: int = 0) -> None:
        self.epoch, self.batch, self.signum, self.rank = epoch, batch, signum, rank

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        last = int(trainer.num_training_batches) - 1
        target = last if self.batch < 0 else self.batch
        if (trainer.current_epoch == self.epoch and batch_idx == target
                and trainer.global_rank == self.rank):
            os.kill(os.getpid(), self.signum)


class SlowSteps(L.Callback):
    """Sleep after every training batch (gives a subprocess test time to signal it) and
    touch ``marker`` once the first epoch has ended."""

    def __init__(self, seconds: float = 0.05, marker: str = "") -> None:
        self.seconds, self.marker = seconds, marker

    def on_train_batch_end(self, *args: Any) -> None:
        import time

        time.sleep(self.seconds)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.marker and trainer.is_global_zero:
            with open(self.marker, "a"):
                pass


class NaNLossAt(L.Callback, LearnerPlugin):
    """Adds a non-finite loss term ``nan_probe`` at global step ``step``; remembers the bytes
    of ``last.ckpt`` at that moment in ``<log_dir>/last_before_nan.bin``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def extra_losses(self, learner: Any, step: StepOutput) -> dict[str, torch.Tensor]:
        if learner.global_step != self.step:
            return {}
        ckpt = os.path.join(learner.trainer.log_dir, "checkpoints", "last.ckpt")
        with open(ckpt, "rb") as src, open(
                os.path.join(learner.trainer.log_dir, "last_before_nan.bin"), "wb") as dst:
            dst.write(src.read())
        return {"nan_probe": torch.tensor(float("nan"))}


class DumpRankState(L.Callback):
    """Every rank saves the learner's state (model, and e.g. MAML's learned step sizes)
    and ESMER/ER state at the end of fit, to ``<folder>/rank{R}.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state: dict[str, Any] = {
            "net": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "parameters": [name for name, _ in pl_module.named_parameters()]}
        for cb in trainer.callbacks:
            if getattr(cb, "ema", None) is not None:
                state["ema"] = {k: v.detach().cpu().clone()
                                for k, v in cb.ema.state_dict().items()}
                state["mu"] = cb.mu
            if getattr(cb, "buffer", None) is not None:
                state["buffer_size"] = len(cb.buffer)
        os.makedirs(self.folder, exist_ok=True)
        torch.save(state, os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))
