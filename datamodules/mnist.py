"""MNIST streams: SplitMNIST (class/task-IL), PermutedMNIST and RotatedMNIST (domain-IL).

Everything is read through ``torchvision.datasets.MNIST`` (``<root>/MNIST/raw/``) once, kept
in memory as ``uint8`` tensors and normalised per item with MNIST's mean/std
(0.1307, 0.3081). Inputs are (1, 28, 28).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torchvision.datasets import MNIST
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from cl_lightning.checks import OptionError, require_at_least
from datamodules.base import ContinualDataModule, TaskData
from datamodules.vision import (
    DomainScenario,
    ImageSource,
    ImageTensorDataset,
    SplitImageStream,
    SplitScenario,
    check_subsample_options,
    missing_files,
    open_dataset,
    subsample,
)

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
MNIST_FILES = [os.path.splitext(os.path.basename(url))[0] for url, _ in MNIST.resources]


def mnist_folder(root: str) -> str:
    """Where torchvision keeps the raw MNIST files."""
    return os.path.join(root, "MNIST", "raw")


def load_mnist(root: str, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One MNIST split via torchvision -> images (N, 1, 28, 28) uint8, targets (N,) int64.

    Raises :class:`~datamodules.vision.DatasetNotFoundError` (naming the folder and the
    files) when the files are missing and cannot be downloaded.
    """
    ds = open_dataset("MNIST", mnist_folder(root), MNIST_FILES,
                      lambda dl: MNIST(root, train=train, download=dl), download)
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()


class SplitMNIST(SplitImageStream):
    """Split MNIST: 5 tasks of 2 digits, (0, 1), (2, 3), ..., (8, 9).

    Args:
        root: folder that holds ``MNIST/raw/`` (torchvision's layout).
        download: download MNIST into ``root`` if it is missing.
        classes_per_task: digits per task; must divide 10 (default 2 -> 5 tasks).
        train_per_task: keep at most this many training samples per task, drawn at random
            with ``subsample_seed`` (null: all, about 12000).
        test_per_task: the same for the test samples of each task (null: all, about 2000).
        subsample_seed: seed of the subsampling draws.
        scenario: ``class-il`` (one 10-way head) or ``task-il`` (logits masked to the
            task's digits).
        **kwargs: the options of :class:`ContinualDataModule` (batch_size, ...).
    """

    dataset_name = "MNIST"
    total_classes = 10
    image_shape = (1, 28, 28)
    mean, std = MNIST_MEAN, MNIST_STD

    def __init__(
        self,
        root: str = "data",
        download: bool = True,
        classes_per_task: int = 2,
        train_per_task: int | None = None,
        test_per_task: int | None = None,
        subsample_seed: int = 0,
        scenario: SplitScenario = "class-il",
        **kwargs: Any,
    ) -> None:
        super().__init__(classes_per_task=classes_per_task, root=root, download=download,
                         train_per_task=train_per_task, test_per_task=test_per_task,
                         subsample_seed=subsample_seed, scenario=scenario, **kwargs)

    def prepare_data(self) -> None:
        if missing_files(mnist_folder(self.root), MNIST_FILES):
            load_mnist(self.root, True, self.download)

    def read_split(self, train: bool) -> ImageSource:
        images, targets = load_mnist(self.root, train, self.download)
        return targets, lambda idx: images[idx]


# Rotated-MNIST's data.interpolation choices
INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "nearest": InterpolationMode.NEAREST}


class _MNISTDomainStream(ContinualDataModule):
    """Base of the domain-IL MNIST streams: every task is all ten digits, seen through a
    task-specific input transformation (:meth:`task_dataset`).

    Args:
        num_tasks: number of tasks.
        root: folder that holds ``MNIST/raw/`` (torchvision's layout).
        download: download MNIST into ``root`` if it is missing.
        train_per_task: training samples per task, a random subset of MNIST's 60000 drawn
            per task with ``subsample_seed`` (null: all).
        test_per_task: the same for the 10000 test samples (null: all).
        subsample_seed: seed of the subsampling draws.
        normalize: standardise pixels with MNIST's mean and std; ``false`` feeds raw
            pixels in [0, 1] as mammoth does (its learning rates were tuned for those).
        scenario: ``domain-il`` (the only one: every task has the ten digits).
        **kwargs: the options of :class:`ContinualDataModule` (batch_size, ...).
    """

    supported_scenarios = ("domain-il",)

    def __init__(
        self,
        num_tasks: int = 20,
        root: str = "data",
        download: bool = True,
        train_per_task: int | None = None,
        test_per_task: int | None = None,
        subsample_seed: int = 0,
        normalize: bool = True,
        scenario: DomainScenario = "domain-il",
        **kwargs: Any,
    ) -> None:
        require_at_least(1, "data.", num_tasks=num_tasks)
        check_subsample_options(train_per_task, test_per_task)
        super().__init__(scenario=scenario, **kwargs)
        self._num_tasks = num_tasks
        self.root, self.download = str(root), download
        self.train_per_task, self.test_per_task = train_per_task, test_per_task
        self.subsample_seed = subsample_seed
        self.normalize = normalize

    @property
    def num_tasks(self) -> int:
        return self._num_tasks

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, 28, 28)

    def natural_task_classes(self) -> list[tuple[int, ...]]:
        return [tuple(range(10))] * self.num_tasks

    def stream_params(self) -> dict[str, Any]:
        return {"train_per_task": self.train_per_task, "test_per_task": self.test_per_task,
                "subsample_seed": self.subsample_seed, "normalize": self.normalize}

    @property
    def pixel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the images are standardised with ((0,), (1,) = raw [0, 1])."""
        return (MNIST_MEAN, MNIST_STD) if self.normalize else ((0.0,), (1.0,))

    def prepare_data(self) -> None:
        if missing_files(mnist_folder(self.root), MNIST_FILES):
            load_mnist(self.root, True, self.download)

    def task_dataset(self, task: int, images: torch.Tensor,
                     targets: torch.Tensor) -> ImageTensorDataset:
        """Task ``task``'s dataset from MNIST images (N, 1, 28, 28) uint8, targets (N,)."""
        raise NotImplementedError

    def build_tasks(self) -> list[TaskData]:
        return self._make_tasks(range(self.num_tasks))

    def heldout_task(self) -> TaskData:
        """Task ``num_tasks``: one more transformation of the same family."""
        return self._make_tasks([self.num_tasks])[0]

    def _make_tasks(self, tasks: Sequence[int]) -> list[TaskData]:
        splits = []
        for train, keep in [(True, self.train_per_task), (False, self.test_per_task)]:
            images, targets = load_mnist(self.root, train, self.download)
            per_task = []
            for t in tasks:
                g = torch.Generator().manual_seed(self.subsample_seed * 1_000_003
                                                  + 2 * t + int(train))
                if keep is None or keep >= len(targets):
                    x, y = images, targets  # shared by every task, not copied
                else:
                    idx = subsample(len(targets), keep, g)
                    x, y = images[idx], targets[idx]
                per_task.append(self.task_dataset(t, x, y))
            splits.append(per_task)
        classes = tuple(range(10))
        return [TaskData(tr, te, tr.targets, classes) for tr, te in zip(*splits, strict=True)]


class PermutedMNIST(_MNISTDomainStream):
    """Permuted MNIST: every task applies its own fixed permutation to the 784 pixels.

    The permutation of task ``k`` is ``torch.randperm(784)`` from a generator seeded with
    ``perm_seed`` and ``k`` (independent of ``num_tasks``). Task 0 is permuted too, unless
    ``first_identity`` (then task 0 is plain MNIST). The permutation is applied per item to
    the normalised image, so every task shares one copy of the images.

    Args:
        perm_seed: seed of the pixel permutations.
        first_identity: task 0 is unpermuted MNIST.
        **kwargs: num_tasks, root, download, train_per_task, test_per_task,
            subsample_seed (see the base class) and the ContinualDataModule options.
    """

    def __init__(self, perm_seed: int = 0, first_identity: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.perm_seed, self.first_identity = perm_seed, first_identity

    def permutation(self, task: int) -> torch.Tensor:
        """The pixel permutation of natural task ``task``: (784,) int64."""
        if task == 0 and self.first_identity:
            return torch.arange(28 * 28)
        g = torch.Generator().manual_seed(self.perm_seed * 1_000_003 + task)
        return torch.randperm(28 * 28, generator=g)

    def stream_params(self) -> dict[str, Any]:
        return {**super().stream_params(), "perm_seed": self.perm_seed,
                "first_identity": self.first_identity}

    def task_dataset(self, task: int, images: torch.Tensor,
                     targets: torch.Tensor) -> ImageTensorDataset:
        return ImageTensorDataset(images, targets, *self.pixel_stats,
                                  pixel_perm=self.permutation(task))


class RotatedMNIST(_MNISTDomainStream):
    """Rotated MNIST: every task rotates all digits by its own angle.

    Angles are drawn uniformly in ``[min_angle, max_angle)`` degrees (counter-clockwise),
    one per task, from ``rotation_seed`` (task ``k``'s angle does not depend on
    ``num_tasks``). Images are rotated once, when the stream is built, on the raw pixels
    (corners filled with black, MNIST's background) and kept as ``uint8``: one copy of the
    images per task (full MNIST: 55 MB per task).

    Args:
        rotation_seed: seed of the angles.
        min_angle: smallest angle, degrees.
        max_angle: largest angle (excluded), degrees.
        interpolation: ``"bilinear"`` (smooth strokes) or ``"nearest"`` (mammoth's
            ``transforms.functional.rotate`` default, used by the DER-paper protocol).
        **kwargs: num_tasks, root, download, train_per_task, test_per_task,
            subsample_seed (see the base class) and the ContinualDataModule options.
    """

    def __init__(self, rotation_seed: int = 0, min_angle: float = 0.0,
                 max_angle: float = 180.0,
                 interpolation: Literal["bilinear", "nearest"] = "bilinear",
                 **kwargs: Any) -> None:
        if not min_angle <= max_angle:
            raise OptionError(f"data.min_angle ({min_angle}) must be <= data.max_angle "
                             f"({max_angle})")
        if interpolation not in INTERPOLATIONS:
            raise OptionError(f"data.interpolation must be one of {sorted(INTERPOLATIONS)}, "
                             f"got {interpolation!r}")
        super().__init__(**kwargs)
        self.rotation_seed = rotation_seed
        self.min_angle, self.max_angle = float(min_angle), float(max_angle)
        self.interpolation = interpolation

    @property
    def angles(self) -> list[float]:
        """Rotation of each natural task, degrees."""
        return self._angles(self.num_tasks)

    def _angles(self, count: int) -> list[float]:
        """The first ``count`` angles (a longer list extends a shorter one)."""
        g = torch.Generator().manual_seed(self.rotation_seed)
        u = torch.rand(count, generator=g, dtype=torch.float64)
        return (self.min_angle + u * (self.max_angle - self.min_angle)).tolist()

    def stream_params(self) -> dict[str, Any]:
        return {**super().stream_params(), "rotation_seed": self.rotation_seed,
                "min_angle": self.min_angle, "max_angle": self.max_angle,
                "interpolation": self.interpolation,
                "angles": [round(a, 4) for a in self.angles]}

    def task_dataset(self, task: int, images: torch.Tensor,
                     targets: torch.Tensor) -> ImageTensorDataset:
        rotated = rotate_uint8(images, self._angles(task + 1)[task], self.interpolation)
        return ImageTensorDataset(rotated, targets, *self.pixel_stats)


def rotate_uint8(images: torch.Tensor, angle: float, interpolation: str = "bilinear",
                 chunk: int = 512) -> torch.Tensor:
    """Rotate uint8 images (N, C, H, W) by ``angle`` degrees counter-clockwise (``bilinear``
    or ``nearest``, black corners), in chunks -> (N, C, H, W) uint8.

    Every image is rotated on its own, so the result does not depend on ``chunk``; chunks
    of a few hundred MNIST images stay in cache (70,000 images: 0.4 s on one core, against
    1.0 s in chunks of 8,192)."""
    out = torch.empty_like(images)
    for i in range(0, len(images), chunk):
        part = TF.rotate(images[i:i + chunk].float(), angle,
                         interpolation=INTERPOLATIONS[interpolation], fill=0.0)
        out[i:i + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out
