"""Pure slot-assignment, sampling and priority functions used by :class:`ReplayBuffer`.

Nothing here holds buffer state: each function receives counters and random draws and returns
index arrays, so tests can feed the same draws to a sequential reference and compare.

Index bookkeeping runs in NumPy on the CPU. The arrays are batch-sized (tens of entries), where
a NumPy call costs a fraction of a torch call; stored contents are never touched here.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)

# Uniform sampling switches from ``randperm`` (O(size)) to rejection of repeats (O(n log n))
# when the buffer is at least this large and at least ``_SPARSE_RATIO`` times the request.
SPARSE_SAMPLING_MIN_SIZE = 2048
_SPARSE_RATIO = 8


# ---------------------------------------------------------------------------------------------
# slot assignment
# ---------------------------------------------------------------------------------------------
def num_fill(size: int, capacity: int, count: int) -> int:
    """How many of ``count`` new items go to free slots (``size``, ``size + 1``, ...)."""
    return min(count, max(capacity - size, 0))


def reservoir_slots(
    num_seen: int, size: int, capacity: int, count: int, draws: np.ndarray
) -> np.ndarray:
    """Vitter's algorithm R for a batch of ``count`` admitted items, vectorised.

    Item ``i`` of the batch is item number ``n_i = num_seen + i`` (0-based) of the admitted stream.
    While there are free slots, items take them in order (slot ``size``, ``size + 1``, ...); in a
    buffer that was filled by this function ``size == min(num_seen, capacity)``, so that is
    exactly "slot ``n`` if ``n < capacity``". Every later item draws
    ``j_i = floor(u_i * (n_i + 1))``, uniform on ``[0, n_i]``, and goes to slot ``j_i`` iff
    ``j_i < capacity``.

    Args:
        draws: ``(count - num_fill(size, capacity, count),)`` float64 uniforms on ``[0, 1)``, one
            per item past the fill phase, in batch order (one ``torch.rand`` call per batch).

    Returns:
        ``(count,)`` int64 slot per item, ``-1`` for rejected items. Two items may name the same
        slot; :func:`last_writer_rows` resolves that the way the sequential algorithm does.
    """
    fill = num_fill(size, capacity, count)
    if fill == count:
        return np.arange(size, size + count, dtype=np.int64)
    # u <= 1 - 2**-53, so u * (n + 1) rounds to a value below n + 1 and truncation gives j <= n.
    j = (draws * np.arange(num_seen + fill + 1, num_seen + count + 1)).astype(np.int64)
    j[j >= capacity] = -1
    if fill == 0:
        return j
    return np.concatenate([np.arange(size, size + fill, dtype=np.int64), j])


def fifo_slots(pointer: int, capacity: int, count: int) -> np.ndarray:
    """Ring buffer: ``(count,)`` int64 slots ``pointer, pointer + 1, ...`` modulo ``capacity``."""
    return (pointer + np.arange(count, dtype=np.int64)) % capacity


def class_balanced_slots(
    labels: np.ndarray,
    size: int,
    capacity: int,
    stored: np.ndarray,
    counts: np.ndarray,
    seen: np.ndarray,
    draws: np.ndarray,
) -> np.ndarray:
    """Class-balanced reservoir sampling (CBRS, Chrysakis & Moens, ICML 2020) for one batch.

    Rule for each admitted item of class ``c``, in batch order:

    1. ``seen[c] += 1``.
    2. Buffer not full: the item takes the next free slot.
    3. Buffer full and ``counts[c] < max(counts)`` (``c`` is not a largest class): pick one of
       the largest classes uniformly at random (``draws[:, 0]``), then one of its stored items
       uniformly at random (``draws[:, 2]``), and replace it with the new item.
    4. Buffer full and ``c`` is a largest class: class-wise reservoir. With probability
       ``counts[c] / seen[c]`` (``draws[:, 1]``), replace a uniformly random stored item of
       class ``c`` (``draws[:, 2]``). Otherwise the item is rejected.

    Rule 3 moves one slot from a largest class to a smaller one, and rule 4 keeps the counts as
    they are. So once every class has had enough items, all class counts are within one of each
    other. A class that has had fewer items keeps every item it has had. Rule 4 makes each
    class's stored items a uniform sample of that class's stream.

    This is the only policy that loops over the batch (but not over samples or slots). Each
    decision depends on the counts left by the previous one, so it cannot be vectorised. A step
    also scans ``stored`` (O(capacity)) to find the slots of the victim class.

    Args:
        labels: ``(count,)`` int64 non-negative class labels of the admitted items.
        stored: ``(capacity,)`` int64 label held by each slot. Updated in place.
        counts: ``(num_classes,)`` int64 stored items per class. Updated in place.
        seen: ``(num_classes,)`` int64 admitted items per class so far. Updated in place.
        draws: ``(count - num_fill(size, capacity, count), 3)`` float64 uniforms on ``[0, 1)``.

    Returns:
        ``(count,)`` int64 slot per item, ``-1`` for rejected items.
    """
    count = labels.shape[0]
    fill = num_fill(size, capacity, count)
    slots = np.full(count, -1, dtype=np.int64)
    if fill:
        slots[:fill] = np.arange(size, size + fill)
        stored[size : size + fill] = labels[:fill]
        np.add.at(counts, labels[:fill], 1)
        np.add.at(seen, labels[:fill], 1)
    for i in range(fill, count):
        slots[i] = _class_balanced_step(int(labels[i]), draws[i - fill], stored, counts, seen)
    return slots


def _class_balanced_step(
    label: int, draw: np.ndarray, stored: np.ndarray, counts: np.ndarray, seen: np.ndarray
) -> int:
    """One CBRS decision for a full buffer; returns the slot taken or ``-1``."""
    seen[label] += 1
    largest = counts.max()
    if counts[label] < largest:
        candidates = np.flatnonzero(counts == largest)
        victim = int(candidates[_pick(draw[0], candidates.size)])
    elif draw[1] * seen[label] < counts[label]:
        victim = label
    else:
        return -1
    victim_slots = np.flatnonzero(stored == victim)
    slot = int(victim_slots[_pick(draw[2], victim_slots.size)])
    counts[victim] -= 1
    counts[label] += 1
    stored[slot] = label
    return slot


def _pick(u: float, n: int) -> int:
    """Map a uniform ``u`` on ``[0, 1)`` to an index on ``[0, n)``."""
    return min(int(u * n), n - 1)


def last_writer_rows(slots: np.ndarray) -> np.ndarray:
    """Ascending ``(k,)`` int64 positions ``i`` with ``slots[i] >= 0`` where no later item names
    the same slot.

    Batched writes keep only these items. That matches the sequential algorithm, where the later
    of two items sent to the same slot overwrites the earlier one.
    """
    rows = np.flatnonzero(slots >= 0)
    if rows.size < 2:
        return rows
    chosen = slots[rows]
    if len(set(chosen.tolist())) == rows.size:
        return rows
    _, first_in_reversed = np.unique(chosen[::-1], return_index=True)
    return np.sort(rows[rows.size - 1 - first_in_reversed])


def drop_overwritten(slots: np.ndarray) -> np.ndarray:
    """:func:`last_writer_rows` of ``slots``, which it also edits in place: every position
    not returned gets ``-1``.

    ``slots`` then says where each item ended up, the value ``ReplayBuffer.add`` returns, with
    no second array to fill. In the usual batch no two items name the same slot, and nothing is
    edited.
    """
    keep = last_writer_rows(slots)
    if keep.size and np.count_nonzero(slots >= 0) != keep.size:
        dropped = np.ones(slots.shape, dtype=bool)
        dropped[keep] = False
        slots[dropped] = -1
    return keep


def as_range(index: np.ndarray) -> tuple[int, int] | None:
    """``(start, stop)`` if ``index`` is ``start, start + 1, ..., stop - 1``, else ``None``."""
    if index.size == 0:
        return None
    start, stop = int(index[0]), int(index[-1]) + 1
    if stop - start != index.size:
        return None
    if index.size > 2 and not bool((np.diff(index) == 1).all()):
        return None
    return start, stop


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def uniform_indices(size: int, n: int, generator: torch.Generator) -> np.ndarray:
    """``min(n, size)`` distinct slots uniformly at random, in random order, as ``(k,)`` int64.

    Small buffers use ``randperm(size)[:k]``, which is O(size). Large buffers (see
    ``SPARSE_SAMPLING_MIN_SIZE``) use O(k log k) rejection of repeats, falling back to
    ``randperm`` in the rare case that gives too few distinct slots.
    """
    k = min(n, size)
    if size >= SPARSE_SAMPLING_MIN_SIZE and k * _SPARSE_RATIO <= size:
        picked = _first_distinct(size, k, generator)
        if picked is not None:
            return picked
    return torch.randperm(size, generator=generator).numpy()[:k]


def _first_distinct(size: int, k: int, generator: torch.Generator) -> np.ndarray | None:
    """First ``k`` distinct values of ``2k`` i.i.d. uniform draws on ``[0, size)``, or ``None``.

    Taking the first new value of an i.i.d. stream, again and again, is sequential sampling
    without replacement. Relabelling the values leaves the event "at least ``k`` distinct" the
    same, so conditioning on that event keeps the result uniform.
    """
    draws = torch.randint(0, size, (2 * k,), generator=generator).numpy()
    order = np.argsort(draws, kind="stable")
    ordered = draws[order]
    first = np.ones(2 * k, dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    is_first = np.empty_like(first)
    is_first[order] = first
    distinct = draws[is_first]
    return distinct[:k] if distinct.size >= k else None


# ---------------------------------------------------------------------------------------------
# prioritized replay (Schaul et al., 2016)
# ---------------------------------------------------------------------------------------------
def priority_from_loss(loss: ArrayT, alpha: float, eps: float) -> ArrayT:
    """``p_i = (|loss_i| + eps) ** alpha``; shape as ``loss`` (tensor or array)."""
    return (abs(loss) + eps) ** alpha


def annealed_beta(beta: float, beta_final: float, beta_steps: int, step: int) -> float:
    """Goes linearly from ``beta`` (at step 0) to ``beta_final`` (from step ``beta_steps`` on).

    ``beta_steps = 0`` keeps ``beta`` constant.
    """
    if beta_steps <= 0:
        return beta
    return beta + (beta_final - beta) * min(step / beta_steps, 1.0)


def importance_weights(sampled: ArrayT, total: float, size: int, beta: float) -> ArrayT:
    """Importance-sampling weights for a prioritized batch.

    ``P(i) = p_i / sum_k p_k`` and ``w_i = (N * P(i)) ** -beta / max_j w_j``, where ``N`` is the
    number of stored items and the max runs over the sampled batch. That is the normalisation in
    Schaul et al. 2016, Algorithm 1, line 10. Note that OpenAI baselines divides by the
    buffer-wide maximum (from the minimum priority) instead.

    Args:
        sampled: ``(n,)`` priorities ``p_i`` of the sampled items (tensor or array).
        total: ``sum_k p_k`` over all ``N`` stored items.
        size: ``N``.

    Returns:
        ``(n,)`` weights in ``(0, 1]``, same dtype as ``sampled``.
    """
    weights = (size * (sampled / total)) ** (-beta)
    return weights / weights.max()
