"""Rehearsal strategies: ExperienceReplay (ER, prioritized ER) and DarkExperienceReplay (DER++).

Both are learner plugins (:mod:`cl_lightning.plugins`): they append a minibatch from a
:class:`~cl_lightning.replay.ReplayBuffer` to every training batch (marked ``"replay"``),
and insert the step's current-task samples (raw, un-augmented inputs) after the optimizer
step. The learner applies the stream's training augmentation to the whole batch, replayed
samples included. Under DDP every rank keeps its own shard of ``capacity // world_size``
items, so the ranks never hold more than ``capacity`` together (:func:`shard_capacity`);
the checkpoint holds the gathered buffer and loading re-shards it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from cl_lightning.checks import OptionError, require_at_least
from cl_lightning.plugins import LearnerPlugin, StepOutput
from cl_lightning.replay import ReplayBuffer

if TYPE_CHECKING:
    from cl_lightning.module import ContinualLearner

STORED_KEYS = ("x", "y", "task", "y_clean")


def shard_capacity(name: str, capacity: int, replay_batch_size: int, world: int) -> int:
    """Items each of ``world`` DDP ranks keeps: ``capacity // world``, so the ranks together
    never hold more than ``capacity`` (the protocol's buffer size). Refused when a rank
    would hold nothing; a warning with the numbers when a rank holds fewer items than one
    replay batch (it then replays at most its whole shard per step) or when ``capacity``
    is not a multiple of ``world`` (fewer items in total)."""
    per_rank = capacity // world
    where = f"{name} (trainer.callbacks): capacity={capacity} over {world} processes"
    if per_rank < 1:
        raise OptionError(f"{where} leaves no item per process; raise capacity to >= {world}")
    if per_rank < replay_batch_size:
        rank_zero_warn(f"{where} is {per_rank} items per process, fewer than one replay batch "
                       f"(replay_batch_size={replay_batch_size}, per process): each process "
                       f"replays at most {per_rank} items per step. For full replay batches "
                       f"raise capacity to >= {world * replay_batch_size} or lower "
                       f"replay_batch_size to <= {per_rank}")
    if capacity % world:
        rank_zero_warn(f"{where}: not a multiple, each process keeps {per_rank} items, "
                       f"{world * per_rank} in total")
    return per_rank


class ExperienceReplay(L.Callback, LearnerPlugin):
    """Experience replay (ER), optionally prioritized (Schaul et al. 2016).

    Args:
        capacity: total buffer size over all DDP ranks (each keeps ``capacity // world``).
        replay_batch_size: replayed samples appended to every training batch.
        policy: insertion policy: ``reservoir``, ``fifo`` or ``class_balanced``.
        sampling: ``uniform`` (without replacement) or ``prioritized``.
        alpha: prioritization exponent, priority = (|loss| + eps) ** alpha.
        beta: initial importance-sampling exponent (annealed to 1 over the whole fit).
        anneal_beta: anneal beta linearly to 1 over the fit's optimizer steps.
        buffer_device: ``cpu`` or ``model`` (the training device).
        seed: seed of the buffer's own generator (offset by the rank under DDP).
        loss_average: ``union``: one cross-entropy mean over current and replayed samples
            together (ER as in Chaudhry et al. 2019 and mammoth); ``separate``: mean over the
            current samples + mean over the replayed ones (twice the replay weight for
            equal batch sizes; the form ESMER's reference uses).
    """

    plugin_order = 10

    def __init__(
        self,
        capacity: int = 10000,
        replay_batch_size: int = 32,
        policy: Literal["reservoir", "fifo", "class_balanced"] = "reservoir",
        sampling: Literal["uniform", "prioritized"] = "uniform",
        alpha: float = 0.6,
        beta: float = 0.4,
        anneal_beta: bool = True,
        buffer_device: Literal["cpu", "model"] = "cpu",
        seed: int = 0,
        loss_average: Literal["union", "separate"] = "union",
    ) -> None:
        where = f"{type(self).__name__} (trainer.callbacks): "
        require_at_least(1, where, capacity=capacity,
                         hint="a rehearsal method needs a buffer: set capacity >= "
                              "replay_batch_size, or remove the callback to fine-tune without one")
        require_at_least(1, where, replay_batch_size=replay_batch_size,
                         hint="set replay_batch_size to the number of samples replayed per step")
        if replay_batch_size > capacity:
            raise OptionError(f"{where}the buffer (capacity={capacity}) is smaller than one "
                             f"replay batch (replay_batch_size={replay_batch_size}); raise "
                             "capacity or lower replay_batch_size")
        self.capacity, self.replay_batch_size = capacity, replay_batch_size
        self.policy, self.sampling = policy, sampling
        self.alpha, self.beta, self.anneal_beta = alpha, beta, anneal_beta
        self.buffer_device, self.seed = buffer_device, seed
        if loss_average not in ("union", "separate"):
            raise OptionError(f"loss_average must be 'union' or 'separate', got {loss_average!r}")
        self.loss_average = loss_average
        self.buffer: ReplayBuffer | None = None
        self._pending_state: dict[str, Any] | None = None
        self._sampled: dict[str, torch.Tensor] | None = None

    # ----- buffer lifecycle --------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.buffer is not None:
            return
        world = max(trainer.world_size, 1)
        beta_steps = int(trainer.estimated_stepping_batches) if self.anneal_beta else 0
        self.buffer = ReplayBuffer(
            capacity=shard_capacity(type(self).__name__, self.capacity, self.replay_batch_size,
                                    world),
            policy=self.policy, sampling=self.sampling, alpha=self.alpha, beta=self.beta,
            beta_final=1.0 if self.anneal_beta else self.beta, beta_steps=beta_steps,
            device=pl_module.device if self.buffer_device == "model" else "cpu",
            seed=self.seed + trainer.global_rank,
        )
        if self._pending_state is not None:
            self.buffer.load_state_dict(self._pending_state)
            self._pending_state = None

    def state_dict(self) -> dict[str, Any]:
        # every rank calls this while saving, so the buffer may gather its shards
        return {"buffer": None if self.buffer is None else self.buffer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("buffer")
        if state is None:
            return
        if self.buffer is None:
            self._pending_state = state
        else:
            self.buffer.load_state_dict(state)

    # ----- the protocol ------------------------------------------------------------------
    def draw(self, learner: ContinualLearner, n: int) -> dict[str, torch.Tensor] | None:
        """n samples from the buffer on the learner's device (None while empty)."""
        if self.buffer is None or len(self.buffer) == 0:
            return None
        sample = self.buffer.sample(n)
        return {k: v.to(learner.device, non_blocking=True) for k, v in sample.items()}

    def extend_batch(self, learner: ContinualLearner, batch: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        self._sampled = self.draw(learner, self.replay_batch_size)
        return append_replay(batch, self._sampled)

    def sample_weights(self, learner: ContinualLearner, step: StepOutput) -> torch.Tensor | None:
        if self._sampled is None:
            return None
        w = torch.ones_like(step.losses)
        replay = step.replay_mask
        if "weight" in self._sampled:  # prioritized replay's importance weights
            w[replay] = self._sampled["weight"].to(w.dtype)
        if self.loss_average == "union":
            # the learner adds mean_current + mean_replay; scaling each part by its share
            # of the batch turns that into one mean over the union
            query = ~replay & ~step.support_mask  # MAML/context support is not in the loss
            n_rep, n_query = replay.sum(), query.sum()
            n = n_rep + n_query  # support rows: n / n, exactly 1
            w = w * (torch.where(replay, n_rep, torch.where(query, n_query, n)) / n)
        return w

    def stored_items(self, step: StepOutput) -> dict[str, torch.Tensor]:
        """The current-task samples of a step, as the buffer stores them."""
        current = ~step.replay_mask
        return {k: step.batch[k][current] for k in STORED_KEYS if k in step.batch}

    def admit(self, learner: ContinualLearner, step: StepOutput) -> torch.Tensor | None:
        """(B_current,) bool mask of current samples offered to the buffer (None: all)."""
        return None

    def after_step(self, learner: ContinualLearner, step: StepOutput) -> None:
        assert self.buffer is not None
        if self._sampled is not None and self.sampling == "prioritized":
            self.buffer.update_priorities(self._sampled["index"], step.losses[step.replay_mask])
        self.buffer.add(self.stored_items(step), admit=self.admit(learner, step))
        self._sampled = None

    def kept_samples(self, learner: ContinualLearner) -> dict[str, torch.Tensor] | None:
        if self.buffer is None or len(self.buffer) == 0:
            return None
        return {k: v for k, v in self.buffer.contents().items() if k in ("x", "y", "task")}

    def on_task_end(self, learner: ContinualLearner, task: int) -> None:
        if self.buffer is None or len(self.buffer) == 0:
            return
        metrics = {"replay/fill": len(self.buffer) / self.buffer.capacity}
        content = self.buffer.contents()
        if "y_clean" in content:
            noisy = (content["y"] != content["y_clean"]).float().mean().item()
            metrics["replay/noisy_fraction"] = noisy
        if "priority" in content:
            metrics["replay/mean_priority"] = content["priority"].float().mean().item()
        for logger in learner.trainer.loggers:
            logger.log_metrics(metrics, step=learner.trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_histogram"):
                experiment.add_histogram("replay/classes", content["y"].float(), global_step=task)
                experiment.add_histogram("replay/tasks", content["task"].float(),
                                         global_step=task)


class DarkExperienceReplay(ExperienceReplay):
    """DER++ (Buzzega et al., NeurIPS 2020): replay stored logits and labels.

    The loss of a step, with ``(x', z')`` and ``(x'', y'')`` two independent buffer
    minibatches (``z'`` the logits stored with ``x'`` when it was seen)::

        loss = mean CE(f(x), y)                        # the current batch (the learner)
             + der_alpha * mean (f(x') - z')^2         # extra_losses: "der_mse"
             + der_beta  * mean CE(f(x''), y'')        # sample_weights on the replayed CE

    The learner computes ``mean CE`` over the current and over the replayed samples; this
    plugin gives the ``x'`` samples weight 0 in the replayed CE and rescales the ``x''``
    ones to ``der_beta`` times their mean. ``der_beta = 0`` is plain DER. Each term is
    its own mean (``loss_average='separate'``, the only form defined), and both minibatches
    are drawn uniformly (prioritized sampling is not defined for DER++).

    With a net that recalls (``MemoryAgent(recall_slots > 0)``), ``z'`` and ``f(x')`` are
    the logits without the recalled-label votes (:attr:`StepOutput.weight_logits`): the
    weights' own prediction is distilled, while the votes follow the buffer as it is
    now (a stored vote is no target for a later, different recall). ``distill_votes``
    keeps them in.

    Args:
        der_alpha: weight of the logit-matching MSE term.
        der_beta: weight of the cross-entropy term on the second replay minibatch.
        distill_votes: with a net that recalls, store and match the full logits, the
            recalled-label votes included (no effect for other nets).
        loss_average: must be ``separate``.
        sampling: must be ``uniform``.
        **kwargs: the other options of :class:`ExperienceReplay`.
    """

    def __init__(self, der_alpha: float = 0.1, der_beta: float = 0.5,
                 distill_votes: bool = False,
                 loss_average: Literal["union", "separate"] = "separate",
                 sampling: Literal["uniform", "prioritized"] = "uniform",
                 **kwargs: Any) -> None:
        where = "DarkExperienceReplay (trainer.callbacks): "
        if loss_average != "separate":
            raise OptionError(f"{where}loss_average must be 'separate' (each DER++ term is its "
                              f"own mean), got {loss_average!r}; remove the option")
        if sampling != "uniform":
            raise OptionError(f"{where}sampling must be 'uniform' (prioritized sampling is not "
                              f"defined for DER++), got {sampling!r}; use ExperienceReplay "
                              "for prioritized replay")
        super().__init__(loss_average=loss_average, sampling=sampling, **kwargs)
        require_at_least(0, "", der_alpha=der_alpha, der_beta=der_beta)
        self.der_alpha, self.der_beta = der_alpha, der_beta
        self.distill_votes = distill_votes
        self._n_logit = 0

    def extend_batch(self, learner: ContinualLearner, batch: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        first = self.draw(learner, self.replay_batch_size)
        if first is None:
            self._sampled = None
            return batch
        second = self.draw(learner, self.replay_batch_size) if self.der_beta > 0 else None
        self._n_logit = len(first["y"])
        self._sampled = first if second is None else {
            k: torch.cat([first[k], second[k]]) for k in first}
        return append_replay(batch, self._sampled)

    def _parts(self, step: StepOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) masks of the logit-matching and the label minibatch."""
        idx = step.replay_mask.nonzero().squeeze(1)
        logit_part = torch.zeros_like(step.replay_mask)
        logit_part[idx[: self._n_logit]] = True
        return logit_part, step.replay_mask & ~logit_part

    def sample_weights(self, learner: ContinualLearner, step: StepOutput) -> torch.Tensor | None:
        if self._sampled is None:
            return None
        # The learner averages w * CE over all replayed samples; the logit minibatch takes no
        # CE (w = 0) and the label minibatch is rescaled so the term is der_beta * its mean.
        logit_part, label_part = self._parts(step)
        w = torch.ones_like(step.losses)
        w[logit_part] = 0.0
        n_label = int(label_part.sum())
        if n_label:
            w[label_part] = self.der_beta * step.replay_mask.sum() / n_label
        return w

    def extra_losses(self, learner: ContinualLearner, step: StepOutput) -> dict[str, torch.Tensor]:
        if self._sampled is None:
            return {}
        logit_part, _ = self._parts(step)
        stored = self._sampled["logits"][: self._n_logit].to(step.logits.dtype)
        # stored logits are in the true label space; so is the comparison
        return {"der_mse": self.der_alpha * F.mse_loss(self._distilled(step)[logit_part],
                                                       stored)}

    def _distilled(self, step: StepOutput) -> torch.Tensor:
        """(B, C) the logits DER++ stores and matches, in the true label space."""
        return step.true_logits if self.distill_votes else step.weight_logits

    def stored_items(self, step: StepOutput) -> dict[str, torch.Tensor]:
        items = super().stored_items(step)
        items["logits"] = self._distilled(step)[~step.replay_mask]
        return items


def append_replay(batch: dict[str, torch.Tensor], sample: dict[str, torch.Tensor] | None
                  ) -> dict[str, torch.Tensor]:
    """Concatenate replayed samples to a batch and mark them in ``"replay"`` (B,) bool.

    Keys the current batch has are concatenated (``y_clean`` falls back to ``y`` where the
    buffer has none); buffer-only keys (``logits``, ``index``, ...) stay with the plugin.
    """
    if sample is None:
        return batch
    prev = batch.get("replay", torch.zeros(len(batch["y"]), dtype=torch.bool,
                                           device=batch["y"].device))
    out: dict[str, torch.Tensor] = {}
    for key, value in batch.items():
        if key == "replay":
            continue
        extra = sample.get(key, sample["y"] if key == "y_clean" else None)
        if extra is None:
            raise KeyError(f"replayed samples lack the batch key {key!r}")
        out[key] = torch.cat([value, extra.to(value.dtype)])
    out["replay"] = torch.cat([prev, torch.ones(len(sample["y"]), dtype=torch.bool,
                                                device=prev.device)])
    return out
