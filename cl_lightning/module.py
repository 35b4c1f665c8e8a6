"""ContinualLearner: the LightningModule that trains any classifier on a task stream.

It owns the loss of one training step and the evaluation of one batch; strategies plug in
through :mod:`cl_lightning.plugins` (the protocol is written down there, once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.func import functional_call

from cl_lightning.checks import require_in_range
from cl_lightning.meta import MetaLearning, Params, shuffle_labels
from cl_lightning.models.backbones import MLP, Classifier
from cl_lightning.plugins import LearnerPlugin, StepOutput
from cl_lightning.rng import collect_rng_states, restore_rng_states
from cl_lightning.task_accuracy import TaskAccuracy
from datamodules.base import StreamInfo

NetFactory = Callable[[Sequence[int], int], Classifier]
"""Builds the classifier from ``(input_shape, num_classes)``; in a config, a ``class_path``
whose other ``init_args`` are the model's options."""
ModelFn = Callable[[torch.Tensor], torch.Tensor]
Support = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""A support set ``(inputs, labels, task ids)``."""


class ContinualLearner(L.LightningModule):
    """Trains ``net`` on the current task, with per-sample losses and strategy plugins.

    Args:
        net: the classifier, built from the stream's ``(input_shape, num_classes)``.
        optimizer: optimizer factory (default Adam, lr 1e-3).
        lr_scheduler: optional scheduler factory, stepped once per epoch.
        stream: the stream's sizes and scenario (linked from the datamodule by the CLI).
        primary_variant: which evaluation is "the" result in ``results.json``; default the
            scenario's own (``class_il``, ``task_il`` or ``domain_il``).
        meta: MAML inner loop (:class:`~cl_lightning.meta.MetaLearning`); None trains
            without one. It also sets the inner loop of the few-shot evaluation.
        context: memory as context: the query part of each batch starts from the memory
            state after the model read the support part (labeled); needs a model with
            ``supports_context`` (MemoryAgent, LSTMClassifier).
        support_fraction: with ``meta`` or ``context``, the fraction of each batch's
            current-task samples used as the support set; the rest plus the replayed
            samples form the query, which alone makes the outer loss.
        label_shuffle: probability that a training step is a shuffled-label episode
            (Santoro et al. 2016): the current task's classes are permuted for that step's
            support and query, so only the support (context / inner loop) tells the
            query's label. Replayed samples and the buffer keep the true labels.
    """

    def __init__(
        self,
        net: NetFactory = MLP,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        stream: StreamInfo | None = None,
        primary_variant: str | None = None,
        meta: MetaLearning | None = None,
        context: bool = False,
        support_fraction: float = 0.5,
        label_shuffle: float = 0.0,
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
        require_in_range(0.05, 0.95, "model.", support_fraction=support_fraction)
        require_in_range(0.0, 1.0, "model.", label_shuffle=label_shuffle)
        if label_shuffle > 0 and meta is None and not context:
            raise ValueError("model.label_shuffle > 0 needs model.meta or model.context "
                             "(nothing could tell the shuffled labels); set it to 0")
        self.label_shuffle = label_shuffle
        if context and not getattr(self.net, "supports_context", False):
            raise ValueError(
                f"model.context=true needs a model that reads a context "
                f"(MemoryAgent or LSTMClassifier), got {type(self.net).__name__}; "
                "set model.context false or change model.net")
        self.meta, self.context, self.support_fraction = meta, context, support_fraction
        if meta is not None:
            meta.bind(self.net)
        self._default_meta: list[MetaLearning] = []  # few-shot inner loop when meta is None
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

    # ----- adaptation (MAML inner loop, memory as context) --------------------------------
    @property
    def adapting(self) -> bool:
        return self.meta is not None or self.context

    def inner_learner(self) -> MetaLearning:
        """The inner loop: ``meta`` if set, else default MAML settings (few-shot eval)."""
        if self.meta is not None:
            return self.meta
        if not self._default_meta:
            self._default_meta.append(MetaLearning())
            self._default_meta[0].bind(self.net)
        return self._default_meta[0]

    def support_mask(self, replay: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the first ``support_fraction`` of the current-task samples (the batch
        is shuffled), at least one, leaving at least one query; none if not adapting."""
        current = (~replay).nonzero().squeeze(1)
        mask = torch.zeros_like(replay)
        if self.adapting and len(current) >= 2:
            n = min(max(round(self.support_fraction * len(current)), 1), len(current) - 1)
            mask[current[:n]] = True
        return mask

    def adapted_models(self, support: Support, inner: bool, context: bool,
                       context_mask: torch.Tensor | None = None,
                       detached: bool = False) -> list[ModelFn]:
        """The model after adapting on ``support``, as ``x -> logits`` (unmasked), once per
        inner step (one entry without an inner loop).

        inner: run the MAML inner loop on the support loss (weight space).
        context: queries start from the memory state after reading the support (token
            space), where ``context_mask`` (None: every query).
        detached: evaluation: the adapted parameters start from detached copies (first
            order; no gradient reaches them).
        """
        xs, ys, ts = support
        kwargs = {"context": (xs, ys), "context_mask": context_mask} if context else {}

        def model_at(params: Params, **kw: Any) -> ModelFn:
            return lambda x: functional_call(self.net, params, (x,), kw, strict=False)

        if not inner:
            return [model_at({}, **kwargs)]
        meta = self.inner_learner()  # bound to self.net
        if self.head_fast_path and all(n.startswith("head.") for n in meta.names):
            # forward == head(features(x)): the support features are computed once and
            # only the head runs in the inner loop (same values and gradients)
            feats = self.net.features(xs)

            def head(params: Params, features: torch.Tensor) -> torch.Tensor:
                own = {n.removeprefix("head."): v for n, v in params.items()}
                return functional_call(self.net.head, own, (features,))

            def head_at(params: Params, **kw: Any) -> ModelFn:
                return lambda x: head(params, self.net.features(x, **kw))

            def support_loss(params: Params) -> torch.Tensor:
                logits = head(params, feats)
                return F.cross_entropy(self.train_logits(lambda _: logits, xs, ts), ys)

            return [head_at(p, **kwargs) for p in meta.adapt(self.net, support_loss, detached)]

        # cuDNN RNNs have no double backward
        no_cudnn = meta.second_order(detached) and xs.is_cuda

        def support_loss(params: Params) -> torch.Tensor:
            off = torch.backends.cudnn.flags(enabled=False) if no_cudnn else None
            with off or contextlib.nullcontext():
                return F.cross_entropy(self.train_logits(model_at(params), xs, ts), ys)

        return [model_at(p, **kwargs) for p in meta.adapt(self.net, support_loss, detached)]

    @property
    def head_fast_path(self) -> bool:
        """Whether the net declares ``forward(x, **kw) == head(features(x, **kw))``."""
        return getattr(self.net, "head_on_features", False) and self._head_fast_path

    _head_fast_path = True  # tests switch it off to compare with the generic path

    # ----- training ----------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        plugins = self.plugins()
        for p in plugins:
            batch = p.extend_batch(self, batch)
        inputs = self.train_inputs(batch)
        replay = batch.get("replay", torch.zeros_like(batch["y"], dtype=torch.bool))
        support = self.support_mask(replay)
        models: list[ModelFn] = [self.net]
        targets = batch["y"]
        if support.any():
            batch = {**batch, "support": support}
            if self.label_shuffle > 0 and torch.rand(()) < self.label_shuffle:
                classes = self.stream.task_classes[self.current_task]
                targets = shuffle_labels(targets, ~replay, classes, self.stream.num_classes)
            models = self.adapted_models(
                (inputs[support], targets[support], batch["task"][support]),
                inner=self.meta is not None, context=self.context,
                context_mask=~support & ~replay)
        logits = self.train_logits(models[-1], inputs, batch["task"])
        losses = F.cross_entropy(logits, targets, reduction="none")
        step = StepOutput(batch=batch, inputs=inputs, logits=logits, losses=losses,
                          task=self.current_task)
        weights = torch.ones_like(losses)
        for p in plugins:
            w = p.sample_weights(self, step)
            if w is not None:
                weights = weights * w
        step.weights = weights
        query = ~replay & ~support
        terms = {"loss_current": (weights * losses)[query].mean()}
        if replay.any():
            terms["loss_replay"] = (weights * losses)[replay].mean()
        if len(models) > 1 and self.meta is not None and self.meta.multi_step_loss:
            terms.update(self._multi_step_terms(models, inputs, targets, batch["task"], terms,
                                                query | replay))
        for p in plugins:
            step.extras.update(p.extra_losses(self, step))
        terms.update(step.extras)
        total = torch.stack(list(terms.values())).sum()
        self._check_finite(total, terms)
        bs = int(query.sum())
        self.log("train/loss", total, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs,
                 sync_dist=True)  # epoch means over every rank's samples
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=bs,
                     sync_dist=True)
        return {"loss": total, "step": step.detached()}

    def _multi_step_terms(self, models: list[ModelFn], inputs: torch.Tensor,
                          targets: torch.Tensor, task: torch.Tensor,
                          terms: dict[str, torch.Tensor],
                          outer: torch.Tensor) -> dict[str, torch.Tensor]:
        """MAML++ multi-step loss: the last step's terms scaled by its weight, plus the
        weighted outer losses of the earlier inner steps (``loss_msl``)."""
        assert self.meta is not None
        w = self.meta.outer_weights(self.current_epoch).to(inputs.dtype)
        scaled = {k: v * w[-1] for k, v in terms.items()}
        early = [  # full batch: a context mask is per sample of the whole batch
            w[k] * F.cross_entropy(self.train_logits(models[k], inputs, task)[outer],
                                   targets[outer])
            for k in range(len(models) - 1) if w[k] > 0
        ]
        if early:
            scaled["loss_msl"] = torch.stack(early).sum()
        return scaled

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
        # the same on every rank; sync_dist only keeps Lightning from warning under DDP
        self.log("task", float(task), prog_bar=True, on_step=False, on_epoch=True,
                 sync_dist=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_epoch=True,
                 sync_dist=True)
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

    def mode_logits(self, logits: torch.Tensor, task: torch.Tensor, mode: str) -> torch.Tensor:
        """The logits an evaluation mode scores: masked to the task's classes for
        ``task_il``, as they are otherwise."""
        return self.mask_logits(logits, task) if mode == "task_il" else logits

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
                shown = self.mode_logits(logits, batch["task"], mode)
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
