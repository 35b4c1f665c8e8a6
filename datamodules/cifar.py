"""Split CIFAR-10 and Split CIFAR-100 (class-IL / task-IL), via torchvision.

Both splits of the dataset are read once through ``torchvision.datasets.CIFAR10/100``
(which checks the files' md5), kept as (N, 3, 32, 32) ``uint8`` tensors and normalised per
item with the dataset's channel mean/std. Training batches are augmented on their device
by :meth:`augment`: random 32x32 crop of the image padded by 4 (black) + horizontal flip,
per sample (the usual DER/mammoth protocol).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from torchvision.datasets import CIFAR10, CIFAR100

from cl_lightning.checks import require_at_least
from datamodules.vision import (
    CropFlipAugmentation,
    ImageSource,
    SplitImageStream,
    missing_files,
    open_dataset,
)


class _SplitCIFAR(CropFlipAugmentation, SplitImageStream):
    """Shared by the CIFAR splits: torchvision loading and crop + flip augmentation."""

    dataset_cls: ClassVar[type[CIFAR10]] = CIFAR10
    """The torchvision class that reads (and downloads) the files."""
    image_shape = (3, 32, 32)

    def __init__(self, augmentation: bool = True, crop_padding: int = 4,
                 **kwargs: Any) -> None:
        """
        Args:
            augmentation: random crop + horizontal flip of every training batch.
            crop_padding: padding of the random crop, pixels.
            **kwargs: the options of :class:`SplitImageStream` (root, download,
                classes_per_task, train_per_task, ...) and of :class:`ContinualDataModule`.
        """
        require_at_least(0, "data.", crop_padding=crop_padding)
        super().__init__(**kwargs)
        self.augmentation, self.crop_padding = augmentation, crop_padding

    @property
    def folder(self) -> str:
        return os.path.join(self.root, self.dataset_cls.base_folder)

    @property
    def expected_files(self) -> list[str]:
        cls = self.dataset_cls
        return [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One split -> images (N, 3, 32, 32) uint8, targets (N,) int64."""
        cls = self.dataset_cls
        ds = open_dataset(self.dataset_name, self.folder, self.expected_files,
                          lambda dl: cls(self.root, train=train, download=dl), self.download)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(ds.targets, dtype=torch.long)

    def prepare_data(self) -> None:
        if missing_files(self.folder, self.expected_files):
            self.load(True)

    def read_split(self, train: bool) -> ImageSource:
        images, targets = self.load(train)
        return targets, lambda idx: images[idx]


class SplitCIFAR10(_SplitCIFAR):
    """Split CIFAR-10: 5 tasks of 2 classes, (0, 1), (2, 3), ... in CIFAR's label order.

    Args:
        classes_per_task: classes per task; must divide 10 (default 2 -> 5 tasks).
        **kwargs: root (holds ``cifar-10-batches-py/``), download, augmentation,
            crop_padding, train_per_task (null: all 10,000 per task), test_per_task, ...
    """

    dataset_cls = CIFAR10
    dataset_name = "CIFAR-10"
    total_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(self, classes_per_task: int = 2, **kwargs: Any) -> None:
        super().__init__(classes_per_task=classes_per_task, **kwargs)


class SplitCIFAR100(_SplitCIFAR):
    """Split CIFAR-100: tasks of ``classes_per_task`` consecutive fine labels (10 -> 10
    tasks, 20 -> 5 tasks).

    Args:
        classes_per_task: classes per task; must divide 100 (10 -> 10 tasks, 20 -> 5).
        **kwargs: root (holds ``cifar-100-python/``), download, augmentation,
            crop_padding, train_per_task (null: all, 500 per class), test_per_task, ...
    """

    dataset_cls = CIFAR100
    dataset_name = "CIFAR-100"
    total_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)

    def __init__(self, classes_per_task: int = 10, **kwargs: Any) -> None:
        super().__init__(classes_per_task=classes_per_task, **kwargs)
