"""Task streams (LightningDataModule subclasses)."""

from datamodules.base import ContinualDataModule, StreamInfo, TaskData
from datamodules.cifar import SplitCIFAR10, SplitCIFAR100
from datamodules.mnist import PermutedMNIST, RotatedMNIST, SplitMNIST
from datamodules.synthetic import LinearShiftStream
from datamodules.tiny_imagenet import SplitTinyImageNet
from datamodules.vision import DatasetNotFoundError

__all__ = [
    "ContinualDataModule",
    "DatasetNotFoundError",
    "LinearShiftStream",
    "PermutedMNIST",
    "RotatedMNIST",
    "SplitCIFAR10",
    "SplitCIFAR100",
    "SplitMNIST",
    "SplitTinyImageNet",
    "StreamInfo",
    "TaskData",
]
