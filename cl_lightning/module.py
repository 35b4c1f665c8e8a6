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
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.func import functional_call

from cl_lightning.checks import OptionError, require_at_least, require_in_range
from cl_lightning.episodic_index import EpisodicIndex, fingerprint, nearest, same_item
from cl_lightning.lightning_private import attached_trainer
from cl_lightning.local_adaptation import LocalAdaptation
from cl_lightning.meta import MetaLearning, Params, label_permutation
from cl_lightning.models.backbones import MLP, Classifier
from cl_lightning.models.recall import Recall, same_label_mass
from cl_lightning.plugins import LearnerPlugin, StepOutput
from cl_lightning.rng import collect_rng_states, restore_rng_states
from cl_lightning.stream import StreamInfo
from cl_lightning.task_accuracy import TaskAccuracy

NetFactory = Callable[[Sequence[int], int], Classifier]
"""Builds the classifier from ``(input_shape, num_classes)``; in a config, a ``class_path``
whose other ``init_args`` are the model's options."""
ModelFn = Callable[..., torch.Tensor]
"""``(x, **kwargs) -> logits``: a model, or an adapted one (kwargs such as ``recall`` go to
the net)."""
Support = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""A support set ``(inputs, labels, task ids)``."""
Store = dict[str, torch.Tensor]
"""Labelled items a model may recall from: ``x`` (raw inputs), ``y``, ``task``."""


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
            support and query (and the labels the current queries recall), so only the
            support or the recalled neighbours tell the query's label. Replayed samples
            and the buffer keep the true labels, unless ``label_shuffle_replay``.
        label_shuffle_replay: with a net that recalls, a shuffled-label episode permutes
            all of the stream's classes, for every query (replayed ones too) and the
            labels it recalls (the buffer keeps the true labels): weights that memorised
            the buffer cannot answer either, only the recalled labels can.
        recall_refresh: with a net that recalls (``MemoryAgent(recall_slots > 0)``), every
            key of the replay buffer's index is recomputed after this many training steps;
            in between only new items are encoded.
        local_adaptation: with a net that recalls, also evaluate every model with its head
            adapted, per query, on the query's recalled neighbours
            (:class:`~cl_lightning.local_adaptation.LocalAdaptation`, MbPA-style), as the
            variants ``local/<mode>`` (and ``ema/local/<mode>``); None: off.
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
        recall_refresh: int = 50,
        local_adaptation: LocalAdaptation | None = None,
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
        self.meta, self.context, self.support_fraction = meta, context, support_fraction
        if meta is not None:
            meta.bind(self.net)
        self._default_meta: list[MetaLearning] = []  # few-shot inner loop when meta is None
        self._eval_metrics: dict[str, TaskAccuracy] = {}
        self._task_started: int | None = None
        self.recall_index = EpisodicIndex(recall_refresh)
        self._eval_readers: dict[str, ModelFn] = {}  # per evaluation pass
        self._recall_mass: torch.Tensor | None = None  # (sum of same-label mass, count)

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

    # ----- recall (episodic read from the replay buffer) ------------------------------------
    @property
    def recalling(self) -> bool:
        """Whether the net reads retrieved neighbours (``recall_slots > 0``)."""
        return getattr(self.net, "recall_slots", 0) > 0

    def store(self) -> Store | None:
        """The long-term store: the first plugin's kept samples (None if none keeps any)."""
        return next((k for p in self.plugins() if (k := p.kept_samples(self)) is not None),
                    None)

    @torch.no_grad()
    def retrieve(self, inputs: torch.Tensor, raw: torch.Tensor, store: Store,
                 keys: torch.Tensor, prints: torch.Tensor | None = None) -> Recall:
        """Each query's ``recall_slots`` nearest stored items by the net's key (cosine),
        never the query itself (an identical stored input is skipped).

        inputs: (B, ...) what the model sees; raw: (B, ...) the un-augmented inputs;
        keys: (S, D) the store's keys; prints: (S,) their fingerprints, if known."""
        k = self.net.recall_slots
        query = self.net.recall_keys(inputs).float()
        prints = fingerprint(store["x"]) if prints is None else prints
        exclude = same_item(fingerprint(raw), prints.to(raw.device))
        index, _, valid = nearest(query, keys, k, exclude)
        used, inverse = torch.unique(index, return_inverse=True)
        x = store["x"].to(inputs.device)[used]
        y = store["y"].to(inputs.device)[index]
        return Recall(x, inverse, y, valid)

    @torch.no_grad()
    def index_store(self, store: Store) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys ``(S, D)`` (the net's current weights) and fingerprints ``(S,)`` of a
        store's items, for :meth:`retrieve`."""
        return self.net.recall_keys(store["x"]).float(), fingerprint(store["x"])

    def train_recall(self, inputs: torch.Tensor, raw: torch.Tensor) -> Recall | None:
        """The recall of a training batch from the replay buffer (None before anything is
        stored); the buffer's index is kept current on its refresh schedule."""
        store = self.store()
        if store is None:
            return None
        store_x = store["x"].to(self.device)
        keys = self.recall_index.sync(store_x, self.net.recall_keys)
        return self.retrieve(inputs, raw, {**store, "x": store_x}, keys,
                             self.recall_index.prints)

    def reader(self, model: nn.Module | ModelFn | None = None, store: Store | None = None,
               index: tuple[torch.Tensor, torch.Tensor] | None = None, local: bool = False,
               **kwargs: Any) -> ModelFn:
        """``x -> logits`` of ``model`` (default the net) that recalls from ``store``
        (default the replay buffer, as it is now) when the net recalls; else the model as
        it is. ``index``: the store's :meth:`index_store`, if already computed (else it is
        computed once, on the first call). ``local``: each query's head is first adapted
        on its recalled neighbours (``model.local_adaptation``; their features are read
        the same way, each recalling its own neighbours)."""
        model = self.net if model is None else model
        store = self.store() if store is None and self.recalling else store
        if not self.recalling or store is None:
            return lambda x: model(x, **kwargs)
        store = {k: v.to(self.device) for k, v in store.items()}
        cached = [] if index is None else [index]

        def read(x: torch.Tensor) -> torch.Tensor:
            if not cached:
                cached.append(self.index_store(store))
            keys, prints = cached[0]
            recall = self.retrieve(x, x, store, keys, prints)
            if not local:
                return model(x, recall=recall, **kwargs)
            near = recall.x  # the distinct neighbours, each read with its own recall
            near_feats = model.features(near, recall=self.retrieve(near, near, store, keys,
                                                                   prints))
            assert self.local_adaptation is not None
            return self.local_adaptation.logits(
                model.head, model.features(x, recall=recall, **kwargs),
                near_feats[recall.index], recall.y, recall.valid)

        return read

    def check_recall(self) -> None:
        """Fail early where recall cannot work: more neighbours than the buffer holds."""
        if not self.recalling:
            return
        k = self.net.recall_slots
        keepers = [p for p in self.plugins() if hasattr(p, "capacity")]
        if not keepers:
            rank_zero_warn(
                f"model.net.recall_slots={k} but no strategy keeps samples to recall from "
                "(add a replay method, e.g. -c configs/methods/er.yaml): the agent recalls "
                "only in the few-shot evaluation")
            return
        capacity = keepers[0].capacity
        if k > capacity:
            raise OptionError(
                f"model.net.recall_slots ({k}) is larger than the replay buffer "
                f"(capacity={capacity}): lower recall_slots or raise the capacity")

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
                       detached: bool = False, recall: Recall | None = None,
                       support_recall: Recall | None = None) -> list[ModelFn]:
        """The model after adapting on ``support``, as ``x -> logits`` (unmasked), once per
        inner step (one entry without an inner loop).

        inner: run the MAML inner loop on the support loss (weight space).
        context: queries start from the memory state after reading the support (token
            space), where ``context_mask`` (None: every query).
        detached: evaluation: the adapted parameters start from detached copies (first
            order; no gradient reaches them).
        recall: the queries' recalled neighbours (the whole batch the models are called
            on); support_recall: the support's, read by the inner loop's support loss.
        """
        xs, ys, ts = support
        kwargs: dict[str, Any] = {}
        if context:
            kwargs = {"context": (xs, ys), "context_mask": context_mask}
        if recall is not None:
            kwargs["recall"] = recall
        support_kw = {} if support_recall is None else {"recall": support_recall}

        def model_at(params: Params, **kw: Any) -> ModelFn:
            return lambda x, **more: functional_call(self.net, params, (x,), {**kw, **more},
                                                     strict=False)

        if not inner:
            return [model_at({}, **kwargs)]
        meta = self.inner_learner()  # bound to self.net
        if self.head_fast_path and all(n.startswith("head.") for n in meta.names):
            # forward == head(features(x)): the support features are computed once and
            # only the head runs in the inner loop (same values and gradients)
            feats = self.net.features(xs, **support_kw)

            def head(params: Params, features: torch.Tensor) -> torch.Tensor:
                own = {n.removeprefix("head."): v for n, v in params.items()}
                return functional_call(self.net.head, own, (features,))

            def head_at(params: Params, **kw: Any) -> ModelFn:
                return lambda x, **more: head(params, self.net.features(x, **kw, **more))

            def support_loss(params: Params) -> torch.Tensor:
                logits = head(params, feats)
                return F.cross_entropy(self.train_logits(lambda _: logits, xs, ts), ys)

            return [head_at(p, **kwargs) for p in meta.adapt(self.net, support_loss, detached)]

        # cuDNN RNNs have no double backward
        no_cudnn = meta.second_order(detached) and xs.is_cuda

        def support_loss(params: Params) -> torch.Tensor:
            off = torch.backends.cudnn.flags(enabled=False) if no_cudnn else None
            with off or contextlib.nullcontext():
                return F.cross_entropy(
                    self.train_logits(model_at(params, **support_kw), xs, ts), ys)

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
        recall = self.train_recall(inputs, batch["x"]) if self.recalling else None
        model_kwargs = {} if recall is None else {"recall": recall}
        models: list[ModelFn] = [lambda x: self.net(x, **model_kwargs)]
        targets, label_map = batch["y"], None
        if (support.any() or recall is not None) and self.label_shuffle > 0 \
                and torch.rand(()) < self.label_shuffle:
            every = self.label_shuffle_replay
            classes = (range(self.stream.num_classes) if every
                       else self.stream.task_classes[self.current_task])
            mapping = label_permutation(classes, self.stream.num_classes, targets.device)
            keep = torch.zeros_like(replay) if every else replay
            identity = torch.arange(len(mapping), device=mapping.device)
            label_map = torch.where(keep[:, None], identity, mapping)  # (B, C), per sample
            targets = label_map.gather(1, targets[:, None])[:, 0]
            if recall is not None:  # the relabelled queries recall through the same map
                recall = recall._replace(y=label_map.gather(1, recall.y))
                model_kwargs["recall"] = recall
        if support.any():
            batch = {**batch, "support": support}
            models = self.adapted_models(
                (inputs[support], targets[support], batch["task"][support]),
                inner=self.meta is not None, context=self.context,
                context_mask=~support & ~replay, recall=recall,
                support_recall=None if recall is None else recall.select(support))
        logits = self.train_logits(models[-1], inputs, batch["task"])
        losses = F.cross_entropy(logits, targets, reduction="none")
        step = StepOutput(batch=batch, inputs=inputs, logits=logits, losses=losses,
                          task=self.current_task, model_kwargs=model_kwargs,
                          label_map=label_map)
        if recall is not None:
            self._log_recall(targets)
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

    def _log_recall(self, targets: torch.Tensor) -> None:
        """Accumulate ``recall/same_label_mass`` (logged per epoch): the primed read's mass
        on slots that hold the query's label (how often memory reads land on the right
        experiences)."""
        last = getattr(self.net, "last_recall", None)
        if last is None or len(last[0]) != len(targets):
            return
        weights, labels = last
        mass = same_label_mass(weights, labels, targets).sum()
        total = torch.stack([mass, mass.new_tensor(float(len(targets)))])
        self._recall_mass = total if self._recall_mass is None else self._recall_mass + total

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

    def on_fit_start(self) -> None:
        self.check_recall()

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
        if self.recalling:  # every rank takes part in the sum
            mass = self._recall_mass
            mass = torch.zeros(2, device=self.device) if mass is None else mass
            total = self.trainer.strategy.reduce(mass, reduce_op="sum")
            if total[1] > 0:
                self.log("recall/same_label_mass", total[0] / total[1])
            self._recall_mass = None
        dm = self.trainer.datamodule
        if (self.trainer.current_epoch + 1) % dm.epochs_per_task == 0:
            for p in self.plugins():
                p.on_task_end(self, self.current_task)

    def configure_optimizers(self) -> Any:
        optimizer = _build("model.optimizer", self.optimizer_factory, self.parameters())
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
        """Update every variant's per-task accuracy with one test batch."""
        for prefix, model in self.eval_variants():
            if prefix not in self._eval_readers:
                self._eval_readers[prefix] = self.reader(model, local=prefix.endswith("local/"))
            logits = self._eval_readers[prefix](batch["x"])
            for mode in self.eval_modes():
                shown = self.mode_logits(logits, batch["task"], mode)
                self._metric(prefix + mode).update(shown.argmax(1), batch["y"], batch["task"])

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
