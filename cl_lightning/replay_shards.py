"""A :class:`~cl_lightning.replay.ReplayBuffer`'s checkpoint state, and its shards under DDP.

Under ``torch.distributed`` each rank holds one shard: its own ``ReplayBuffer``.
``ReplayBuffer.state_dict()`` gathers every rank's shard and returns them merged into one
buffer state (:func:`merge_shards`), the same on every rank. ``ReplayBuffer.load_state_dict()``
takes back this rank's part (:func:`split_state`): with the same number of ranks, exactly the
shard it saved (contents, counters and generator: an exact resume); with another number, a
round-robin share.

Both functions are pure and work on state dicts: plain dicts of tensors, numbers and strings,
which is what a checkpoint holds and what ``torch.load(weights_only=True)`` reads back.
:class:`BufferState` is the same record with named fields; ``BufferState.from_dict`` and
``BufferState.to_dict`` convert between the two.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

__all__ = ["BufferState", "merge_shards", "split_state"]

STATE_FORMAT = 1

SHARD_OPTIONS = ("capacity", "seed")
"""The buffer options that may differ between the shards of one buffer; the rest must match."""

SHARD_COUNTERS = ("size", "num_seen", "fifo_ptr", "sample_calls", "max_priority", "class_seen")
"""The per-shard counters a merged state keeps in ``shard_meta``, next to ``SHARD_OPTIONS``."""

_MERGED_ONLY = ("generator_states", "shard_meta")


@dataclass(kw_only=True)
class BufferState:
    """The state of one buffer, one shard or several merged shards.

    Fields:
        format: Version of this layout (``STATE_FORMAT``).
        config: The buffer's options, as ``BufferConfig.to_dict()`` gives them: every
            constructor argument of ``ReplayBuffer`` except ``device``.
        size: Number of stored items.
        num_seen: Number of items ever admitted.
        fifo_ptr: Next slot the FIFO policy writes.
        sample_calls: Number of ``sample()`` calls so far (the beta-annealing clock).
        max_priority: Priority given to new items.
        data: The stored items, ``{key: (size, *shape)}`` CPU tensors; ``None`` before the
            first add.
        priority: ``(size,)`` priorities under prioritized sampling, else ``None``.
        class_seen: ``(num_classes,)`` items admitted per class (class-balanced policy).
        generator_state: State of the buffer's ``torch.Generator``; ``None`` where
            ``generator_seed`` (or, without one, the configured seed) seeds it afresh.
        generator_seed: Seed for a fresh generator, as a shard re-split for another number
            of ranks gets it.
        shards: Number of shards merged into this state (1: a single buffer or shard).
        generator_states: Merged states only: every shard's generator state, in rank order.
        shard_meta: Merged states only: every shard's ``SHARD_OPTIONS`` and
            ``SHARD_COUNTERS``, so :func:`split_state` can give each rank back exactly its
            shard.

    :meth:`to_dict` leaves the two merged-only keys out when they are ``None``.
    """

    format: int = STATE_FORMAT
    config: dict[str, Any]
    size: int
    num_seen: int
    fifo_ptr: int
    sample_calls: int
    max_priority: float
    data: dict[str, Tensor] | None
    priority: Tensor | None
    class_seen: Tensor
    generator_state: Tensor | None = None
    generator_states: list[Tensor] | None = None
    generator_seed: int | None = None
    shards: int = 1
    shard_meta: list[dict[str, Any]] | None = None

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> BufferState:
        """Read a state dict. Counters become ``int`` (``max_priority`` a ``float``); keys that
        only some states have take their defaults when missing. Tensors are not copied."""
        return cls(
            format=state.get("format", STATE_FORMAT),
            config=state["config"],
            size=int(state["size"]),
            num_seen=int(state["num_seen"]),
            fifo_ptr=int(state["fifo_ptr"]),
            sample_calls=int(state["sample_calls"]),
            max_priority=float(state["max_priority"]),
            data=state["data"],
            priority=state["priority"],
            class_seen=state["class_seen"],
            generator_state=state.get("generator_state"),
            generator_states=state.get("generator_states"),
            generator_seed=state.get("generator_seed"),
            shards=int(state.get("shards", 1)),
            shard_meta=state.get("shard_meta"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The plain state dict, keys in field order. Tensors are not copied."""
        state = {field.name: getattr(self, field.name) for field in fields(self)}
        for key in _MERGED_ONLY:
            if state[key] is None:
                del state[key]
        return state


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------
def merge_shards(states: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge per-rank buffer states into one buffer state.

    Contents and priorities are concatenated in shard order, each shard's FIFO contents oldest
    first. ``capacity``, ``size``, ``num_seen`` and per-class seen counts are summed.
    ``sample_calls``, the beta-annealing clock that every rank advances together, and
    ``max_priority`` take the max. Every shard's generator state is kept in
    ``"generator_states"``. ``"shards"`` records ``len(states)``.

    Raises:
        ValueError: No states, or shards whose options (other than ``SHARD_OPTIONS``) or
            stored keys differ.
    """
    if not states:
        raise ValueError("merge_shards: need at least one state")
    shards = [BufferState.from_dict(state) for state in states]
    _check_compatible(shards)
    parts = [_chronological(shard) for shard in shards]
    filled = [p.data for p in parts if p.data is not None]
    data = None
    if filled:
        data = {key: torch.cat([d[key] for d in filled]) for key in filled[0]}
    priority = None
    if parts[0].priority is not None:
        priority = torch.cat([p.priority for p in parts])
    capacity = sum(int(p.config["capacity"]) for p in parts)
    size = sum(p.size for p in parts)
    return BufferState(
        config=dict(parts[0].config, capacity=capacity),
        size=size,
        num_seen=sum(p.num_seen for p in parts),
        fifo_ptr=size % capacity,
        sample_calls=max(p.sample_calls for p in parts),
        max_priority=max(p.max_priority for p in parts),
        data=data,
        priority=priority,
        class_seen=_sum_padded([p.class_seen for p in parts]),
        generator_state=parts[0].generator_state,
        generator_states=[p.generator_state for p in parts],
        shards=len(parts),
        shard_meta=[_shard_meta(shard) for shard in shards],
    ).to_dict()


def _check_compatible(states: list[BufferState]) -> None:
    ref = _shared_options(states[0])
    for i, state in enumerate(states[1:], start=1):
        cfg = _shared_options(state)
        if cfg != ref:
            raise ValueError(f"merge_shards: shard {i} config {cfg} differs from shard 0 {ref}")
    keys = {tuple(s.data) for s in states if s.data is not None}
    if len(keys) > 1:
        raise ValueError(f"merge_shards: shards store different keys {sorted(keys)}")


def _shared_options(state: BufferState) -> dict[str, Any]:
    """The options every shard of one buffer must agree on."""
    return {k: v for k, v in state.config.items() if k not in SHARD_OPTIONS}


def _chronological(state: BufferState) -> BufferState:
    """``state``, with FIFO contents reordered oldest first (pointer at ``size``)."""
    size, ptr = state.size, state.fifo_ptr
    if state.config["policy"] != "fifo" or ptr == 0 or size < int(state.config["capacity"]):
        return state
    order = (ptr + torch.arange(size)) % size
    data = state.data
    if data is not None:
        data = {key: value[order] for key, value in data.items()}
    priority = None if state.priority is None else state.priority[order]
    return replace(state, data=data, priority=priority, fifo_ptr=0)


def _sum_padded(arrays: list[Tensor]) -> Tensor:
    length = max((a.numel() for a in arrays), default=0)
    total = torch.zeros(length, dtype=torch.int64)
    for a in arrays:
        total[: a.numel()] += a.to(torch.int64)
    return total


def _shard_meta(state: BufferState) -> dict[str, Any]:
    """What :func:`_original_shards` needs to restore this shard: its options in
    ``SHARD_OPTIONS`` (both ints) and its counters in ``SHARD_COUNTERS``."""
    meta: dict[str, Any] = {name: int(state.config[name]) for name in SHARD_OPTIONS}
    meta.update({name: getattr(state, name) for name in SHARD_COUNTERS})
    meta["class_seen"] = state.class_seen.clone()
    return meta


# ---------------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------------
def split_state(state: Mapping[str, Any], world_size: int) -> list[dict[str, Any]]:
    """Split a (merged) buffer state into ``world_size`` shard states.

    A state merged from ``world_size`` shards (the same number of ranks as when it was saved)
    splits back into exactly those shards: contents in their slots, counters, FIFO pointer,
    priorities and generator states, so a DDP resume continues as if never stopped.

    Otherwise items are dealt round-robin: item ``i`` goes to shard ``i % world_size``, so
    every item lands in exactly one shard. Each shard gets capacity
    ``max(capacity // world_size, ceil(size / world_size))``, so no item is ever dropped.
    ``num_seen`` and per-class seen counts are split so they sum to the original, with the
    remainder going to the lowest ranks. ``sample_calls`` and ``max_priority`` are copied. A
    shard gets its old generator state when the shard count is unchanged, otherwise a
    deterministic fresh seed. A single, unmerged state with ``world_size == 1`` comes back as
    is (exact resume).
    """
    if world_size < 1:
        raise ValueError(f"split_state: world_size must be >= 1, got {world_size}")
    if world_size == 1 and int(state.get("shards", 1)) == 1:
        return [dict(state)]
    merged = BufferState.from_dict(state)
    meta = merged.shard_meta
    if meta is not None and len(meta) == world_size == merged.shards:
        return _original_shards(merged, meta)
    merged = _chronological(merged)
    capacity = max(int(merged.config["capacity"]) // world_size, -(-merged.size // world_size), 1)
    return [_shard(merged, rank, world_size, capacity) for rank in range(world_size)]


def _original_shards(state: BufferState, meta: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Undo :func:`merge_shards` exactly (the shards were concatenated in order, each FIFO
    shard rotated oldest-first)."""
    assert state.generator_states is not None
    out, start = [], 0
    for rank, m in enumerate(meta):
        size, ptr = m["size"], m["fifo_ptr"]
        rows = torch.arange(start, start + size)
        start += size
        config = dict(state.config, **{name: m[name] for name in SHARD_OPTIONS})
        if config["policy"] == "fifo" and ptr != 0 and size >= m["capacity"]:
            rows = rows[(torch.arange(size) - ptr) % size]  # back to the saved slot order
        data = None
        if state.data is not None and size:
            data = {key: value[rows].clone() for key, value in state.data.items()}
        priority = None if state.priority is None else state.priority[rows].clone()
        counters = {name: m[name] for name in SHARD_COUNTERS}
        counters["class_seen"] = m["class_seen"].clone()
        shard = BufferState(
            config=config,
            data=data,
            priority=priority,
            generator_state=state.generator_states[rank],
            **counters,
        )
        out.append(shard.to_dict())
    return out


def _split_count(total: Tensor | int, rank: int, world_size: int) -> Any:
    """Share of ``total`` (int or int tensor) for ``rank``; shares sum to ``total``."""
    base, rem = total // world_size, total % world_size
    return base + (rem > rank) * 1


def _shard(state: BufferState, rank: int, world_size: int, capacity: int) -> dict[str, Any]:
    """Shard ``rank`` of a round-robin split of the chronological ``state``."""
    rows = torch.arange(rank, max(state.size, rank), world_size)  # none if rank >= size
    size = rows.numel()
    data = None
    if state.data is not None:
        data = {key: value[rows].clone() for key, value in state.data.items()}
    priority = None if state.priority is None else state.priority[rows].clone()
    generator_state, generator_seed = _shard_generator(state, rank, world_size)
    return BufferState(
        config=dict(state.config, capacity=capacity),
        size=size,
        num_seen=int(_split_count(state.num_seen, rank, world_size)),
        fifo_ptr=size % capacity,
        sample_calls=state.sample_calls,
        max_priority=state.max_priority,
        data=data,
        priority=priority,
        class_seen=_split_count(state.class_seen.to(torch.int64), rank, world_size),
        generator_state=generator_state,
        generator_seed=generator_seed,
    ).to_dict()


def _shard_generator(
    state: BufferState, rank: int, world_size: int
) -> tuple[Tensor | None, int | None]:
    per_shard = state.generator_states
    if per_shard is not None and len(per_shard) == world_size:
        return per_shard[rank], None
    if world_size == 1:
        return state.generator_state, None
    seed = int(state.config["seed"]) * 1_000_003 + rank * 7919 + state.num_seen
    return None, seed % (2**63)
