"""What the core knows about a task stream: its scenario and sizes.

Streams (``datamodules``) describe themselves with a :class:`StreamInfo`, which the CLI
links into the learner; the core never imports a stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scenario = Literal["class-il", "task-il", "domain-il"]
SCENARIOS: tuple[str, ...] = ("class-il", "task-il", "domain-il")


@dataclass(frozen=True)
class StreamInfo:
    """What the learner must know about a stream; linked into the model by the CLI."""

    scenario: str
    num_tasks: int
    num_classes: int
    input_shape: tuple[int, ...]
    task_classes: tuple[tuple[int, ...], ...]  # classes of each task, in stream order
