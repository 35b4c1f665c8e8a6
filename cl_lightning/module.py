"""ContinualLearner: the LightningModule that trains any classifier on a task stream.

It owns the loss of one training step and the evaluation of one batch; strategies plug in
through :mod:`cl_lightning.plugins` (the protocol is written down there, once).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from cl_lightning.models.backbones import MLP, Classifier
from cl_lightning.plugins import LearnerPlugin, StepOutput
from cl_lightning.rng import collect_rng_states, restore_rng_states
from cl_lightning.task_accuracy import TaskAccuracy
from datamodules.base import StreamInfo

NetFactory = Callable[[Sequence[int], int], Classifier]
"""Builds the classifier from ``(input_shape, num_classes)``; in a config, a ``class_path``
whose other ``init_args`` are the model's options."""


class ContinualLearner(L.LightningModule):
    """Trains ``net`` on the current task, with per-sample losses and strategy plugins.

    Args:
        net: the classifier, built from the stream's ``(input_shape, num_classes)``.
        optimizer: optimizer factory (default Adam, lr 1e-3).
        lr_scheduler: optional scheduler factory, stepped once per epoch.
        stream: the stream's sizes and scenario (linked from the datamodule by the CLI).
        primary_variant: which evaluation is "the" result in ``results.json``; default the
            scenario's own (``class_il``, ``task_il`` or ``domain_il``).
    """

    def __init__(
        self,
        net: NetFactory = MLP,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        stream: StreamInfo | None = None,
        primary_variant: str | None = None,
    ) -> None:
        super().__init__()
        if stream is None:
            raise ValueError(
                "ContinualLearner needs the stream's StreamInfo (the CLI links it "
                "from the datamodule: pass stream=datamodule.info)"
            )
        self.stream = stream
        self.net = net(tuple(stream.input_shape), stream.num_classes)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        mask = torch.zeros(stream.num_tasks, stream.num_classes, dtype=torch.bool)
        for t, classes in enumerate(stream.task_classes):
            mask[t, list(classes)] = True
        self.register_buffer("task_mask", mask, persistent=False)
        self.primary_variant = primary_variant or self.eval_modes()[0]
        self._eval_metrics: dict[str, TaskAccuracy] = {}
        self._task_started: int | None = None

    # ----- model -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, *input_shape) -> logits (B, num_classes)."""
        return self.net(x)

    def mask_logits(self, logits: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Keep only each sample's task classes. logits: (B, C), task: (B,)."""
        return logits.masked_fill(~self.task_mask[task], torch.finfo(logits.dtype).min)

    def train_inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The datamodule's training augmentation of ``batch["x"]`` (the batch keeps the raw
        inputs, e.g. for a buffer)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        return batch["x"] if dm is None else dm.augment(batch["x"])

    def train_logits(self, model: nn.Module, inputs: torch.Tensor,
                     task: torch.Tensor) -> torch.Tensor:
        """Logits the training loss sees: masked to the task's classes under task-IL."""
        logits = model(inputs)
        if self.stream.scenario == "task-il":
            logits = self.mask_logits(logits, task)
        return logits

    # ----- plugins -----------------------------------------------------------------------
    def plugins(self) -> list[LearnerPlugin]:
        if self._trainer is None:
            return []
        found = [cb for cb in self.trainer.callbacks if isinstance(cb, LearnerPlugin)]
        return sorted(found, key=lambda p: p.plugin_order)

    @property
    def current_task(self) -> int:
        """The phase being trained (the task index in a sequential stream)."""
        return self.trainer.datamodule.phase_of_epoch(self.trainer.current_epoch)

    # ----- training ----------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        plugins = self.plugins()
        for p in plugins:
            batch = p.extend_batch(self, batch)
        inputs = self.train_inputs(batch)
        logits = self.train_logits(self.net, inputs, batch["task"])
        losses = F.cross_entropy(logits, batch["y"], reduction="none")
        step = StepOutput(batch=batch, inputs=inputs, logits=logits, losses=losses,
                          task=self.current_task)
        weights = torch.ones_like(losses)
        for p in plugins:
            w = p.sample_weights(self, step)
            if w is not None:
                weights = weights * w
        step.weights = weights
        replay = step.replay_mask
        terms = {"loss_current": (weights * losses)[~replay].mean()}
        if replay.any():
            terms["loss_replay"] = (weights * losses)[replay].mean()
        for p in plugins:
            step.extras.update(p.extra_losses(self, step))
        terms.update(step.extras)
        total = torch.stack(list(terms.values())).sum()
        self._check_finite(total, terms)
        bs = int((~replay).sum())
        self.log("train/loss", total, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=bs)
        return {"loss": total, "step": step.detached()}

    def _check_finite(self, total: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        if torch.isfinite(total):
            return
        bad = [k for k, v in terms.items() if not torch.isfinite(v)]
        raise FloatingPointError(
            f"non-finite loss at global step {self.global_step}, task {self.current_task} "
            f"(term(s): {', '.join(bad) or 'total'}); lower the learning rate or check the data. "
            "The last good checkpoint was not overwritten."
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = outputs["step"]
        for p in self.plugins():
            p.after_step(self, step)

    def on_train_epoch_start(self) -> None:
        task = self.current_task
        self.log("task", float(task), prog_bar=True, on_step=False, on_epoch=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_epoch=True)
        if self._task_started != task:
            self._task_started = task
            for p in self.plugins():
                p.on_task_start(self, task)

    def on_train_epoch_end(self) -> None:
        dm = self.trainer.datamodule
        if (self.trainer.current_epoch + 1) % dm.epochs_per_task == 0:
            for p in self.plugins():
                p.on_task_end(self, self.current_task)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    # ----- evaluation --------------------------------------------------------------------
    def eval_modes(self) -> list[str]:
        """Evaluation modes of the scenario; the first is its own."""
        if self.stream.scenario == "class-il":
            return ["class_il", "task_il"]
        return [self.stream.scenario.replace("-", "_")]

    def eval_models(self) -> dict[str, nn.Module]:
        models: dict[str, nn.Module] = {"": self.net}
        for p in self.plugins():
            models.update({f"{k}/": m for k, m in p.eval_models(self).items()})
        return models

    def _metric(self, variant: str) -> TaskAccuracy:
        if variant not in self._eval_metrics:
            self._eval_metrics[variant] = TaskAccuracy(self.stream.num_tasks).to(self.device)
        return self._eval_metrics[variant]

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor]) -> None:
        """Update every variant's per-task accuracy with one test batch."""
        for prefix, model in self.eval_models().items():
            logits = model(batch["x"])
            for mode in self.eval_modes():
                shown = self.mask_logits(logits, batch["task"]) if mode == "task_il" else logits
                self._metric(prefix + mode).update(shown.argmax(1), batch["y"], batch["task"])

    def compute_eval(self) -> dict[str, list[float]]:
        """Per-task accuracy (percent) of every variant, synced across ranks; then reset."""
        out = {}
        for name, metric in self._eval_metrics.items():
            out[name] = torch.atleast_1d(metric.compute()).tolist()  # 1 task: no squeeze
            metric.reset()
        return out

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.eval_step(batch)

    def test_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.eval_step(batch)

    # ----- checkpoints -------------------------------------------------------------------
    def model_signature(self) -> dict[str, Any]:
        return {
            "net": type(self.net).__qualname__,
            "shapes": {k: list(v.shape) for k, v in self.state_dict().items()},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cl_model_signature"] = self.model_signature()
        checkpoint["cl_rng_states"] = collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("cl_model_signature")
        current = self.model_signature()
        if saved is not None and saved != current:
            diff = [
                k
                for k in sorted(set(saved["shapes"]) | set(current["shapes"]))
                if saved["shapes"].get(k) != current["shapes"].get(k)
            ][:5]
            raise ValueError(
                f"the checkpoint holds a different model ({saved['net']} vs {current['net']}; "
                f"differing tensors: {diff}). Use the model config the checkpoint was "
                "trained with, or start a new run without --ckpt_path."
            )
        if "cl_rng_states" in checkpoint:
            restore_rng_states(checkpoint["cl_rng_states"])
