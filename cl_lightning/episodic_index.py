"""Nearest-neighbour search over the long-term episodic store (the replay buffer).

The store holds raw inputs; their *keys* (the agent's own key embedding of each input) are
cached here and refreshed on a schedule: every ``refresh_every`` calls the whole cache is
recomputed with the current weights, and in between only the slots whose content changed
(new insertions, found by an input fingerprint) are encoded. Search is exact cosine
similarity over the cached keys, one matrix product per batch.

Pure tensor functions (:func:`fingerprint`, :func:`nearest`) do the math; :class:`EpisodicIndex`
holds the cache and its checkpointed state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from cl_lightning.checks import OptionError

KeyFn = Callable[[Tensor], Tensor]
"""Inputs ``(N, *shape)`` -> keys ``(N, D)``."""

_PROBE_SEED = 20240607


def fingerprint(x: Tensor) -> Tensor:
    """A float64 summary per item, ``(N,)``: a fixed random projection of the flattened
    input. Equal inputs give equal values; distinct inputs collide with probability ~0."""
    flat = x.detach().flatten(1).to(torch.float64)
    return torch.mv(flat, _probe(flat.shape[1], flat.device))  # 4x a product and a sum


@functools.lru_cache(maxsize=16)
def _probe(width: int, device: torch.device) -> Tensor:
    """The projection of :func:`fingerprint` (drawn once per width and device)."""
    g = torch.Generator().manual_seed(_PROBE_SEED)
    return torch.rand(width, generator=g, dtype=torch.float64).to(device) + 0.5


def same_item(a: Tensor, b: Tensor) -> Tensor:
    """``(len(a), len(b))`` bool: fingerprints that match to float64 rounding."""
    return same_print(a[:, None], b[None, :])


def same_print(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise (broadcast) :func:`same_item`: ``a`` and ``b`` match to float64 rounding."""
    return (a - b).abs() <= 1e-9 * torch.maximum(a.abs(), b.abs()).clamp_min(1.0)


def cosine_similarities(queries: Tensor, keys: Tensor) -> Tensor:
    """``(B, D), (S, D)`` -> ``(B, S)`` cosine similarity of every query with every key."""
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    return q @ torch.nn.functional.normalize(keys.float(), dim=1).T


def nearest(queries: Tensor, keys: Tensor, k: int,
            exclude: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` most cosine-similar keys of every query.

    Args:
        queries: ``(B, D)``; keys: ``(S, D)``.
        k: neighbours per query; with fewer than ``k`` eligible keys the rest are invalid.
        exclude: optional ``(B, S)`` bool, keys a query may not retrieve (itself).

    Returns:
        ``index (B, k)`` into ``keys`` (0 where invalid), ``similarity (B, k)`` (descending),
        ``valid (B, k)`` bool.
    """
    sim = cosine_similarities(queries, keys)
    if exclude is not None:
        sim = sim.masked_fill(exclude, float("-inf"))
    if keys.shape[0] < k:  # fewer stored items than neighbours asked for
        sim = torch.cat([sim, sim.new_full((len(sim), k - keys.shape[0]), float("-inf"))], 1)
    return _valid_top(*sim.topk(k, dim=1))


def _valid_top(top: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``topk`` output -> (index, similarity, valid), excluded places zeroed."""
    valid = torch.isfinite(top)
    return index.masked_fill(~valid, 0), top.masked_fill(~valid, 0.0), valid


def nearest_others(queries: Tensor, keys: Tensor, k: int, query_prints: Tensor,
                   key_prints: Tensor, small_store: int = 256,
                   also_exclude: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`nearest` excluding, for every query, the keys of its own item (and the row
    ``also_exclude[i]`` for query ``i``, where given and not -1):
    ``nearest(queries, keys, k, exclusion_mask(query_prints, key_prints, also_exclude))``
    (the same neighbours and similarities; keys at exactly equal similarity may come in
    another order), without building the ``(B, S)`` exclusion mask.

    The fingerprints are compared only on each query's ``k + 2`` most similar keys: if at
    most 2 of them are excluded, the ``k`` best of the others are the answer, since
    every key outside the candidates is less similar than all of them. Rows with more (an
    item stored more than twice) are answered by the full mask. (Two spare places: CPU
    ``topk`` slows down several-fold from 16 places on.) A store of at most ``small_store``
    items takes the full mask, which is as cheap there (``benchmarks/retrieval_speed.py``).
    """
    spare = 2
    if keys.shape[0] <= max(k + spare, small_store):
        return nearest(queries, keys, k, exclusion_mask(query_prints, key_prints, also_exclude))
    sim = cosine_similarities(queries, keys)
    top, cand = sim.topk(k + spare, dim=1)
    own = same_print(query_prints[:, None], key_prints[cand])
    if also_exclude is not None:
        own |= cand == also_exclude[:, None]
    best, pos = top.masked_fill(own, float("-inf")).topk(k, dim=1)
    index = cand.gather(1, pos)
    crowded = own.sum(1) > spare
    if bool(crowded.any()):
        rows = crowded.nonzero().squeeze(1)
        mask = exclusion_mask(query_prints[rows], key_prints,
                              None if also_exclude is None else also_exclude[rows])
        best[rows], index[rows] = sim[rows].masked_fill(mask, float("-inf")).topk(k, dim=1)
    return _valid_top(best, index)


def exclusion_mask(query_prints: Tensor, key_prints: Tensor,
                   also_exclude: Tensor | None = None) -> Tensor:
    """``(B, S)`` bool: each query's own item (:func:`same_item`) and, where
    ``also_exclude[i] >= 0``, row ``also_exclude[i]``."""
    mask = same_item(query_prints, key_prints)
    if also_exclude is not None:
        rows = (also_exclude >= 0).nonzero().squeeze(1)
        mask[rows, also_exclude[rows]] = True
    return mask


class EpisodicIndex:
    """Cached keys of the store's items, refreshed on a schedule.

    Args:
        refresh_every: recompute every key after this many :meth:`sync` calls (training
            steps); in between only changed slots are encoded. 1 recomputes every step.
    """

    def __init__(self, refresh_every: int = 50) -> None:
        if refresh_every < 1:
            raise OptionError(f"model.recall_refresh must be >= 1, got {refresh_every}")
        self.refresh_every = refresh_every
        self.keys: Tensor | None = None
        self.prints: Tensor | None = None
        self.calls = 0
        self.encoded = 0  # items encoded so far (a cost counter, for tests and logs)

    @torch.no_grad()
    def sync(self, store_x: Tensor, key_fn: KeyFn) -> Tensor:
        """The keys ``(S, D)`` of ``store_x`` (the store's items, in slot order)."""
        prints = fingerprint(store_x)
        full = (self.keys is None or self.calls % self.refresh_every == 0
                or self.keys.device != store_x.device)
        if full:
            keys = key_fn(store_x).float()
            self.encoded += len(store_x)
        else:
            assert self.keys is not None and self.prints is not None
            keys = self.keys
            old = len(keys)
            if len(store_x) < old:  # the store shrank (re-sharded): start over
                keys, old = keys[:0], 0
            changed = torch.zeros(len(store_x), dtype=torch.bool, device=store_x.device)
            changed[old:] = True
            if old:
                changed[:old] = prints[:old] != self.prints[:old]
            rows = changed.nonzero().squeeze(1)
            if len(rows):
                keys = torch.cat([keys, keys.new_zeros(len(store_x) - old, keys.shape[1])])
                keys[rows] = key_fn(store_x[rows]).float()
                self.encoded += len(rows)
        self.keys, self.prints = keys, prints
        self.calls += 1
        return keys

    def state_dict(self) -> dict[str, Any]:
        return {"keys": self.keys, "prints": self.prints, "calls": self.calls,
                "encoded": self.encoded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.keys, self.prints = state["keys"], state["prints"]
        self.calls, self.encoded = int(state["calls"]), int(state.get("encoded", 0))
