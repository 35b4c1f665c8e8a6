"""The learner's rapid adaptation: MAML inner loops and memory as context.

A mixin of :class:`~cl_lightning.module.ContinualLearner`. A training batch's current-task
samples split into a support part and queries (:meth:`Adaptation.support_mask`); the
model adapted on the support (:meth:`Adaptation.adapted_models`: inner-loop steps in
weight space, and/or queries that start from the memory state after reading the support)
answers the queries, and the outer loss trains what the adaptation starts from. The
few-shot evaluation uses the same adaptation, detached.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from cl_lightning.learner_types import ModelFn, Support
from cl_lightning.meta import MetaLearning, Params, label_permutation
from cl_lightning.models import cuda_graphs
from cl_lightning.models.recall import Recall
from cl_lightning.stream import StreamInfo


class Adaptation:
    """Mixin: support/query split, adapted models, the MAML++ multi-step loss."""

    net: nn.Module
    meta: MetaLearning | None
    context: bool
    support_fraction: float
    label_shuffle: float
    label_shuffle_replay: bool
    stream: StreamInfo
    use_head_fast_path: bool
    _default_meta: list[MetaLearning]
    current_epoch: int
    current_task: int

    def train_logits(self, model: Any, inputs: torch.Tensor,
                     task: torch.Tensor) -> torch.Tensor:  # provided by the learner
        raise NotImplementedError

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

    def episode_label_map(self, replay: torch.Tensor, possible: bool) -> torch.Tensor | None:
        """(B, C) label map of a shuffled-label episode (row i: true label -> the label
        sample i trains as), drawn with probability ``label_shuffle`` where an episode is
        ``possible`` (something can tell the shuffled labels: a support or a recall);
        None otherwise. The current task's classes are permuted for the current samples,
        or (``label_shuffle_replay``) every class for every sample."""
        if not possible or self.label_shuffle <= 0 or torch.rand(()) >= self.label_shuffle:
            return None
        every = self.label_shuffle_replay
        classes = (range(self.stream.num_classes) if every
                   else self.stream.task_classes[self.current_task])
        mapping = label_permutation(classes, self.stream.num_classes, replay.device)
        keep = torch.zeros_like(replay) if every else replay
        identity = torch.arange(len(mapping), device=mapping.device)
        return torch.where(keep[:, None], identity, mapping)

    def support_mask(self, replay: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the first ``support_fraction`` of the current-task samples (the batch
        is shuffled), at least one, leaving at least one query; none if not adapting."""
        mask = torch.zeros_like(replay)
        if not self.adapting:
            return mask
        current = (~replay).nonzero().squeeze(1)
        if len(current) >= 2:
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

        # Neither cuDNN RNNs nor CUDA-graph replays have a double backward
        second_order = meta.second_order(detached)
        no_cudnn = second_order and xs.is_cuda

        def support_loss(params: Params) -> torch.Tensor:
            off = torch.backends.cudnn.flags(enabled=False) if no_cudnn else None
            eager = cuda_graphs.paused() if second_order else None
            with off or contextlib.nullcontext(), eager or contextlib.nullcontext():
                return F.cross_entropy(
                    self.train_logits(model_at(params, **support_kw), xs, ts), ys)

        return [model_at(p, **kwargs) for p in meta.adapt(self.net, support_loss, detached)]

    @property
    def head_fast_path(self) -> bool:
        """Whether the inner loop runs the head alone on support features computed once:
        the net declares ``forward(x, **kw) == head(features(x, **kw))``, only head
        parameters adapt, and ``use_head_fast_path`` is on."""
        return getattr(self.net, "head_on_features", False) and self.use_head_fast_path


    def multi_step_terms(self, models: list[ModelFn], inputs: torch.Tensor,
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

