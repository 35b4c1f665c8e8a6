"""Lightning callbacks that act on the stream."""

from callbacks.checkpoint import TaskCheckpoint
from callbacks.evaluation import ContinualEvaluation

__all__ = ["ContinualEvaluation", "TaskCheckpoint"]
