"""ContinualLearner: the LightningModule that trains any classifier on a task stream.

It owns the loss of one training step and the evaluation of one batch; strategies plug in
through :mod:`cl_lightning.plugins` (the protocol is written down there, once). The episodic
read lives in :mod:`cl_lightning.recalling`, the MAML/context adaptation in
:mod:`cl_lightning.adaptation` (both mixed in).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from cl_lightning.adaptation import Adaptation
from cl_lightning.checks import OptionError, require_at_least, require_in_range
from cl_lightning.clipping import clip_optimizer_grads_, learner_clips, refuse_unclippable
from cl_lightning.distributed import gather_objects
from cl_lightning.ema_model import same_function
from cl_lightning.episodic_index import EpisodicIndex
from cl_lightning.epoch_means import EpochMeans, epoch_means
from cl_lightning.learner_types import ModelFn
from cl_lightning.lightning_private import attached_trainer
from cl_lightning.local_adaptation import LocalAdaptation
from cl_lightning.losses import present_class_cross_entropy
from cl_lightning.meta import MetaLearning
from cl_lightning.models.backbones import MLP, Classifier
from cl_lightning.plugins import LearnerPlugin, StepOutput
from cl_lightning.read_mixture import ReadMixture
from cl_lightning.recalling import Recalling
from cl_lightning.rng import collect_rng_states, restore_rng_states
from cl_lightning.stream import StreamInfo
from cl_lightning.task_accuracy import TaskAccuracy

# ``task`` and ``lr`` are logged unsynced on purpose (see on_train_epoch_start).
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(task|lr)'")

NetFactory = Callable[[Sequence[int], int], Classifier]
"""Builds the classifier from ``(input_shape, num_classes)``; in a config, a ``class_path``
whose other ``init_args`` are the model's options."""


class ContinualLearner(Recalling, Adaptation, L.LightningModule):
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
            support and query (and the labels the current queries recall), so only the
            support or the recalled neighbours tell the query's label. Replayed samples
            and the buffer keep the true labels, unless ``label_shuffle_replay``.
        label_shuffle_replay: with a net that recalls, a shuffled-label episode permutes
            all of the stream's classes, for every query (replayed ones too) and the
            labels it recalls (the buffer keeps the true labels): weights that memorised
            the buffer cannot answer either, only the recalled labels can.
        recall_from_batch: with a net that recalls, the probability that a training step's
            queries recall from the step's own current-task samples (each query's nearest
            other samples) instead of the replay buffer: a dense store of one task, like a
            few-shot support, where following the recalled labels pays (with
            ``label_shuffle``, it is the only way). 0: always the buffer.
        input_shuffle: with a net that recalls, the probability that a training step adds
            a novel-input episode: the step's queries (replayed ones too) once more, with
            their elements and those of the neighbours they recall permuted by one random
            permutation (a domain the weights never saw; the recall and its labels are
            unchanged), their loss added as ``loss_novel``. It teaches the net to follow
            the recalled labels where its weights do not recognise the input, as on a
            never-trained task read from a few examples, and its weights where they do.
            Costs one more forward of those queries in such steps. 0: off.
        recall_refresh: with a net that recalls (``MemoryAgent(recall_slots > 0)``), every
            key of the replay buffer's index is recomputed after this many training steps;
            in between only new items are encoded.
        local_adaptation: with a net that recalls, also evaluate every model with its head
            adapted, per query, on the query's recalled neighbours
            (:class:`~cl_lightning.local_adaptation.LocalAdaptation`, MbPA-style), as the
            variants ``local/<mode>`` (and ``ema/local/<mode>``); None: off.
        read_mixture: with a net that recalls, evaluate (and read few-shot supports) with
            the net's prediction mixed with its memory's vote, each calibrated on the
            store's items predicted leave-one-out and weighted by how well it predicts them
            (:class:`~cl_lightning.read_mixture.ReadMixture`); training is unchanged.
            Costs one pass of the net over the store per evaluation. None: the net's
            prediction alone.
        use_head_fast_path: when only the head adapts in the inner loop and the net is a
            head on features, compute the support features once (same values and
            gradients as the generic path, which ``false`` selects).
        ace: asymmetric cross-entropy (ER-ACE, Caccia et al., ICLR 2022): the current-task
            samples' cross-entropy counts only the classes present among them in the
            step, so new data does not push the old classes' logits down; replayed
            samples keep the full cross-entropy. For class-IL with a replay method.
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
        label_shuffle_replay: bool = False,
        recall_from_batch: float = 0.0,
        input_shuffle: float = 0.0,
        recall_refresh: int = 50,
        local_adaptation: LocalAdaptation | None = None,
        read_mixture: ReadMixture | None = None,
        use_head_fast_path: bool = True,
        ace: bool = False,
    ) -> None:
        super().__init__()
        if stream is None:
            raise OptionError(
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
        require_at_least(1, "model.", recall_refresh=recall_refresh)
        if label_shuffle > 0 and meta is None and not context and not self.recalling:
            raise OptionError("model.label_shuffle > 0 needs model.meta, model.context or a "
                             "net that recalls (recall_slots > 0): nothing could tell the "
                             "shuffled labels; set it to 0")
        self.label_shuffle = label_shuffle
        if label_shuffle_replay and not self.recalling:
            raise OptionError("model.label_shuffle_replay needs a net that recalls "
                             "(model.net.init_args.recall_slots > 0); set it to false")
        self.label_shuffle_replay = label_shuffle_replay
        require_in_range(0.0, 1.0, "model.", recall_from_batch=recall_from_batch)
        if recall_from_batch > 0 and not self.recalling:
            raise OptionError("model.recall_from_batch needs a net that recalls "
                              "(model.net.init_args.recall_slots > 0); set it to 0")
        self.recall_from_batch = recall_from_batch
        require_in_range(0.0, 1.0, "model.", input_shuffle=input_shuffle)
        if input_shuffle > 0 and not self.recalling:
            raise OptionError("model.input_shuffle needs a net that recalls "
                              "(model.net.init_args.recall_slots > 0); set it to 0")
        self.input_shuffle = input_shuffle
        if context and not getattr(self.net, "supports_context", False):
            raise OptionError(
                f"model.context=true needs a model that reads a context "
                f"(MemoryAgent or LSTMClassifier), got {type(self.net).__name__}; "
                "set model.context false or change model.net")
        if context and self.recalling:
            raise OptionError("model.context=true and a net that recalls (recall_slots > 0) "
                             "both set the memory a query starts from; set model.context "
                             "false or model.net.init_args.recall_slots 0")
        if local_adaptation is not None and not (
                self.recalling and isinstance(getattr(self.net, "head", None), nn.Linear)):
            raise OptionError("model.local_adaptation needs a net that recalls "
                              "(model.net.init_args.recall_slots > 0) with a linear head; "
                              "remove model.local_adaptation or set recall_slots")
        self.local_adaptation = local_adaptation
        if read_mixture is not None and not self.recalling:
            raise OptionError("model.read_mixture needs a net that recalls "
                              "(MemoryAgent with model.net.init_args.recall_slots > 0); "
                              "remove model.read_mixture or set recall_slots")
        self.read_mixture = read_mixture
        self.meta, self.context, self.support_fraction = meta, context, support_fraction
        self.use_head_fast_path = use_head_fast_path
        self.ace = ace
        if meta is not None:
            meta.bind(self.net)
        self._default_meta: list[MetaLearning] = []  # few-shot inner loop when meta is None
        self._eval_metrics: dict[str, TaskAccuracy] = {}
        self._task_started: int | None = None
        self.recall_index = EpisodicIndex(recall_refresh)
        # per evaluation pass: (model, local, reader) of each variant; variants whose models
        # compute the same function share one reader (see eval_step)
        self._eval_readers: dict[str, tuple[nn.Module, bool, ModelFn]] = {}
        self._epoch_means = EpochMeans()  # loss terms (and recall mass), logged per epoch

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
        dm = self.trainer.datamodule if attached_trainer(self) is not None else None
        return batch["x"] if dm is None else dm.augment(batch["x"])

    def train_logits(self, model: nn.Module | ModelFn, inputs: torch.Tensor,
                     task: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Logits the training loss sees: masked to the task's classes under task-IL.
        ``kwargs`` go to the model (e.g. the step's ``recall``)."""
        logits = model(inputs, **kwargs)
        if self.stream.scenario == "task-il":
            logits = self.mask_logits(logits, task)
        return logits

    # ----- plugins -----------------------------------------------------------------------
    def plugins(self) -> list[LearnerPlugin]:
        if attached_trainer(self) is None:
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
        replay = batch.get("replay", torch.zeros_like(batch["y"], dtype=torch.bool))
        support = self.support_mask(replay)
        has_support = self.adapting and bool(support.any())
        recall = self.train_recall(inputs, batch["x"], batch["y"], replay)
        label_map = self.episode_label_map(replay, has_support or recall is not None)
        targets = batch["y"]
        if label_map is not None:  # a shuffled-label episode: labels and recalls relabelled
            targets = label_map.gather(1, targets[:, None])[:, 0]
            if recall is not None:
                recall = recall._replace(y=label_map.gather(1, recall.y))
        model_kwargs = {} if recall is None else {"recall": recall}
        models: list[ModelFn] = [lambda x: self.net(x, **model_kwargs)]
        if has_support:
            batch = {**batch, "support": support}
            models = self.adapted_models(
                (inputs[support], targets[support], batch["task"][support]),
                inner=self.meta is not None, context=self.context,
                context_mask=~support & ~replay, recall=recall,
                support_recall=None if recall is None else recall.select(support))
        take_votes = getattr(self.net, "take_vote_logits", lambda: None)
        take_votes()  # nothing stale
        logits = self.train_logits(models[-1], inputs, batch["task"])
        votes = take_votes()
        losses = self.sample_losses(logits, targets, ~replay)
        step = StepOutput(batch=batch, inputs=inputs, logits=logits, losses=losses,
                          task=self.current_task, model_kwargs=model_kwargs,
                          label_map=label_map,
                          vote_logits=votes if votes is not None
                          and votes.shape == logits.shape else None)
        if recall is not None:
            self._log_recall(targets)
        queries = ~support
        novel = self.novel_input_logits(inputs, batch["task"], recall, queries)
        weights = torch.ones_like(losses)
        for p in plugins:
            w = p.sample_weights(self, step)
            if w is not None:
                weights = weights * w
        step.weights = weights
        query = ~replay & ~support
        weighted = weights * losses
        terms = {"loss_current": weighted[query].mean()}
        if replay.any():
            terms["loss_replay"] = weighted[replay].mean()
        if novel is not None:
            terms["loss_novel"] = self.sample_losses(novel, targets[queries],
                                                     query[queries]).mean()
        if len(models) > 1 and self.meta is not None and self.meta.multi_step_loss:
            terms.update(self.multi_step_terms(models, inputs, targets, batch["task"], terms,
                                                query | replay))
        for p in plugins:
            step.extras.update(p.extra_losses(self, step))
        terms.update(step.extras)
        total = torch.stack(list(terms.values())).sum()
        self._check_finite(total, terms)
        bs = int(query.sum())
        for name, value in {"loss": total, **terms}.items():
            self._epoch_means.add(f"train/{name}", value * bs, bs)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:  # when loggers write
            self.log("train/loss_step", total, on_step=True, on_epoch=False, prog_bar=True,
                     batch_size=bs, sync_dist=True)
        return {"loss": total, "step": step.detached()}

    def sample_losses(self, logits: torch.Tensor, targets: torch.Tensor,
                      current: torch.Tensor) -> torch.Tensor:
        """(B,) the training cross-entropy: with ``ace``, a ``current`` sample's counts
        only the classes present among the current samples."""
        if self.ace:
            return present_class_cross_entropy(logits, targets, current)
        return F.cross_entropy(logits, targets, reduction="none")

    def _check_finite(self, total: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        if torch.isfinite(total):
            return
        bad = [k for k, v in terms.items() if not torch.isfinite(v)]
        raise FloatingPointError(
            f"non-finite loss at global step {self.global_step}, task {self.current_task} "
            f"(term(s): {', '.join(bad) or 'total'}); lower the learning rate or check the data. "
            "The last good checkpoint was not overwritten."
        )

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, by :func:`~cl_lightning.clipping.clip_optimizer_grads_`
        where that is the same arithmetic (bit-equal; 134 against 171 us a step on
        Split-MNIST's MLP, without the dispatch through the precision plugin), and under
        bf16 mixed precision also for a fused optimizer, which Lightning refuses to clip."""
        if (self.fabric is None and gradient_clip_val == self.trainer.gradient_clip_val
                and learner_clips(self.trainer.precision_plugin, gradient_clip_val,
                                  gradient_clip_algorithm)):
            clip_optimizer_grads_(optimizer, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                            gradient_clip_algorithm)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = outputs["step"]
        for p in self.plugins():
            p.after_step(self, step)

    def setup(self, stage: str) -> None:
        # Before the model summary and any data loading: a bad recall size fails at once.
        if stage == "fit":
            self.check_recall()

    def on_train_epoch_start(self) -> None:
        task = self.current_task
        # Equal on every rank, so not synced: a synced epoch value is reduced when first
        # read, and rank 0's progress bar reads these at its epoch end, before the other
        # ranks reach the next collective (_log_epoch_means): the ranks would deadlock.
        self.log("task", float(task), prog_bar=True, on_step=False, on_epoch=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_epoch=True)
        if self._task_started != task:
            self._task_started = task
            for p in self.plugins():
                p.on_task_start(self, task)

    def on_train_epoch_end(self) -> None:
        self._log_epoch_means()
        dm = self.trainer.datamodule
        if (self.trainer.current_epoch + 1) % dm.epochs_per_task == 0:
            for p in self.plugins():
                p.on_task_end(self, self.current_task)

    def add_epoch_mean(self, name: str, total: torch.Tensor, count: float) -> None:
        """Add ``total`` (a sum over ``count`` samples) to the epoch's mean of ``name``,
        logged under that name at the end of the epoch over every rank's samples: a tensor
        add per step instead of a ``self.log`` call."""
        self._epoch_means.add(name, total, count)

    def _log_epoch_means(self) -> None:
        """Log the epoch's sample-weighted means of the loss terms (``train/loss_epoch``,
        ``train/loss_current``, ...) and of ``recall/same_label_mass``, over every rank's
        samples (all ranks take part)."""
        names, reduce = self._epoch_means.names(), None
        if self.trainer.world_size > 1:
            names = sorted(set().union(*gather_objects(names)))
            def reduce(t: torch.Tensor) -> torch.Tensor:
                return self.trainer.strategy.reduce(t, reduce_op="sum")
        for name, value in epoch_means(self._epoch_means, names, self.device, reduce).items():
            self.log("train/loss_epoch" if name == "train/loss" else name, value,
                     on_step=False, on_epoch=True, prog_bar=name == "train/loss",
                     sync_dist=True)  # equal on every rank; keeps Lightning from warning
        self._epoch_means.reset()

    def configure_optimizers(self) -> Any:
        optimizer = _build("model.optimizer", self.optimizer_factory, self.parameters())
        if attached_trainer(self) is not None:
            refuse_unclippable(optimizer, self.trainer.precision_plugin,
                               self.trainer.gradient_clip_val)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = _build("model.scheduler", self.scheduler_factory, optimizer)
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
        """Update every variant's per-task accuracy with one test batch. Variants whose
        models compute the same function (an EMA copy before its first update: the
        initial row of a CLS-ER or ESMER run) are read once and scored from those logits."""
        logits_of: dict[int, torch.Tensor] = {}
        for prefix, model in self.eval_variants():
            read = self._eval_reader(prefix, model)
            if id(read) not in logits_of:
                logits_of[id(read)] = read(batch["x"])
            logits = logits_of[id(read)]
            for mode in self.eval_modes():
                shown = self.mode_logits(logits, batch["task"], mode)
                self._metric(prefix + mode).update(shown.argmax(1), batch["y"], batch["task"])

    def _eval_reader(self, prefix: str, model: nn.Module) -> ModelFn:
        """The reader of one variant for this evaluation pass: built on its first batch,
        or the reader of an earlier variant whose model computes the same function."""
        if prefix not in self._eval_readers:
            local = prefix.endswith("local/")
            twin = next((read for m, loc, read in self._eval_readers.values()
                         if loc == local and same_function(m, model)), None)
            self._eval_readers[prefix] = (model, local,
                                          twin or self.reader(model, local=local))
        return self._eval_readers[prefix][2]

    def eval_variants(self) -> list[tuple[str, nn.Module]]:
        """(variant prefix, model) of every evaluated variant: each of :meth:`eval_models`,
        and with ``local_adaptation`` each again as ``<prefix>local/``."""
        models = list(self.eval_models().items())
        if self.local_adaptation is not None:
            models += [(f"{prefix}local/", model) for prefix, model in models]
        return models

    def compute_eval(self) -> dict[str, list[float]]:
        """Per-task accuracy (percent) of every variant, synced across ranks; then reset."""
        out = {}
        self._eval_readers.clear()
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
        if self.recalling:
            checkpoint["cl_recall_index"] = self.recall_index.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("cl_model_signature")
        current = self.model_signature()
        if saved is not None and saved != current:
            diff = [
                k
                for k in sorted(set(saved["shapes"]) | set(current["shapes"]))
                if saved["shapes"].get(k) != current["shapes"].get(k)
            ][:5]
            raise OptionError(
                f"the checkpoint holds a different model ({saved['net']} vs {current['net']}; "
                f"differing tensors: {diff}). Use the model config the checkpoint was "
                "trained with, or start a new run without --ckpt_path."
            )
        if "cl_rng_states" in checkpoint:
            restore_rng_states(checkpoint["cl_rng_states"])
        if "cl_recall_index" in checkpoint:
            self.recall_index.load_state_dict(checkpoint["cl_recall_index"])


def _build(option: str, factory: Callable[[Any], Any], arg: Any) -> Any:
    """``factory(arg)``; torch's own checks of a hyperparameter (a negative learning rate,
    momentum out of range) become an :class:`OptionError` naming ``option``."""
    try:
        return factory(arg)
    except ValueError as err:
        raise OptionError(f"{option}: {err}; fix it in {option}.init_args") from err
