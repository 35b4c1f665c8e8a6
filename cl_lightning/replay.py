"""Preallocated tensor replay buffer for continual learning.

Contents are stored on ``device``, the training device. Index bookkeeping stays on the CPU: slot
choice, priorities, class tables and the ``torch.Generator``. That makes the RNG state the same
on every device, so checkpoints can move between devices, and sampling costs no device syncs
beyond one small index transfer. ``add`` syncs once if ``admit`` or, for the class-balanced
policy, the labels live on the device.

On the CPU, reads and writes go through NumPy views of the storage. They are single-threaded and
cost about half as much per call as torch indexing. Torch's ``index_select`` can also stall for
milliseconds on OpenMP threads when other processes hold the cores. On other devices, and for
dtypes NumPy lacks (bfloat16), torch indexing is used.

Cost per call:

- ``add``: O(B), with no Python loop, for ``reservoir`` and ``fifo``. ``class_balanced`` loops
  over the batch and scans the stored labels, O(B * capacity). Items with the stored keys,
  dtypes, shapes and device skip most validation, and a full reservoir buffer without an
  ``admit`` mask takes a shortcut with fewer calls. Both give the same result, draw for draw,
  as the general path (``ReplayBuffer._fast_paths = False``).
- uniform ``sample``: ``randperm`` below 2048 stored items, O(n log n) above.
- prioritized ``sample``: O(capacity).

Under ``torch.distributed`` each rank holds one shard: its own :class:`ReplayBuffer`, built by
the caller with ``capacity = total_capacity // world_size`` and, ideally, ``seed = base + rank``.
``state_dict()`` then gathers all shards and returns the **merged** buffer, the same on every
rank. ``load_state_dict()`` takes back this rank's part: with the same number of ranks, exactly
the shard it saved (contents, counters and generator: an exact resume); with another number,
a round-robin share. :func:`merge_shards` and :func:`split_state` do the conversion as pure
functions on state dicts. They live in :mod:`cl_lightning.replay_shards`, with the layout of a
state (:class:`~cl_lightning.replay_shards.BufferState`), and can be imported from here too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, get_type_hints

import numpy as np
import torch
from torch import Tensor

from cl_lightning.checks import OptionError
from cl_lightning.distributed import gather_objects, world_and_rank
from cl_lightning.replay_policies import (
    annealed_beta,
    as_range,
    class_balanced_slots,
    drop_overwritten,
    fifo_slots,
    importance_weights,
    last_writer_rows,
    num_fill,
    priority_from_loss,
    reservoir_slots,
    uniform_indices,
)
from cl_lightning.replay_shards import STATE_FORMAT, BufferState, merge_shards, split_state

__all__ = ["BufferConfig", "ReplayBuffer", "merge_shards", "split_state"]

POLICIES = ("reservoir", "fifo", "class_balanced")
SAMPLINGS = ("uniform", "prioritized")
RESERVED_KEYS = ("index", "weight")
_EMPTY_DRAWS = np.empty(0, dtype=np.float64)


@dataclass(frozen=True)
class BufferConfig:
    """The options of a :class:`ReplayBuffer`: every constructor argument except ``device``,
    with the meaning documented there. A buffer's checkpoint state records them as
    ``config`` (:meth:`to_dict`).

    Raises:
        OptionError: An unknown ``policy`` or ``sampling``, ``capacity < 1`` or
            ``beta_steps < 0``.
    """

    capacity: int
    policy: str
    sampling: str
    alpha: float
    beta: float
    beta_final: float
    beta_steps: int
    eps: float
    seed: int
    label_key: str

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise OptionError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.sampling not in SAMPLINGS:
            raise OptionError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if int(self.capacity) < 1:
            raise OptionError(f"capacity must be >= 1, got {self.capacity}")
        if int(self.beta_steps) < 0:
            raise OptionError(f"beta_steps must be >= 0, got {self.beta_steps}")
        for name, kind in _OPTION_TYPES.items():  # e.g. a float capacity becomes an int
            object.__setattr__(self, name, kind(getattr(self, name)))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> BufferConfig:
        """The options in ``config`` (a :meth:`to_dict` result); other keys are ignored."""
        return cls(**{field.name: config[field.name] for field in fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        """``{option: value}``, in the order of the constructor arguments."""
        return asdict(self)


_OPTION_TYPES: dict[str, type] = get_type_hints(BufferConfig)


class ReplayBuffer:
    """Fixed-capacity replay memory of dict-of-tensor items.

    Args:
        capacity: Maximum number of stored items on this rank.
        policy: How new items are placed:

            - ``"reservoir"``: Vitter's algorithm R, vectorised over the batch. Each of the
              ``n`` admitted items so far is held with probability ``capacity / n``.
            - ``"fifo"``: ring buffer; the oldest item is overwritten first.
            - ``"class_balanced"``: class-balanced reservoir sampling. See
              :func:`cl_lightning.replay_policies.class_balanced_slots` for the exact rule. Class
              counts stay within one of each other whenever the stream allows.
        sampling: ``"uniform"`` (without replacement) or ``"prioritized"`` (Schaul et al. 2016,
            with replacement). Prioritized sampling costs O(capacity) per call.
        alpha: Priority exponent, ``p_i = (|loss_i| + eps) ** alpha``.
        beta: Initial importance-sampling exponent.
        beta_final: ``beta`` after annealing.
        beta_steps: Number of ``sample()`` calls over which beta goes linearly from ``beta`` to
            ``beta_final``. ``0`` keeps it constant.
        eps: Priority offset, so no item has zero probability.
        device: Where the contents live.
        seed: Seed of the buffer's own CPU ``torch.Generator``. It drives every random choice.
        label_key: Item key that holds the class label. Only the class-balanced policy uses it.

    Storage is allocated on the first :meth:`add`. Every key of that dict gets a
    ``(capacity, *shape)`` tensor with that key's dtype. Later adds must use the same keys and
    per-item shapes.
    """

    # False sends every add through the general path: full validation (``_check_items``) and
    # the policy functions of :mod:`~cl_lightning.replay_policies`. Tests compare the two.
    _fast_paths: bool = True

    def __init__(
        self,
        capacity: int = 10000,
        policy: str = "reservoir",
        sampling: str = "uniform",
        alpha: float = 0.6,
        beta: float = 0.4,
        beta_final: float = 1.0,
        beta_steps: int = 0,
        eps: float = 1e-6,
        device: str | torch.device = "cpu",
        seed: int = 0,
        label_key: str = "y",
    ) -> None:
        self.device = _resolve_device(device)
        self._configure(
            BufferConfig(
                capacity=capacity,
                policy=policy,
                sampling=sampling,
                alpha=alpha,
                beta=beta,
                beta_final=beta_final,
                beta_steps=beta_steps,
                eps=eps,
                seed=seed,
                label_key=label_key,
            )
        )
        self._generator = torch.Generator().manual_seed(self.seed)
        self._reset()

    # -----------------------------------------------------------------------------------------
    # configuration and bookkeeping
    # -----------------------------------------------------------------------------------------
    def _configure(self, config: BufferConfig) -> None:
        """Make every option an attribute of the same name (``self.capacity``, ...)."""
        for name, value in config.to_dict().items():
            setattr(self, name, value)

    def config(self) -> dict[str, Any]:
        """The constructor arguments, except ``device`` (:meth:`BufferConfig.to_dict`)."""
        return {field.name: getattr(self, field.name) for field in fields(BufferConfig)}

    def _reset(self) -> None:
        self._data: dict[str, Tensor] | None = None
        self._size = 0
        self.num_seen = 0
        self._fifo_ptr = 0
        self._sample_calls = 0
        self._max_priority = 1.0
        # priorities are float64 on the CPU; multinomial reads them through torch.from_numpy
        self._priority = np.zeros(self.capacity) if self._prioritized else None
        self._item_spec: dict[str, tuple[torch.Size, torch.dtype]] = {}
        # (key, per-item shape, dtype, ndim with the batch dim): what _matching_batch accepts
        self._fast_spec: tuple[tuple[str, torch.Size, torch.dtype, int], ...] = ()
        self._numpy_views: dict[str, np.ndarray] = {}  # CPU stores that NumPy can write to
        # (key, NumPy view or None, store) in storage order: how _write and sample reach a key
        self._access: tuple[tuple[str, np.ndarray | None, Tensor], ...] = ()
        self._numpy_stores = False  # every store has a NumPy view
        self._on_cpu = self.device.type == "cpu"
        self._reservoir_fast_path = self._fast_paths and self.policy == "reservoir"
        self._stored_labels = np.zeros(self.capacity, dtype=np.int64)
        self._class_count = np.zeros(0, dtype=np.int64)
        self._class_seen = np.zeros(0, dtype=np.int64)

    @property
    def _prioritized(self) -> bool:
        return self.sampling == "prioritized"

    def __len__(self) -> int:
        return self._size

    @property
    def is_empty(self) -> bool:
        return self._size == 0

    @property
    def keys(self) -> tuple[str, ...]:
        """Stored item keys (empty before the first :meth:`add`)."""
        return tuple(self._data) if self._data is not None else ()

    def contents(self) -> dict[str, Tensor]:
        """Read-only views of the stored items (no copy, no random draw), plus
        ``"priority"`` ((size,) float64) when prioritized. Empty dict before the first add."""
        if self._data is None:
            return {}
        out = {key: store[: self._size] for key, store in self._data.items()}
        if self._priority is not None:
            out["priority"] = torch.from_numpy(self._priority[: self._size])
        return out

    @property
    def current_beta(self) -> float:
        """The beta the next :meth:`sample` call will use."""
        return annealed_beta(self.beta, self.beta_final, self.beta_steps, self._sample_calls)

    @property
    def class_counts(self) -> dict[int, int]:
        """Stored items per class (class-balanced policy only; empty otherwise)."""
        return {c: int(n) for c, n in enumerate(self._class_count) if n > 0}

    def __repr__(self) -> str:
        return (
            f"ReplayBuffer(len={self._size}, capacity={self.capacity}, policy={self.policy!r}, "
            f"sampling={self.sampling!r}, num_seen={self.num_seen}, device={self.device})"
        )

    # -----------------------------------------------------------------------------------------
    # add
    # -----------------------------------------------------------------------------------------
    def add(self, items: Mapping[str, Tensor], admit: Tensor | None = None) -> Tensor:
        """Offer a batch to the buffer.

        Args:
            items: ``{key: (B, *shape)}`` tensors, e.g. ``x (B, C, H, W)``, ``y (B,)``,
                ``task (B,)``. The tensors are detached and copied.
            admit: Optional ``(B,)`` bool mask. Only admitted items are offered to the policy
                and counted in :attr:`num_seen` (ESMER admits low-loss samples only).

        Returns:
            ``(B,)`` int64 on ``device``: the slot each item was written to, or ``-1`` if it
            was not admitted, was rejected by the policy, or was overwritten by a later item
            of the same batch.
        """
        batch = self._matching_batch(items)
        if batch < 0:  # first add, or items that need a detach, move, cast or an error
            items, batch = self._check_items(items)
        elif admit is None and self._size >= self.capacity and self._reservoir_fast_path:
            return self._add_to_full_reservoir(items, batch)
        admitted = None if admit is None else self._admitted_positions(admit, batch)
        count = batch if admitted is None else admitted.size
        if self._data is None:
            self._allocate(items)
        if count == 0:
            return self._to_device(torch.full((batch,), -1, dtype=torch.int64))
        slots = self._assign_slots(items, admitted, count)
        # positions among the admitted items; slots becomes -1 wherever nothing is written
        rows = drop_overwritten(slots)
        dst = slots[rows]
        if admitted is None:
            result = slots
        else:
            rows = admitted[rows]  # positions in the batch
            result = np.full(batch, -1, dtype=np.int64)
            result[admitted] = slots
        self._write(items, batch, rows, dst)
        self.num_seen += count
        return self._to_device(torch.from_numpy(result))

    def _add_to_full_reservoir(self, items: Mapping[str, Tensor], batch: int) -> Tensor:
        """:meth:`add` for the usual case in training: reservoir policy, full buffer, no
        ``admit`` mask, items that :meth:`_matching_batch` accepted.

        The same draws, slots, writes and result as the general path (see
        :func:`~cl_lightning.replay_policies.reservoir_slots` with no fill phase), with fewer
        calls: the slot arithmetic runs in place on the draws, the stores are not touched
        unless an item is admitted, which late in a stream is rare, and admitted rows are
        copied straight into the NumPy views of CPU stores.
        """
        seen = self.num_seen
        draws = torch.rand(batch, dtype=torch.float64, generator=self._generator).numpy()
        draws *= np.arange(seen + 1, seen + batch + 1)  # j_i = floor(u_i * (n_i + 1))
        slots = draws.astype(np.int64)
        slots[slots >= self.capacity] = -1
        rows = drop_overwritten(slots)
        if rows.size and not self._numpy_stores:
            self._write(items, batch, rows, slots[rows])
        elif rows.size == 1:  # the usual admission late in a stream: plain row copies
            row = int(rows[0])
            slot = int(slots[row])
            for key, view, _ in self._access:
                view[slot] = items[key].numpy()[row]
            if self._priority is not None:
                self._priority[slot] = self._max_priority
        elif rows.size:
            dst = slots[rows]
            for key, view, _ in self._access:
                view[dst] = items[key].numpy()[rows]
            if self._priority is not None:
                self._priority[dst] = self._max_priority
        self.num_seen = seen + batch
        return self._to_device(torch.from_numpy(slots))

    def _to_device(self, value: Tensor) -> Tensor:
        return value if self._on_cpu else value.to(self.device)

    def _matching_batch(self, items: Mapping[str, Tensor]) -> int:
        """The batch size if ``items`` can be stored as it is, else ``-1``.

        "As it is" means: storage exists, ``items`` is a plain ``dict`` with exactly the
        stored keys, and every value is a plain tensor on ``device`` with the stored dtype and
        per-item shape, no grad, and one common non-zero batch size. That is every add of a
        training loop after the first; it costs a few attribute reads per key. Anything else
        returns ``-1`` and goes through :meth:`_check_items`, which detaches, moves, casts or
        raises, so both give the same result for every input they both accept.
        """
        spec = self._fast_spec
        if not spec or type(items) is not dict or len(items) != len(spec):
            return -1
        device = self.device
        batch = -1
        for key, shape, dtype, ndim in spec:
            value = items.get(key)
            if (
                type(value) is not Tensor
                or value.dtype is not dtype
                or value.requires_grad
                or value.device != device
            ):
                return -1
            size = value.shape
            if len(size) != ndim or size[1:] != shape:
                return -1
            if size[0] != batch:
                if batch >= 0:
                    return -1
                batch = size[0]
        return batch if batch > 0 else -1

    def _check_items(self, items: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int]:
        """Validate keys, batch size, shapes and dtypes; return detached items on ``device``."""
        if not items:
            raise ValueError("ReplayBuffer.add: items must be a non-empty dict of tensors")
        if self._item_spec and items.keys() != self._item_spec.keys():
            missing = sorted(set(self._item_spec) - set(items))
            extra = sorted(set(items) - set(self._item_spec))
            raise KeyError(
                f"ReplayBuffer.add: keys differ from the first add: missing {missing}, "
                f"unexpected {extra}"
            )
        batch = -1
        checked = {}
        for key, value in items.items():
            value = self._check_value(key, value)
            if batch < 0:
                batch = value.shape[0]
            elif value.shape[0] != batch:
                raise ValueError(
                    f"ReplayBuffer.add: item '{key}' has batch size {value.shape[0]}, "
                    f"expected {batch}"
                )
            checked[key] = value
        return checked, batch

    def _check_value(self, key: str, value: Tensor) -> Tensor:
        if not isinstance(value, Tensor) or not value.shape:
            raise TypeError(f"ReplayBuffer.add: item '{key}' must be a tensor with a batch dim")
        if value.requires_grad:
            value = value.detach()
        if value.device != self.device:
            value = value.to(self.device)
        if not self._item_spec:
            if key in RESERVED_KEYS:
                raise KeyError(f"ReplayBuffer.add: key '{key}' is reserved for sample() output")
            return value
        shape, dtype = self._item_spec[key]
        if value.shape[1:] != shape:
            raise ValueError(
                f"ReplayBuffer.add: item '{key}' has per-item shape {tuple(value.shape[1:])}, "
                f"the buffer stores {tuple(shape)}"
            )
        if value.dtype != dtype:
            if not (value.dtype.is_floating_point and dtype.is_floating_point):
                raise TypeError(
                    f"ReplayBuffer.add: item '{key}' has dtype {value.dtype}, "
                    f"the buffer stores {dtype}"
                )
            value = value.to(dtype)
        return value

    def _admitted_positions(self, admit: Tensor | None, batch: int) -> np.ndarray | None:
        """``(k,)`` int64 batch positions of admitted items; ``None`` means all of them."""
        if admit is None:
            return None
        mask = admit.detach().to("cpu", torch.bool).reshape(-1)
        if mask.numel() != batch:
            raise ValueError(f"ReplayBuffer.add: admit has {mask.numel()} entries, batch {batch}")
        return np.flatnonzero(mask.numpy())

    def _allocate(self, items: Mapping[str, Tensor]) -> None:
        if self.policy == "class_balanced":
            self._check_labels(items)
        self._item_spec = {key: (value.shape[1:], value.dtype) for key, value in items.items()}
        self._data = {
            key: torch.zeros((self.capacity, *shape), dtype=dtype, device=self.device)
            for key, (shape, dtype) in self._item_spec.items()
        }
        self._numpy_views = {
            key: store.numpy() for key, store in self._data.items() if _numpy_writable(store)
        }
        if self._fast_paths:
            self._fast_spec = tuple(
                (key, shape, dtype, len(shape) + 1)
                for key, (shape, dtype) in self._item_spec.items()
            )
        self._access = tuple(
            (key, self._numpy_views.get(key), store) for key, store in self._data.items()
        )
        self._numpy_stores = len(self._numpy_views) == len(self._data)

    def _check_labels(self, items: Mapping[str, Tensor]) -> None:
        labels = items.get(self.label_key)
        if labels is None:
            raise KeyError(
                f"ReplayBuffer: class_balanced policy needs label key '{self.label_key}' in items"
            )
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(
                f"ReplayBuffer: label '{self.label_key}' must be a (B,) integer tensor, got "
                f"shape {tuple(labels.shape)} dtype {labels.dtype}"
            )

    def _assign_slots(
        self, items: Mapping[str, Tensor], admitted: np.ndarray | None, count: int
    ) -> np.ndarray:
        """Run the placement policy; updates size, pointer and class tables."""
        if self.policy == "reservoir":
            n_draws = count - num_fill(self._size, self.capacity, count)
            draws = self._uniforms(n_draws)
            slots = reservoir_slots(self.num_seen, self._size, self.capacity, count, draws)
        elif self.policy == "fifo":
            slots = fifo_slots(self._fifo_ptr, self.capacity, count)
            self._fifo_ptr = (self._fifo_ptr + count) % self.capacity
        else:
            slots = self._class_balanced_slots(items[self.label_key], admitted, count)
        self._size = min(self.capacity, self._size + count)
        return slots

    def _uniforms(self, *shape: int) -> np.ndarray:
        """Float64 uniforms from the buffer's generator; no draw at all if the shape is empty."""
        if math.prod(shape) == 0:
            return _EMPTY_DRAWS.reshape(shape)
        return torch.rand(shape, dtype=torch.float64, generator=self._generator).numpy()

    def _class_balanced_slots(
        self, labels: Tensor, admitted: np.ndarray | None, count: int
    ) -> np.ndarray:
        labels_np = labels.to("cpu", torch.int64).numpy()
        if admitted is not None:
            labels_np = labels_np[admitted]
        if labels_np.size and labels_np.min() < 0:
            raise ValueError(f"ReplayBuffer: class labels must be >= 0, got {labels_np.min()}")
        self._grow_class_tables(int(labels_np.max()) + 1)
        draws = self._uniforms(count - num_fill(self._size, self.capacity, count), 3)
        return class_balanced_slots(
            labels_np,
            self._size,
            self.capacity,
            self._stored_labels,
            self._class_count,
            self._class_seen,
            draws,
        )

    def _grow_class_tables(self, num_classes: int) -> None:
        if num_classes > self._class_count.size:
            grow = num_classes - self._class_count.size
            self._class_count = np.concatenate([self._class_count, np.zeros(grow, np.int64)])
            self._class_seen = np.concatenate([self._class_seen, np.zeros(grow, np.int64)])

    def _write(
        self, items: Mapping[str, Tensor], batch: int, rows: np.ndarray, dst: np.ndarray
    ) -> None:
        """Copy batch rows ``rows`` to slots ``dst`` (both ``(k,)``); new items get the running
        max priority."""
        if rows.size == 0:
            return
        src = None if rows.size == batch else rows
        dst_range = as_range(dst)
        target = dst if dst_range is None else slice(*dst_range)
        torch_src = torch_dst = None
        for key, view, store in self._access:
            if view is not None:  # CPU: NumPy indexing costs about half of torch's per call
                value = items[key].numpy()
                view[target] = value if src is None else value[src]
                continue
            if torch_dst is None:
                torch_src = None if src is None else self._to_device(torch.from_numpy(src))
                torch_dst = self._to_device(torch.from_numpy(dst))
            value = items[key] if torch_src is None else items[key].index_select(0, torch_src)
            store.index_copy_(0, torch_dst, value)
        if self._priority is not None:
            self._priority[target] = self._max_priority

    # -----------------------------------------------------------------------------------------
    # sample / priorities
    # -----------------------------------------------------------------------------------------
    def sample(self, n: int) -> dict[str, Tensor]:
        """Draw a batch of stored items.

        Uniform sampling returns ``min(n, len(self))`` distinct items. Prioritized sampling
        returns ``n`` items drawn with replacement, with ``P(i) = p_i / sum_k p_k``.

        Returns:
            Every stored key as ``(k, *shape)`` on ``device``, plus ``"index"`` ``(k,)`` int64
            slot ids (for :meth:`update_priorities`). Prioritized sampling also returns
            ``"weight"`` ``(k,)`` float32 importance weights
            ``w_i = (N * P(i)) ** -beta / max_j w_j``. Here ``N = len(self)``, the max runs over
            the sampled batch, and beta is :attr:`current_beta`, annealed per ``sample()``
            call.
        """
        if self._data is None or self._size == 0:
            raise RuntimeError("ReplayBuffer.sample: the buffer is empty")
        if n < 0:
            raise ValueError(f"ReplayBuffer.sample: n must be >= 0, got {n}")
        weight = None
        if self._prioritized:
            index_np, weight = self._sample_prioritized(n)
        else:
            index_np = uniform_indices(self._size, n, self._generator)
        self._sample_calls += 1
        index = torch.from_numpy(index_np)
        if not self._on_cpu:
            index = index.to(self.device)
        # rows ``index`` of every store. On the CPU NumPy's ``take`` does it single-threaded:
        # torch's ``index_select`` splits large gathers over OpenMP threads and can stall for
        # milliseconds when other processes hold the cores.
        batch = {
            key: store.index_select(0, index)
            if view is None
            else torch.from_numpy(view.take(index_np, axis=0))
            for key, view, store in self._access
        }
        batch["index"] = index
        if weight is not None:
            batch["weight"] = self._to_device(torch.from_numpy(weight.astype(np.float32)))
        return batch

    def _sample_prioritized(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(n,)`` slots drawn with replacement, ``P(i) = p_i / sum p``, and their weights."""
        assert self._priority is not None
        priority = self._priority[: self._size]
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        drawn = torch.multinomial(
            torch.from_numpy(priority), n, replacement=True, generator=self._generator
        )
        index = drawn.numpy()
        weight = importance_weights(priority[index], priority.sum(), self._size, self.current_beta)
        return index, weight

    def update_priorities(self, index: Tensor, loss: Tensor) -> None:
        """Set ``p_i = (|loss_i| + eps) ** alpha`` for the given slots.

        Args:
            index: ``(k,)`` slot ids, as returned in ``sample()["index"]``. If a slot appears
                more than once, its last loss wins.
            loss: ``(k,)`` per-item losses.

        Does nothing for uniform sampling. A slot that was overwritten since it was sampled
        gets the new loss anyway, as in the reference PER implementations. The running max
        priority given to new items (start 1.0) grows to the largest priority ever set.
        """
        if not self._prioritized:
            return
        assert self._priority is not None
        index_np = index.detach().to("cpu", torch.int64).reshape(-1).numpy()
        loss_np = loss.detach().to("cpu", torch.float64).reshape(-1).numpy()
        if index_np.size != loss_np.size:
            raise ValueError(
                f"update_priorities: {index_np.size} indices but {loss_np.size} losses"
            )
        if index_np.size == 0:
            return
        if index_np.min() < 0 or index_np.max() >= self._size:
            raise IndexError(f"update_priorities: index out of range [0, {self._size})")
        keep = last_writer_rows(index_np)
        priority = priority_from_loss(loss_np[keep], self.alpha, self.eps)
        self._priority[index_np[keep]] = priority
        self._max_priority = max(self._max_priority, float(priority.max()))

    # -----------------------------------------------------------------------------------------
    # checkpointing
    # -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: config, filled contents (CPU), counters, priorities,
        class tables and generator state.

        Under an initialised ``torch.distributed`` with ``world_size > 1``, every rank must call
        this. It gathers all shards (``all_gather_object``; with NCCL the current CUDA device
        must be set) and returns the merged buffer with ``"shards": world_size`` on every rank.
        """
        local = self._local_state()
        if world_and_rank()[0] == 1:
            return local
        return merge_shards(gather_objects(local))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`. The buffer takes the saved config but keeps its
        ``device``.

        A merged state, from DDP or :func:`merge_shards`, is split round-robin across the
        current world and this rank keeps ``split_state(state, world_size)[rank]``. A shard
        never drops items: if its part holds more items than ``capacity // world_size``, its
        capacity grows to fit. If the shard count changed, shards get a deterministic reseed in
        place of the saved generator states.
        """
        world_size, rank = world_and_rank()
        if world_size > 1 or int(state.get("shards", 1)) > 1:
            state = split_state(state, world_size)[rank]
        self._load_local(state)

    def _local_state(self) -> dict[str, Any]:
        """This rank's own state (no gather), as a plain dict."""
        size = self._size
        data = None
        if self._data is not None:
            data = {
                key: store[:size].detach().to("cpu", copy=True) for key, store in self._data.items()
            }
        return BufferState(
            config=self.config(),
            size=size,
            num_seen=self.num_seen,
            fifo_ptr=self._fifo_ptr,
            sample_calls=self._sample_calls,
            max_priority=self._max_priority,
            data=data,
            priority=None if self._priority is None else torch.tensor(self._priority[:size]),
            class_seen=torch.from_numpy(self._class_seen.copy()),
            generator_state=self._generator.get_state(),
        ).to_dict()

    def _load_local(self, state: Mapping[str, Any]) -> None:
        if int(state.get("format", STATE_FORMAT)) != STATE_FORMAT:
            raise ValueError(f"ReplayBuffer: unsupported state format {state.get('format')}")
        saved = BufferState.from_dict(state)
        size = saved.size
        # a re-split shard may hold more than its share of the capacity: grow to fit
        capacity = max(int(saved.config["capacity"]), size)
        self._configure(BufferConfig.from_dict(dict(saved.config, capacity=capacity)))
        self._reset()
        self._restore_generator(saved)
        self._size = size
        self.num_seen = saved.num_seen
        self._fifo_ptr = saved.fifo_ptr
        self._sample_calls = saved.sample_calls
        self._max_priority = saved.max_priority
        if saved.data is not None:
            self._allocate(saved.data)
            assert self._data is not None
            for key, value in saved.data.items():
                self._data[key][:size].copy_(value)
        if self._priority is not None and saved.priority is not None:
            self._priority[:size] = saved.priority.to(torch.float64).numpy()
        self._restore_class_tables(saved)

    def _restore_generator(self, state: BufferState) -> None:
        if state.generator_state is not None:
            self._generator.set_state(state.generator_state.clone())
            return
        seed = state.generator_seed
        if seed is None:
            seed = self.seed
            warnings.warn("ReplayBuffer: state has no generator state; reseeding", stacklevel=3)
        self._generator.manual_seed(int(seed))

    def _restore_class_tables(self, state: BufferState) -> None:
        seen = state.class_seen.to(torch.int64).numpy()
        if self.policy == "class_balanced" and self._data is not None and self._size:
            labels = self._data[self.label_key][: self._size].to("cpu", torch.int64).numpy()
            self._stored_labels[: self._size] = labels
            num_classes = max(int(labels.max()) + 1, seen.size)
            self._class_count = np.bincount(labels, minlength=num_classes).astype(np.int64)
        else:
            num_classes = seen.size
            self._class_count = np.zeros(num_classes, dtype=np.int64)
        self._class_seen = np.zeros(num_classes, dtype=np.int64)
        self._class_seen[: seen.size] = seen


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _numpy_writable(store: Tensor) -> bool:
    """Whether ``store.numpy()`` is a view NumPy can index (CPU, not bfloat16/complex/...)."""
    if store.device.type != "cpu" or store.dtype.is_complex:
        return False
    try:
        store.numpy()
    except TypeError:
        return False
    return True


def _resolve_device(device: str | torch.device) -> torch.device:
    """``cuda`` becomes ``cuda:<current>`` so device comparisons in :meth:`add` are exact."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
