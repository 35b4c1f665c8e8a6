"""The few facts and collectives the app needs about a multi-process (DDP) run."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def world_and_rank(trainer: Any = None) -> tuple[int, int]:
    """(world size, global rank): the trainer's when one is given, else the initialized
    ``torch.distributed`` process group's; (1, 0) in a single process."""
    if trainer is not None:
        return getattr(trainer, "world_size", 1), getattr(trainer, "global_rank", 0)
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective: every rank must call it);
    ``[obj]`` in a single process."""
    world, _ = world_and_rank()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out
