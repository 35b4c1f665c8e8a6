"""CLS-ER: Complementary Learning System-based Experience Replay (Arani, Sarfraz &
Zonooz, ICLR 2022), as a learner plugin stacked on the replay buffer.

Two EMA copies of the working model stand for the two memories of the complementary
learning systems theory: a *plastic* model that follows the working model quickly and a
*stable* model that follows it slowly (a lower update probability and/or a higher decay).
Per training step:

- cross-entropy on the current batch and a buffer minibatch (one mean over both, as ER);
- consistency on the replayed samples: ``consistency_weight * mean (f(x') - z)^2``, where
  ``z`` is, per sample, the logits of whichever EMA model gives the sample's label the
  higher probability (the better-informed memory is the teacher);
- after the optimizer step, with probability ``plastic_update_prob`` the plastic model
  and with probability ``stable_update_prob`` the stable model takes an EMA step of decay
  ``min(1 - 1/(step + 1), alpha)``; the buffer takes the current samples (reservoir).

The stable and the plastic model are evaluated next to the working model (variants
``stable/<mode>`` and ``plastic/<mode>``); ``report`` picks the primary result (the
stable model, as the paper).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from callbacks.replay import ExperienceReplay
from cl_lightning.checks import OptionError, require_at_least, require_in_range
from cl_lightning.distributed import world_and_rank
from cl_lightning.ema_model import EMAModel, frozen_logits, warn_if_slower_than_stream
from cl_lightning.esmer_math import ema_decay
from cl_lightning.plugins import StepOutput

if TYPE_CHECKING:
    from cl_lightning.module import ContinualLearner


def teacher_logits(stable: torch.Tensor, plastic: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the logits of the model whose softmax gives the target the higher
    probability (the plastic model on ties). stable, plastic: (B, C), targets: (B,) ->
    ((B, C) teacher logits, (B,) bool: the stable model was chosen)."""
    p_stable = F.softmax(stable, dim=1).gather(1, targets[:, None])
    p_plastic = F.softmax(plastic, dim=1).gather(1, targets[:, None])
    use_stable = p_stable > p_plastic
    return torch.where(use_stable, stable, plastic), use_stable[:, 0]


class CLSER(ExperienceReplay):
    """CLS-ER on top of a reservoir buffer.

    Args:
        consistency_weight: weight of the logit MSE between the working model and the
            chosen EMA teacher on replayed samples (the paper's ``lambda``).
        plastic_alpha: cap of the plastic model's EMA decay.
        plastic_update_prob: probability of a plastic-model update after a step.
        stable_alpha: cap of the stable model's EMA decay.
        stable_update_prob: probability of a stable-model update after a step.
        match_votes: with a net that recalls, match the full logits, the recalled-label
            votes included; off: match what the weights predict without the votes (as
            DER++'s ``distill_votes``), while the teacher is still chosen by the full
            prediction. No effect for other nets.
        report: the primary result: ``stable``, ``plastic`` or ``working``.
        ema_seed: seed of the update draws (the same on every DDP rank, so every rank's
            EMA models stay identical).
        **kwargs: the buffer options of :class:`~callbacks.replay.ExperienceReplay`.
    """

    def __init__(
        self,
        consistency_weight: float = 0.1,
        plastic_alpha: float = 0.999,
        plastic_update_prob: float = 0.9,
        stable_alpha: float = 0.999,
        stable_update_prob: float = 0.7,
        match_votes: bool = True,
        report: Literal["stable", "plastic", "working"] = "stable",
        ema_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        where = "CLSER (trainer.callbacks): "
        require_in_range(0.0, 1.0, where, plastic_alpha=plastic_alpha,
                         plastic_update_prob=plastic_update_prob, stable_alpha=stable_alpha,
                         stable_update_prob=stable_update_prob)
        require_at_least(0, where, consistency_weight=consistency_weight)
        if report not in ("stable", "plastic", "working"):
            raise OptionError(f"{where}report must be 'stable', 'plastic' or 'working', "
                              f"got {report!r}")
        self.consistency_weight = consistency_weight
        self.plastic_alpha, self.plastic_update_prob = plastic_alpha, plastic_update_prob
        self.stable_alpha, self.stable_update_prob = stable_alpha, stable_update_prob
        self.report, self.ema_seed = report, ema_seed
        self.match_votes = match_votes
        self._memories = {"plastic": EMAModel(), "stable": EMAModel()}
        self.steps = 0  # optimizer steps done, this one included
        self._generator = torch.Generator().manual_seed(ema_seed)

    def memory(self, name: Literal["plastic", "stable"], learner: ContinualLearner
               ) -> nn.Module:
        """The plastic or the stable model, created from the working model on first use."""
        return self._memories[name].get(learner.net, learner.device)

    def setup(self, trainer: Any, pl_module: ContinualLearner, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.report != "working":
            pl_module.primary_variant = f"{self.report}/{pl_module.eval_modes()[0]}"

    def on_fit_start(self, trainer: Any, pl_module: ContinualLearner) -> None:
        for name in self._memories:  # copies of the net before its first step (or restored)
            self.memory(name, pl_module)

    def on_train_start(self, trainer: Any, pl_module: ContinualLearner) -> None:
        steps = trainer.num_training_batches * trainer.max_epochs
        for name in ("plastic", "stable"):
            warn_if_slower_than_stream(
                f"CLS-ER's {name} model", getattr(self, f"{name}_alpha"),
                getattr(self, f"{name}_update_prob"), steps, f"{name}_alpha",
                f"{name}_update_prob")

    def eval_models(self, learner: ContinualLearner) -> dict[str, nn.Module]:
        return {name: self.memory(name, learner) for name in ("stable", "plastic")}

    # ----- the protocol ------------------------------------------------------------------
    def extra_losses(self, learner: ContinualLearner, step: StepOutput) -> dict[str, torch.Tensor]:
        replay = step.replay_mask
        if self.consistency_weight == 0 or not replay.any():
            return {}
        # without match_votes, student and teachers are compared without their votes
        strip = not self.match_votes and step.vote_logits is not None
        full, matched = {}, {}
        for name in ("stable", "plastic"):
            model = self.memory(name, learner)
            full[name] = frozen_logits(learner, model, step.inputs[replay],
                                       step.batch["task"][replay], **step.rows_kwargs(replay))
            matched[name] = full[name] - model.take_vote_logits() if strip else full[name]
        _, use_stable = teacher_logits(full["stable"], full["plastic"], step.targets[replay])
        teacher = torch.where(use_stable[:, None], matched["stable"], matched["plastic"])
        student = step.logits - step.vote_logits if strip else step.logits
        learner.add_epoch_mean("clser/stable_teacher_fraction", use_stable.sum().float(),
                               len(teacher))
        mse = F.mse_loss(student[replay], teacher)
        return {"clser_consistency": self.consistency_weight * mse}

    def after_step(self, learner: ContinualLearner, step: StepOutput) -> None:
        super().after_step(learner, step)  # buffer insertion
        self.steps += 1
        # two draws every step, plastic first, so the sequence of updates is reproducible
        draws = torch.rand(2, generator=self._generator).tolist()
        probs = {"plastic": self.plastic_update_prob, "stable": self.stable_update_prob}
        alphas = {"plastic": self.plastic_alpha, "stable": self.stable_alpha}
        for draw, name in zip(draws, ("plastic", "stable"), strict=True):
            if draw < probs[name]:
                self._memories[name].update(learner.net, ema_decay(self.steps, alphas[name]))
        if world_and_rank(learner.trainer)[0] > 1:
            for memory in self._memories.values():
                memory.broadcast_buffers()

    # ----- checkpointed state ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({name: m.state_dict() for name, m in self._memories.items()})
        state.update({"steps": self.steps, "generator": self._generator.get_state()})
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for name, memory in self._memories.items():
            memory.load_state_dict(state_dict.get(name))
        self.steps = state_dict["steps"]
        self._generator.set_state(state_dict["generator"])
