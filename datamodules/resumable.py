"""The training loader whose position inside an epoch is part of the checkpoint.

Lightning stores ``state_dict()`` of every training loader that has one in each checkpoint
(``loops.fit_loop.state_dict.combined_loader``) and calls ``load_state_dict()`` before it
iterates a restarted epoch. :class:`ResumableLoader` records how many batches of its epoch
it has handed out and, after a load, skips that many index batches (without loading their
data), so a run stopped in the middle of an epoch continues with exactly the batches the
interrupted run would have trained on next.

That is exact only if the epoch's order is a function of the checkpointed state alone: the
stream gives the loader a :class:`~torch.utils.data.DistributedSampler` (also with one
process) whose permutation depends only on ``(shuffle_seed, epoch)``, and a DataLoader
generator of its own, so creating an iterator draws nothing from torch's global RNG.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

__all__ = ["ResumableLoader"]


class _SkipFirst:
    """An index (batch) sampler without its first ``skip`` items; the length stays the
    full epoch's (Lightning counts the skipped batches as already done)."""

    def __init__(self, base: Any, skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return len(self.base)


class _Counting:
    """Iterator wrapper that counts the batches handed to the training loop."""

    def __init__(self, iterator: Iterator[Any], loader: ResumableLoader) -> None:
        self.iterator, self.loader = iterator, loader

    def __iter__(self) -> _Counting:
        return self

    def __next__(self) -> Any:
        batch = next(self.iterator)
        self.loader.position += 1
        return batch


class ResumableLoader(DataLoader):
    """A ``DataLoader`` for one training epoch that can resume in the middle of it.

    Args:
        *args, **kwargs: ``DataLoader`` arguments.
        epoch: the training epoch this loader serves (a saved position applies only to the
            same epoch; a checkpoint from an epoch end restarts the next epoch at 0).
    """

    def __init__(self, *args: Any, epoch: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch = epoch
        self.position = 0  # batches of this epoch handed out so far
        self._skip = 0  # batches the next iterator skips (set by load_state_dict)
        self._skip_now = 0

    @property
    def _index_sampler(self) -> Any:
        base = super()._index_sampler
        return _SkipFirst(base, self._skip_now) if self._skip_now else base

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._skip_now, self._skip = self._skip, 0
        try:
            iterator = super().__iter__()  # reads _index_sampler while it is built
        finally:
            skipped, self._skip_now = self._skip_now, 0
        self.position = skipped
        return _Counting(iterator, self)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "length": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        position = int(state.get("position", 0))
        if int(state.get("epoch", -1)) != self.epoch or not 0 < position < len(self):
            return  # another epoch (an epoch-end checkpoint), or nothing to skip
        self._skip = position
