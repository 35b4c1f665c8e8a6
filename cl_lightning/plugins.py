"""The protocol between the learner and the strategy callbacks (replay, ESMER, ...).

A strategy is a Lightning ``Callback`` that also subclasses :class:`LearnerPlugin`. The
learner finds every such callback on the trainer and calls the methods below, in the
order of ``plugin_order`` (then the order of ``trainer.callbacks``). Every method has a
no-op default, so a plugin implements only what it needs.

One training step, as the learner runs it::

    batch = {"x", "y", "task"}                 # from the datamodule (current task)
    for p in plugins: batch = p.extend_batch(learner, batch)   # e.g. append replay samples
    logits = learner(batch["x"]); loss_i = CE(logits, y)       # per sample
    w_i = prod_p p.sample_weights(learner, step)               # e.g. ESMER, PER weights
    loss = mean_current(w * loss) + mean_replay(w * loss) + sum_p sum(p.extra_losses(...))
    # with model.meta / model.context, batch["support"] marks current samples the model
    # adapted on first; logits come from the adapted model and mean_current skips them
    -- backward, optimizer step --
    for p in plugins: p.after_step(learner, step)             # buffer insertion, EMA, ...

Batch keys a plugin may add: ``"replay"`` (bool (B,), True for samples it appended),
plus any key its own losses need (e.g. ``"logits"`` for DER++). Appended samples must
carry ``"x"``, ``"y"`` and ``"task"``; keys present in only one part are padded by the
plugin that appends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from cl_lightning.module import ContinualLearner


@dataclass
class StepOutput:
    """What one training step computed, shared with every plugin.

    batch: the extended batch (dict of (B, ...) tensors; raw, un-augmented ``"x"``)
    inputs: (B, ...) the inputs the model saw (``datamodule.augment(batch["x"])``)
    logits: (B, C) working-model logits (after task-IL masking, if any)
    losses: (B,) per-sample cross-entropy of the working model
    weights: (B,) per-sample loss weights after all plugins (ones if none)
    task: index of the current task
    extras: named extra loss terms added by plugins (scalars)
    model_kwargs: what the working model read besides the inputs (``{"recall": ...}``);
        a plugin that runs another model on ``inputs`` passes the same (e.g.
        ``learner.train_logits(model, step.inputs, task, **step.model_kwargs)``). Every
        value is per sample and has ``select(rows)`` (:meth:`rows_kwargs`).
    label_map: (B, C) in a shuffled-label episode: row i maps each true label to the label
        sample i was trained on (``targets[i] == label_map[i, batch["y"][i]]``); None
        otherwise. :attr:`targets` and :attr:`true_logits` follow it.
    vote_logits: (B, C) the part of ``logits`` that a recalling net's recalled-label votes
        add (in the same label space as ``logits``); None for a net without recall.
    """

    batch: dict[str, torch.Tensor]
    inputs: torch.Tensor
    logits: torch.Tensor
    losses: torch.Tensor
    task: int
    weights: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    label_map: torch.Tensor | None = None
    vote_logits: torch.Tensor | None = None

    @property
    def targets(self) -> torch.Tensor:
        """(B,) the labels this step's loss used: ``batch["y"]``, through ``label_map`` in
        a shuffled-label episode (what a model reading ``model_kwargs`` should predict)."""
        y = self.batch["y"]
        return y if self.label_map is None else self.label_map.gather(1, y[:, None])[:, 0]

    @property
    def true_logits(self) -> torch.Tensor:
        """(B, C) ``logits`` with columns in the true label space: column c holds the
        logit of the label c was trained as (``logits`` itself outside an episode)."""
        return self._true_space(self.logits)

    @property
    def weight_logits(self) -> torch.Tensor:
        """(B, C) :attr:`true_logits` without the recalled-label votes: what the weights
        alone predict (:attr:`true_logits` for a net without recall)."""
        if self.vote_logits is None:
            return self.true_logits
        return self._true_space(self.logits - self.vote_logits)

    def _true_space(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.label_map is None else logits.gather(1, self.label_map)

    def rows_kwargs(self, rows: torch.Tensor) -> dict[str, Any]:
        """:attr:`model_kwargs` for a subset of the batch (``rows``: (B,) bool mask or
        indices), to run another model on ``inputs[rows]`` only."""
        return {k: v.select(rows) for k, v in self.model_kwargs.items()}

    @property
    def replay_mask(self) -> torch.Tensor:
        """(B,) bool, True for samples a plugin appended from a buffer."""
        mask = self.batch.get("replay")
        return torch.zeros_like(self.losses, dtype=torch.bool) if mask is None else mask

    @property
    def support_mask(self) -> torch.Tensor:
        """(B,) bool, True for the current-task samples the learner adapted on (MAML
        support / context); they are not part of the outer loss."""
        mask = self.batch.get("support")
        return torch.zeros_like(self.losses, dtype=torch.bool) if mask is None else mask

    def detached(self) -> StepOutput:
        """A copy safe to keep after the step (no graph)."""
        return StepOutput(
            batch={k: v.detach() for k, v in self.batch.items()},
            inputs=self.inputs.detach(),
            logits=self.logits.detach(),
            losses=self.losses.detach(),
            task=self.task,
            weights=None if self.weights is None else self.weights.detach(),
            extras={k: v.detach() for k, v in self.extras.items()},
            label_map=self.label_map,
            vote_logits=None if self.vote_logits is None else self.vote_logits.detach(),
        )


class LearnerPlugin:
    """Mixin for callbacks that take part in the learner's training step."""

    plugin_order: int = 0  # lower runs first; evaluation uses a high value to run last

    def extend_batch(
        self, learner: ContinualLearner, batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Return the batch to train on (default: unchanged)."""
        return batch

    def sample_weights(self, learner: ContinualLearner, step: StepOutput) -> torch.Tensor | None:
        """(B,) multiplicative per-sample loss weights, or None for all ones."""
        return None

    def extra_losses(self, learner: ContinualLearner, step: StepOutput) -> dict[str, torch.Tensor]:
        """Named scalar loss terms added to the step's loss."""
        return {}

    def after_step(self, learner: ContinualLearner, step: StepOutput) -> None:
        """Called after the optimizer step with the step's detached outputs."""

    def on_task_start(self, learner: ContinualLearner, task: int) -> None:
        """Called at the first training epoch of ``task`` (also after a resume into it)."""

    def on_task_end(self, learner: ContinualLearner, task: int) -> None:
        """Called after the last training epoch of ``task``."""

    def eval_models(self, learner: ContinualLearner) -> dict[str, nn.Module]:
        """Extra models to evaluate next to the working model, by variant name prefix."""
        return {}

    def kept_samples(self, learner: ContinualLearner) -> dict[str, torch.Tensor] | None:
        """Samples the learner keeps (a replay buffer's ``x``, ``y``, ``task``), which the
        few-shot evaluation may adapt on; None if the plugin keeps none."""
        return None
