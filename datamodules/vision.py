"""Shared pieces of the image streams (MNIST, CIFAR, Tiny-ImageNet).

- :func:`open_dataset` / :class:`DatasetNotFoundError`: the one place that turns "the files
  are not there and could not be downloaded" into a message naming the folder, the files
  it expects and the reason, instead of a urllib stack trace.
- :class:`ImageTensorDataset`: images kept as ``uint8`` tensors in memory (a quarter of the
  float size), normalised per item or per batch, optionally pixel-permuted.
- :class:`SplitImageStream`: class-incremental split of a labelled image set into tasks of
  ``classes_per_task`` consecutive classes, with optional per-task subsampling.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
from torch.utils.data import Dataset

from cl_lightning.checks import MissingFileError, OptionError
from datamodules.augment import random_crop_flip
from datamodules.base import ContinualDataModule, TaskData

T = TypeVar("T")
SplitScenario = Literal["class-il", "task-il"]
DomainScenario = Literal["domain-il"]

_READ_ERRORS = (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError)


class DatasetNotFoundError(MissingFileError):
    """A dataset is missing (or unreadable) and could not be downloaded."""


def missing_files(folder: str, expected: Sequence[str]) -> list[str]:
    """The entries of ``expected`` (paths relative to ``folder``) that do not exist."""
    return [f for f in expected if not os.path.exists(os.path.join(folder, f))]


def _short(err: BaseException, limit: int = 400) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def not_found_message(name: str, folder: str, expected: Sequence[str], reason: str,
                      shown: Sequence[str] | None = None) -> str:
    """The message of a missing dataset: folder, expected files (``shown`` if given, e.g.
    with wildcards), the missing ones, the reason and the fixes."""
    missing = missing_files(folder, expected) or list(expected)
    return (
        f"{name} not found under {folder}: expected {', '.join(shown or expected)} "
        f"(missing: {', '.join(missing)}); {reason}. Put the files there, pass --data.root "
        "with the folder that holds them, or set --data.download true on a machine with "
        "network access."
    )


def open_dataset(
    name: str,
    folder: str,
    expected: Sequence[str],
    open_fn: Callable[[bool], T],
    download: bool,
    shown: Sequence[str] | None = None,
) -> T:
    """Open a dataset, downloading it first if files are missing and ``download`` is on.

    Args:
        name: the dataset's name in messages (``"MNIST"``).
        folder: where the files must be (shown in messages).
        expected: file or folder names, relative to ``folder``, that must exist.
        open_fn: ``open_fn(download)`` opens the dataset (e.g. a torchvision constructor);
            it is asked to download only when something in ``expected`` is missing.
        download: whether downloading is allowed (the stream's ``data.download``).
        shown: how the expected files are described in messages (default ``expected``).

    Raises:
        DatasetNotFoundError: files missing and downloading off or failed (the message
            names ``folder``, ``expected`` and the reason), or present but unreadable.
    """
    missing = missing_files(folder, expected)
    if missing and not download:
        raise DatasetNotFoundError(
            not_found_message(name, folder, expected, "downloading is off (data.download=false)",
                              shown)
        )
    try:
        return open_fn(bool(missing))
    except _READ_ERRORS as err:
        if missing_files(folder, expected):
            raise DatasetNotFoundError(
                not_found_message(name, folder, expected, f"download failed: {_short(err)}",
                                  shown)
            ) from None
        raise DatasetNotFoundError(
            f"{name} under {folder} could not be read: {_short(err)}. The files may be "
            f"incomplete or corrupted: delete {folder} and download again "
            "(--data.download true), or replace the files."
        ) from err


class ImageTensorDataset(Dataset):
    """``(x, y)`` pairs from ``uint8`` images, normalised per item.

    Args:
        images: (N, C, H, W) uint8.
        targets: (N,) int64.
        mean, std: per-channel normalisation, (C,) floats; ``x = (image / 255 - mean) / std``.
        pixel_perm: optional (C*H*W,) permutation applied to the flattened normalised image
            (the same for every item), ``x.flatten()[pixel_perm]``.

    Item: ``x`` (C, H, W) float32, ``y`` int.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        pixel_perm: torch.Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W) uint8, got {tuple(images.shape)} "
                             f"{images.dtype}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images, self.targets = images, targets.long()
        c = images.shape[1]
        self.scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32).view(c, 1, 1))
        self.shift = (torch.tensor(mean, dtype=torch.float32) /
                      torch.tensor(std, dtype=torch.float32)).view(c, 1, 1)
        self.pixel_perm = pixel_perm  # applied per batch: a permuted copy per task would
        # cost a dataset's memory for every task

    def __len__(self) -> int:
        return len(self.images)

    def _images(self, index: int | torch.Tensor) -> torch.Tensor:
        """Normalised (and permuted) float images at ``index`` (one or a batch)."""
        x = self.images[index].float().mul_(self.scale).sub_(self.shift)
        if self.pixel_perm is not None:
            x = x.flatten(-3).index_select(-1, self.pixel_perm).view_as(x)
        return x

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self._images(i), int(self.targets[i])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (k, C, H, W) and targets (k,) at ``index`` (k,) in a few tensor ops;
        image ``j`` equals ``self[index[j]][0]`` bit for bit."""
        return self._images(index), self.targets[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A list of items from one :meth:`batch` (the DataLoader calls this instead of
        one ``__getitem__`` per item)."""
        x, y = self.batch(torch.as_tensor(indices, dtype=torch.long))
        return list(zip(x.unbind(0), y.tolist(), strict=True))


def subsample(n: int, keep: int | None, generator: torch.Generator) -> torch.Tensor:
    """Indices of a random subset of ``range(n)`` of size ``min(keep, n)`` (all, in order,
    when ``keep`` is None). -> (k,) int64, sorted."""
    if keep is None or keep >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:keep].sort().values


def check_subsample_options(train_per_task: int | None, test_per_task: int | None) -> None:
    for opt, value in [("train_per_task", train_per_task), ("test_per_task", test_per_task)]:
        if value is not None and value < 1:
            raise OptionError(f"data.{opt} must be >= 1 (or null for all samples), got {value}")


ImageSource = tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]
"""What :meth:`SplitImageStream.read_split` returns: the targets (N,) int64 of a split and
a function from indices (k,) to their images (k, C, H, W) uint8 (so a stream can decode
only the images it keeps)."""


class SplitImageStream(ContinualDataModule):
    """Base of the class-incremental splits: task ``t`` holds classes
    ``t*classes_per_task ... (t+1)*classes_per_task - 1`` of the dataset (natural order;
    ``data.task_order_seed`` shuffles the tasks).

    A subclass sets ``dataset_name``, ``total_classes``, ``image_shape``, ``mean``, ``std``
    and implements :meth:`read_split`.

    Args:
        classes_per_task: classes in each task; must divide the dataset's class count.
        root: folder that holds the dataset (torchvision's layout).
        download: download the dataset into ``root`` if it is missing.
        train_per_task: keep at most this many training samples per task, drawn at random
            with ``subsample_seed`` (null: all).
        test_per_task: the same for the test samples of each task (null: all).
        subsample_seed: seed of the subsampling draws.
        scenario: ``class-il`` (one head over all classes) or ``task-il`` (logits masked to
            the task's classes).
        **kwargs: the options of :class:`ContinualDataModule` (batch_size, ...).
    """

    supported_scenarios = ("class-il", "task-il")
    dataset_name = ""
    total_classes = 0
    image_shape: tuple[int, int, int] = (0, 0, 0)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __init__(
        self,
        classes_per_task: int,
        root: str = "data",
        download: bool = True,
        train_per_task: int | None = None,
        test_per_task: int | None = None,
        subsample_seed: int = 0,
        scenario: SplitScenario = "class-il",
        **kwargs: Any,
    ) -> None:
        n = self.total_classes
        if not 1 <= classes_per_task <= n or n % classes_per_task:
            raise OptionError(f"data.classes_per_task must divide {n} ({self.dataset_name} has "
                             f"{n} classes), got {classes_per_task}")
        check_subsample_options(train_per_task, test_per_task)
        super().__init__(scenario=scenario, **kwargs)
        self.classes_per_task = classes_per_task
        self.root, self.download = str(root), download
        self.train_per_task, self.test_per_task = train_per_task, test_per_task
        self.subsample_seed = subsample_seed

    # ----- what a dataset provides -------------------------------------------------------
    def read_split(self, train: bool) -> ImageSource:
        """Targets of the train (or test) split and a reader of its images."""
        raise NotImplementedError

    # ----- the stream --------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return self.total_classes // self.classes_per_task

    @property
    def num_classes(self) -> int:
        return self.total_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.image_shape)

    def natural_task_classes(self) -> list[tuple[int, ...]]:
        k = self.classes_per_task
        return [tuple(range(t * k, (t + 1) * k)) for t in range(self.num_tasks)]

    def stream_params(self) -> dict[str, Any]:
        return {"classes_per_task": self.classes_per_task,
                "train_per_task": self.train_per_task, "test_per_task": self.test_per_task,
                "subsample_seed": self.subsample_seed}

    def build_tasks(self) -> list[TaskData]:
        splits = []
        for train, keep in [(True, self.train_per_task), (False, self.test_per_task)]:
            targets, read = self.read_split(train)
            per_task = []
            for t, classes in enumerate(self.natural_task_classes()):
                idx = torch.nonzero(torch.isin(targets, torch.tensor(classes))).flatten()
                if len(idx) == 0:
                    raise RuntimeError(f"{self.dataset_name}: no {'train' if train else 'test'} "
                                       f"samples of classes {classes}")
                g = torch.Generator().manual_seed(self.subsample_seed * 1_000_003
                                                  + 2 * t + int(train))
                idx = idx[subsample(len(idx), keep, g)]
                per_task.append(ImageTensorDataset(read(idx), targets[idx], self.mean,
                                                   self.std))
            splits.append(per_task)
        return [TaskData(tr, te, tr.targets, classes) for tr, te, classes
                in zip(*splits, self.natural_task_classes(), strict=True)]


class CropFlipAugmentation:
    """Mixin of the colour-image streams: :meth:`augment` is a random crop of the image
    padded by ``self.crop_padding`` black pixels + a horizontal flip, per sample, when
    ``self.augmentation`` is on. Needs ``mean``, ``std``, ``augmentation``, ``crop_padding``.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentation: bool
    crop_padding: int

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) normalised -> (B, C, H, W), on x's device."""
        if not self.augmentation:
            return x
        black = [-m / s for m, s in zip(self.mean, self.std, strict=True)]
        return random_crop_flip(x, padding=self.crop_padding, fill=black)
