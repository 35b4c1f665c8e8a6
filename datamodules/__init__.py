"""Task streams (LightningDataModule subclasses)."""

from datamodules.base import ContinualDataModule, StreamInfo, TaskData
from datamodules.synthetic import LinearShiftStream

__all__ = ["ContinualDataModule", "LinearShiftStream", "StreamInfo", "TaskData"]
