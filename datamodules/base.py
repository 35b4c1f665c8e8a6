"""ContinualDataModule: a stream of tasks served one at a time to a single ``trainer.fit``.

The whole stream is one fit: ``max_epochs = num_phases * epochs_per_task`` (the CLI sets
it), the training loader serves phase ``current_epoch // epochs_per_task`` and is rebuilt
every epoch (``reload_dataloaders_every_n_epochs=1``). A sequential stream has one phase
per task; ``joint=True`` has a single phase that trains on every task at once (the usual
upper bound). Every batch is a dict ``{"x", "y", "task"}`` (+ ``"y_clean"`` under label
noise).

A subclass describes its stream cheaply in ``__init__`` (so the CLI can link sizes into
the model before any data is built) and builds the data in :meth:`build_tasks`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    DistributedSampler,
    Subset,
    TensorDataset,
    default_collate,
)

from cl_lightning.checks import OptionError, require_at_least
from cl_lightning.distributed import world_and_rank
from cl_lightning.stream import SCENARIOS, Scenario, StreamInfo
from datamodules.resumable import ResumableLoader


@dataclass
class TaskData:
    """One task: datasets of ``(x, y)`` pairs, the training labels and the class set."""

    train: Dataset
    test: Dataset
    train_targets: torch.Tensor  # (N_train,) int64, clean labels of ``train``
    classes: tuple[int, ...]


class TaskView(Dataset):
    """A task's dataset as dict items ``{"x", "y", "task"[, "y_clean"]}``.

    ``labels`` (if given) replaces the dataset's labels (label noise); the dataset's own
    labels are then returned as ``"y_clean"``.
    """

    def __init__(self, base: Dataset, task: int, labels: torch.Tensor | None = None) -> None:
        self.base, self.task, self.labels = base, task, labels

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        x, y = self.base[i]
        y = torch.as_tensor(y, dtype=torch.long)
        item = {"x": x, "y": y, "task": torch.tensor(self.task, dtype=torch.long)}
        if self.labels is not None:
            item["y"], item["y_clean"] = self.labels[i], y
        return item

    def __getitems__(self, indices: list[int]) -> Batch | list[dict[str, Any]]:
        """A whole batch in a few tensor ops when the dataset can gather one (see
        :func:`gather_pairs`), else one item per index. The batch equals the default
        collation of ``__getitem__``'s items bit for bit."""
        index = torch.as_tensor(indices, dtype=torch.long)
        pairs = gather_pairs(self.base, index)
        if pairs is None:
            return [self[i] for i in indices]
        x, y = pairs
        batch = Batch(x=x, y=y, task=torch.full((len(index),), self.task, dtype=torch.long))
        if self.labels is not None:
            batch["y"], batch["y_clean"] = self.labels[index], y
        return batch


class Batch(dict):
    """A batch a dataset's ``__getitems__`` has already collated (see :func:`collate`)."""


def collate(data: Any) -> Any:
    """The stream loaders' ``collate_fn``: a :class:`Batch` passes as a plain dict, a list
    of items is collated by torch's default."""
    return dict(data) if isinstance(data, Batch) else default_collate(data)


def gather_pairs(dataset: Dataset, index: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x, y)`` of the items at ``index`` (k,) as two tensors, gathered at once: a
    dataset with a ``batch(index)`` method, or a two-tensor ``TensorDataset``. None for
    any other dataset (the caller then fetches item by item)."""
    batch = getattr(dataset, "batch", None)
    if callable(batch):
        return batch(index)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        x, y = dataset.tensors
        return x[index], y[index].long()
    return None


def symmetric_noise(
    targets: torch.Tensor, classes: tuple[int, ...], rate: float, generator: torch.Generator
) -> torch.Tensor:
    """Flip each label with probability ``rate`` to a uniformly drawn *other* class of
    ``classes``. targets: (N,) int64 -> (N,) int64."""
    if rate <= 0 or len(classes) < 2:
        return targets.clone()
    cls = torch.tensor(classes, dtype=torch.long)
    pos = (targets.unsqueeze(1) == cls).long().argmax(1)  # position of each label in cls
    flip = torch.rand(len(targets), generator=generator) < rate
    offset = torch.randint(1, len(classes), (len(targets),), generator=generator)
    noisy = cls[(pos + offset) % len(classes)]
    return torch.where(flip, noisy, targets)


class ContinualDataModule(L.LightningDataModule):
    """Base class of every task stream.

    Args:
        scenario: ``class-il`` (one head over all classes; Task-IL is reported too),
            ``task-il`` (the task id is known: logits are masked to the task's classes) or
            ``domain-il`` (every task has the same classes). A stream lists what it allows.
        epochs_per_task: training epochs on each task (>= 1).
        batch_size: training batch size (current-task samples per step).
        eval_batch_size: batch size of the per-task test loaders.
        num_workers: DataLoader workers.
        task_order_seed: shuffle the order of the tasks with this seed (None: natural order).
        label_noise: symmetric label-noise rate on training labels, in [0, 1).
        noise_seed: seed of the label-noise draws.
        joint: train on all tasks at once in a single phase (upper bound).
        shuffle_seed: seed of the training-set shuffles (epoch ``e`` uses ``shuffle_seed + e``,
            under DDP split across ranks); None: drawn once from torch's global generator
            (so ``seed_everything`` decides it). Kept in checkpoints, so a resumed run
            shuffles as the interrupted one would have.
    """

    supported_scenarios: tuple[str, ...] = SCENARIOS

    def __init__(
        self,
        scenario: Scenario = "class-il",
        epochs_per_task: int = 1,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        task_order_seed: int | None = None,
        label_noise: float = 0.0,
        noise_seed: int = 0,
        joint: bool = False,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        require_at_least(1, "data.", epochs_per_task=epochs_per_task, batch_size=batch_size,
                         eval_batch_size=eval_batch_size)
        require_at_least(0, "data.", num_workers=num_workers)
        if not 0.0 <= label_noise < 1.0:
            raise OptionError(f"data.label_noise must be in [0, 1), got {label_noise}")
        if scenario not in self.supported_scenarios:
            raise OptionError(
                f"data.scenario={scenario!r} is not available for {type(self).__name__}; "
                f"choose one of {list(self.supported_scenarios)}"
            )
        self.scenario = scenario
        self.epochs_per_task = epochs_per_task
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.task_order_seed = task_order_seed
        self.label_noise = label_noise
        self.noise_seed = noise_seed
        self.joint = joint
        self.shuffle_seed = shuffle_seed
        self._shuffle_seed = shuffle_seed  # resolved on first use / from a checkpoint
        self.tasks: list[TaskData] | None = None
        self._train_views: list[TaskView] = []
        self._test_views: list[TaskView] = []

    # ----- what a subclass provides -------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def natural_task_classes(self) -> list[tuple[int, ...]]:
        """Classes of each task in the stream's natural order (cheap; no data built)."""
        raise NotImplementedError

    def build_tasks(self) -> list[TaskData]:
        """Build every task's data, in natural order."""
        raise NotImplementedError

    def stream_params(self) -> dict[str, Any]:
        """The subclass's parameters that define the data (saved in checkpoints)."""
        return {}

    def heldout_task(self) -> TaskData | None:
        """A task of the same family the stream never trains on (for the few-shot
        adaptation metric), or None if the stream cannot make one (default)."""
        return None

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Training augmentation of a whole batch on its device, x: (B, *input_shape).

        Datasets yield un-augmented inputs; the learner augments every training batch,
        replayed samples included, right before the forward pass (default: none).
        """
        return x

    # ----- the stream ---------------------------------------------------------------------
    @property
    def task_order(self) -> list[int]:
        """Natural index of the task served at each position of the stream."""
        if self.task_order_seed is None:
            return list(range(self.num_tasks))
        g = torch.Generator().manual_seed(self.task_order_seed)
        return torch.randperm(self.num_tasks, generator=g).tolist()

    @property
    def num_phases(self) -> int:
        return 1 if self.joint else self.num_tasks

    @property
    def max_epochs(self) -> int:
        return self.num_phases * self.epochs_per_task

    @property
    def info(self) -> StreamInfo:
        natural = self.natural_task_classes()
        return StreamInfo(
            scenario=self.scenario,
            num_tasks=self.num_tasks,
            num_classes=self.num_classes,
            input_shape=tuple(self.input_shape),
            task_classes=tuple(tuple(natural[k]) for k in self.task_order),
        )

    def phase_of_epoch(self, epoch: int) -> int:
        return min(epoch // self.epochs_per_task, self.num_phases - 1)

    @property
    def current_phase(self) -> int:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return self.phase_of_epoch(epoch)

    def setup(self, stage: str | None = None) -> None:
        if self.tasks is not None:
            return
        built = self.build_tasks()
        if len(built) != self.num_tasks:
            raise RuntimeError(f"{type(self).__name__} built {len(built)} tasks, "
                               f"expected {self.num_tasks}")
        self.tasks = [built[k] for k in self.task_order]
        self._train_views, self._test_views = [], []
        for t, (k, task) in enumerate(zip(self.task_order, self.tasks, strict=True)):
            labels = None
            if self.label_noise > 0:
                g = torch.Generator().manual_seed(self.noise_seed * 100_003 + k)
                labels = symmetric_noise(task.train_targets, task.classes, self.label_noise, g)
            self._train_views.append(TaskView(task.train, t, labels))
            self._test_views.append(TaskView(task.test, t))
        smallest = min(len(v) for v in self._train_views)
        if self.batch_size > smallest:
            raise OptionError(
                f"data.batch_size={self.batch_size} is larger than the smallest task "
                f"({smallest} training samples); lower --data.batch_size"
            )

    def train_dataset(self, phase: int) -> Dataset:
        """The training set of a phase (all tasks in a joint run)."""
        return ConcatDataset(self._train_views) if self.joint else self._train_views[phase]

    def train_dataloader(self) -> DataLoader:
        """The current phase's loader for this epoch (rebuilt every epoch).

        Its order depends only on ``(shuffle_seed, epoch)`` and the rank, and its position
        is checkpointed (:class:`~datamodules.resumable.ResumableLoader`), so a run resumed
        from any checkpoint, mid-epoch included, sees the batches the original run would
        have seen. Under DDP the sampler gives each rank its part of the epoch (Lightning
        keeps a ``DistributedSampler`` it is given).
        """
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        world, rank = world_and_rank(trainer)
        dataset = self.train_dataset(self.current_phase)
        seed = self.resolved_shuffle_seed()
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                     seed=seed)
        sampler.set_epoch(epoch)  # Lightning sets it too, but only after workers may prefetch
        return ResumableLoader(
            dataset,
            epoch=epoch,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(seed + epoch),  # worker seeds
            collate_fn=collate,
        )

    def resolved_shuffle_seed(self) -> int:
        """``shuffle_seed``, or one drawn from torch's global generator on first use (the
        same on every rank)."""
        if self._shuffle_seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
            trainer = self.trainer
            if world_and_rank(trainer)[0] > 1:
                seed = int(trainer.strategy.broadcast(seed, src=0))
            self._shuffle_seed = seed
        return self._shuffle_seed

    def test_sets(self) -> list[TaskView]:
        return list(self._test_views)

    def eval_loaders(self, rank: int = 0, world_size: int = 1) -> list[DataLoader]:
        """One loader per task over this rank's unpadded shard of the task's test set."""
        return [
            DataLoader(
                Subset(view, range(rank, len(view), world_size)),
                batch_size=self.eval_batch_size,
                num_workers=self.num_workers,
                collate_fn=collate,
            )
            for view in self._test_views
        ]

    def val_dataloader(self) -> list[DataLoader]:
        # During fit the evaluation callback evaluates at task ends itself; Lightning's
        # validation loop only serves `validate`.
        if self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            return []
        return self.eval_loaders()  # Lightning shards these itself under DDP

    def test_dataloader(self) -> list[DataLoader]:
        return self.eval_loaders()

    # ----- checkpointed stream definition -------------------------------------------------
    def stream_definition(self) -> dict[str, Any]:
        info = self.info
        definition: dict[str, Any] = {
            "stream": type(self).__name__,
            "scenario": info.scenario,
            "num_tasks": info.num_tasks,
            "num_classes": info.num_classes,
            "input_shape": list(info.input_shape),
            "task_order": self.task_order,
            "task_classes": [list(c) for c in info.task_classes],
            "epochs_per_task": self.epochs_per_task,
            "joint": self.joint,
            "label_noise": self.label_noise,
            "noise_seed": self.noise_seed,
            **self.stream_params(),
        }
        if self.label_noise > 0 and self._train_views:
            crc = 0
            for v in self._train_views:
                crc = zlib.crc32(v.labels.numpy().tobytes(), crc)  # type: ignore[union-attr]
            definition["noisy_labels_crc32"] = crc
        return definition

    def state_dict(self) -> dict[str, Any]:
        return {"stream_definition": self.stream_definition(), "shuffle_seed": self._shuffle_seed,
                "global_batch": self.batch_size * world_and_rank(self.trainer)[0]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.shuffle_seed is None and state_dict.get("shuffle_seed") is not None:
            self._shuffle_seed = int(state_dict["shuffle_seed"])  # an explicit option wins
        world = world_and_rank(self.trainer)[0]
        saved_batch = state_dict.get("global_batch")
        if saved_batch is not None and saved_batch != self.batch_size * world:
            rank_zero_warn(
                f"the checkpoint was trained with a global batch of {saved_batch} "
                f"(data.batch_size x processes); this run has {self.batch_size} x {world} = "
                f"{self.batch_size * world}. To continue with the same global batch, set "
                f"--data.batch_size {max(saved_batch // world, 1)} (and scale the replay "
                "batch the same way).")
        saved = state_dict.get("stream_definition", {})
        current = self.stream_definition()
        diff = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        if diff:
            lines = "; ".join(f"{k}: checkpoint={saved.get(k)!r} config={current.get(k)!r}"
                              for k in diff)
            raise OptionError(
                "the checkpoint was trained on a different stream (" + lines + "). "
                "Resume with the data config the checkpoint was made with, "
                "or start a new run without --ckpt_path."
            )
