"""ESMER: Error Sensitivity Modulation based Experience Replay (Sarfraz, Arani & Zonooz,
ICLR 2023), as a learner plugin stacked on the replay buffer.

Per training step (the reference semantics, ``docs/usage.md`` section "ESMER"):

- the semantic memory (an EMA copy of the working model) scores the current samples:
  ``l_s`` per-sample cross-entropy, no gradient;
- current-task loss ``mean(w * l_w)`` with ``w_i = mu / l_s_i`` if ``l_s_i >= beta * mu``
  else 1 (only once the loss memory ``mu > 0``);
- replay: cross-entropy on a buffer minibatch + ``gamma`` x MSE between the working and the
  semantic memory's logits on it;
- after the optimizer step: the error-sensitive reservoir admits only samples with
  ``l_s <= beta * mu`` (all while ``mu == 0``); with probability ``r`` the EMA takes a step
  with decay ``min(1 - 1/(step + 1), alpha)``; ``mu`` follows the batch's outlier-filtered
  mean ``l_s`` with decay ``min(1 - 1/(step + 1), loss_alpha)``;
- warm-up: during the first ``warmup_epochs`` of every task, nothing is admitted and ``mu``
  is frozen; everything else runs.

Both the working model and the semantic memory are evaluated (variants ``<mode>`` and
``ema/<mode>``); ``report`` picks the primary one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from callbacks.replay import ExperienceReplay
from cl_lightning.checks import OptionError, require_at_least, require_in_range
from cl_lightning.distributed import world_and_rank
from cl_lightning.ema_model import EMAModel, frozen_logits, warn_if_slower_than_stream
from cl_lightning.esmer_math import (
    admission_mask,
    ema_decay,
    modulation_weights,
    update_loss_memory,
)
from cl_lightning.plugins import StepOutput

if TYPE_CHECKING:
    from cl_lightning.module import ContinualLearner


class ESMER(ExperienceReplay):
    """ESMER on top of a reservoir buffer.

    Args:
        ema_alpha: cap of the semantic memory's EMA decay (reference 0.999).
        ema_update_prob: probability ``r`` of an EMA update after a step (reference 0.1).
        loss_alpha: cap of the loss memory's decay (reference 0.99).
        std_margin: samples above ``mean + std_margin * std`` of a batch do not update ``mu``.
        error_threshold: ``beta``; samples with ``l_s >= beta * mu`` are down-weighted and
            are not admitted to the buffer (reference 1.2).
        consistency_weight: ``gamma``, weight of the logit MSE on replayed samples (0.15).
        warmup_epochs: epochs (may be fractional) at the start of every task with no
            buffer admission and a frozen ``mu`` (reference 1); must be below the
            stream's ``epochs_per_task``, or nothing is ever admitted.
        report: which model is the primary result: the semantic memory (``ema``) or the
            working model.
        ema_seed: seed of the EMA-update draws (the same on every DDP rank, so every rank's
            semantic memory stays identical).
        mu_bias_correction: divide ``mu`` by ``1 - prod(a)`` (Adam-style) instead of the
            reference's cold start from 0 (off by default).
        loss_average: as :class:`~callbacks.replay.ExperienceReplay`; ``separate`` (the
            reference: current-task term + buffer term).
        **kwargs: the buffer options of :class:`~callbacks.replay.ExperienceReplay`.
    """

    def __init__(
        self,
        ema_alpha: float = 0.999,
        ema_update_prob: float = 0.1,
        loss_alpha: float = 0.99,
        std_margin: float = 1.0,
        error_threshold: float = 1.2,
        consistency_weight: float = 0.15,
        warmup_epochs: float = 1.0,
        report: Literal["ema", "working"] = "ema",
        ema_seed: int = 0,
        mu_bias_correction: bool = False,
        loss_average: Literal["union", "separate"] = "separate",
        **kwargs: Any,
    ) -> None:
        super().__init__(loss_average=loss_average, **kwargs)
        require_in_range(0.0, 1.0, "ESMER ", ema_alpha=ema_alpha,
                         ema_update_prob=ema_update_prob, loss_alpha=loss_alpha)
        require_at_least(0, "ESMER ", warmup_epochs=warmup_epochs,
                         consistency_weight=consistency_weight)
        if error_threshold <= 0:
            raise OptionError(f"ESMER error_threshold must be > 0, got {error_threshold}")
        self.ema_alpha, self.ema_update_prob = ema_alpha, ema_update_prob
        self.loss_alpha, self.std_margin = loss_alpha, std_margin
        self.error_threshold, self.consistency_weight = error_threshold, consistency_weight
        self.warmup_epochs, self.report = warmup_epochs, report
        self.ema_seed, self.mu_bias_correction = ema_seed, mu_bias_correction
        self._semantic = EMAModel()
        self.mu = 0.0
        self.mu_norm = 0.0  # 1 - prod(a): the bias-correction denominator
        self.steps = 0  # optimizer steps done, this one included (the reference's global step)
        self.task_steps = 0  # steps since the current task started
        self._generator = torch.Generator().manual_seed(ema_seed)
        self._ema_logits: torch.Tensor | None = None
        self._l_s: torch.Tensor | None = None
        self._admitted: torch.Tensor | None = None
        self._modulated: torch.Tensor | float = 0.0
        self._weights: list[torch.Tensor] = []

    # ----- semantic memory ---------------------------------------------------------------
    def semantic_memory(self, learner: ContinualLearner) -> nn.Module:
        """The EMA model, created from the working model on first use."""
        return self._semantic.get(learner.net, learner.device)

    @property
    def ema(self) -> nn.Module | None:
        """The semantic memory (None before its first use)."""
        return self._semantic.model

    def setup(self, trainer: Any, pl_module: ContinualLearner, stage: str) -> None:
        epochs = getattr(trainer.datamodule, "epochs_per_task", None)
        if stage == "fit" and epochs is not None and self.warmup_epochs >= epochs:
            raise OptionError(
                f"ESMER warmup_epochs ({self.warmup_epochs:g}) covers every epoch of a task "
                f"(data.epochs_per_task {epochs}): nothing would ever enter the buffer; set "
                f"trainer.callbacks.init_args.warmup_epochs below {epochs} (e.g. "
                f"{0.2 * epochs:g})")
        super().setup(trainer, pl_module, stage)
        if self.report == "ema":
            pl_module.primary_variant = "ema/" + pl_module.eval_modes()[0]

    def on_train_start(self, trainer: Any, pl_module: ContinualLearner) -> None:
        warn_if_slower_than_stream(
            "ESMER's semantic memory", self.ema_alpha, self.ema_update_prob,
            trainer.num_training_batches * trainer.max_epochs, "ema_alpha", "ema_update_prob")

    def eval_models(self, learner: ContinualLearner) -> dict[str, nn.Module]:
        return {"ema": self.semantic_memory(learner)}

    @property
    def loss_memory(self) -> float:
        """``mu`` as used by the modulation (bias-corrected when that option is on)."""
        if self.mu_bias_correction and self.mu_norm > 0:
            return self.mu / self.mu_norm
        return self.mu

    def in_warmup(self, learner: ContinualLearner) -> bool:
        batches = learner.trainer.num_training_batches
        warmup_steps = math.ceil(self.warmup_epochs * batches) if math.isfinite(batches) else 0
        return self.task_steps < warmup_steps

    # ----- the protocol ------------------------------------------------------------------
    def on_task_start(self, learner: ContinualLearner, task: int) -> None:
        if learner.trainer.current_epoch % learner.trainer.datamodule.epochs_per_task == 0:
            self.task_steps = 0  # (a resume inside a task keeps its counter)
        self._weights = []

    def sample_weights(self, learner: ContinualLearner, step: StepOutput) -> torch.Tensor | None:
        self._ema_logits = frozen_logits(learner, self.semantic_memory(learner), step.inputs,
                                         step.batch["task"], **step.model_kwargs)
        current = ~step.replay_mask
        self._l_s = F.cross_entropy(self._ema_logits[current], step.targets[current],
                                    reduction="none")
        w = torch.ones_like(step.losses)
        mu = self.loss_memory
        w[current] = modulation_weights(self._l_s, mu, self.error_threshold)
        # the share of current samples this step's weights down-weighted (none while mu == 0)
        self._modulated = (self._l_s >= self.error_threshold * mu).float().mean() if mu > 0 else 0.0
        self._weights.append(w[current].detach().cpu())
        per = super().sample_weights(learner, step)  # prioritized replay, if enabled
        return w if per is None else w * per

    def extra_losses(self, learner: ContinualLearner, step: StepOutput) -> dict[str, torch.Tensor]:
        replay = step.replay_mask
        if self.consistency_weight == 0 or not replay.any() or self._ema_logits is None:
            return {}
        mse = F.mse_loss(step.logits[replay], self._ema_logits[replay])
        return {"esmer_consistency": self.consistency_weight * mse}

    def admit(self, learner: ContinualLearner, step: StepOutput) -> torch.Tensor:
        assert self._l_s is not None
        if self.in_warmup(learner):
            self._admitted = torch.zeros_like(self._l_s, dtype=torch.bool)
        else:
            self._admitted = admission_mask(self._l_s, self.loss_memory, self.error_threshold)
        return self._admitted

    def after_step(self, learner: ContinualLearner, step: StepOutput) -> None:
        assert self._l_s is not None
        warmup = self.in_warmup(learner)
        super().after_step(learner, step)  # priorities + insertion filtered by self.admit
        admitted = self._admitted
        # as the reference, the step counts this step before the decays use it: the first
        # EMA update averages with decay 0.5 (min(1 - 1/(1 + 1), alpha)), not a copy
        self.steps += 1
        self.task_steps += 1
        if torch.rand((), generator=self._generator).item() < self.ema_update_prob:
            self._semantic.update(learner.net, ema_decay(self.steps, self.ema_alpha))
        if world_and_rank(learner.trainer)[0] > 1:
            self._semantic.broadcast_buffers()
        if not warmup:
            a = ema_decay(self.steps, self.loss_alpha)
            self.mu = update_loss_memory(self.mu, self._global_batch(learner, self._l_s),
                                         self.steps, self.loss_alpha, self.std_margin)
            self.mu_norm = a * self.mu_norm + (1.0 - a)
        # sample-weighted epoch means over every rank's samples (mu and warm-up are the same
        # on every rank; the fractions are per-rank shares); a tensor add per step each
        n = len(self._l_s)
        for name, value in (("mu", self.loss_memory), ("modulated_fraction", self._modulated),
                            ("admitted_fraction", admitted.float().mean()),
                            ("warmup", float(warmup))):
            learner.add_epoch_mean(f"esmer/{name}", torch.as_tensor(value).detach() * n, n)
        self._l_s = self._ema_logits = None

    @staticmethod
    def _global_batch(learner: ContinualLearner, l_s: torch.Tensor) -> torch.Tensor:
        """The semantic-memory losses of the whole (all-rank) batch, so the loss memory
        ``mu`` is the same on every DDP rank and equals a one-process run's on that batch.
        l_s: (B,) -> (world * B,)."""
        if world_and_rank(learner.trainer)[0] == 1:
            return l_s
        return learner.all_gather(l_s.detach()).reshape(-1)

    def on_task_end(self, learner: ContinualLearner, task: int) -> None:
        super().on_task_end(learner, task)
        if not self._weights:
            return
        weights = torch.cat(self._weights)
        for logger in learner.trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_histogram"):
                experiment.add_histogram("esmer/weights", weights, global_step=task)

    # ----- checkpointed state ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "ema": self._semantic.state_dict(),
            "mu": self.mu, "mu_norm": self.mu_norm, "steps": self.steps,
            "task_steps": self.task_steps, "generator": self._generator.get_state(),
        })
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.mu, self.mu_norm = state_dict["mu"], state_dict["mu_norm"]
        self.steps, self.task_steps = state_dict["steps"], state_dict["task_steps"]
        self._generator.set_state(state_dict["generator"])
        self._semantic.load_state_dict(state_dict.get("ema"))
