"""Capture and restore every random generator a run draws from (for exact resume).

Under ``torch.distributed`` every rank has its own generator states (dropout masks and
batch augmentation differ per rank). :func:`collect_rng_states` then gathers all ranks'
states into the checkpoint (every rank calls it while a checkpoint is assembled, so the
gather is a matched collective) and :func:`restore_rng_states` gives each rank its own.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from cl_lightning.distributed import gather_objects, world_and_rank


def local_rng_states() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and (if initialised) CUDA generator states.

    Only tensors, ints, floats, strings and tuples, so ``torch.load(weights_only=True)``
    can read a checkpoint that holds them.
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def collect_rng_states() -> dict[str, Any]:
    """This rank's generator states; under DDP also ``"per_rank"``: every rank's, in order.

    Under an initialised process group with more than one rank this is a collective
    (``all_gather_object``): every rank must call it, as Lightning does with the
    ``on_save_checkpoint`` hooks.
    """
    states = local_rng_states()
    if world_and_rank()[0] > 1:
        states["per_rank"] = gather_objects(states)
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_states`; missing entries are left as they are.

    A rank takes its own entry of ``"per_rank"`` when the checkpoint has one for it (same
    or larger world size at save time); otherwise (older checkpoints, or more ranks now
    than then) the saving rank's top-level states, which keeps a single-process resume
    exact and makes a changed world size deterministic.
    """
    _, rank = world_and_rank()
    per_rank = states.get("per_rank")
    if per_rank and rank < len(per_rank):
        states = per_rank[rank]
    if "python" in states:
        random.setstate(states["python"])
    if "numpy" in states:
        name, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        saved = states["cuda"]
        torch.cuda.set_rng_state_all(saved[: torch.cuda.device_count()])


@contextmanager
def generators_untouched() -> Iterator[None]:
    """Run the body without moving any generator a run draws from: this process's states
    are captured on entry and put back on exit. Observers (evaluation, memory probes) run
    inside it, so what they draw (a DataLoader iterator draws its base seed from torch's
    generator) never changes training, however much or little they evaluate, and a probe
    that only rank 0 runs leaves the ranks' generators in step."""
    states = local_rng_states()
    try:
        yield
    finally:
        restore_rng_states(states)
