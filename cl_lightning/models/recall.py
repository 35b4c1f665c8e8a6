"""Recall: retrieved experiences written into the DNC's memory before a query is read.

For each query the learner retrieves ``k`` labelled neighbours from the long-term store
(:mod:`cl_lightning.episodic_index`). The agent writes neighbour ``j`` into memory slot
``j`` as the word ``[key part | label part]`` (a learned projection of its key and a learned
embedding of its label), marks those slots used, and primes every read head with a content
read of the query's own key against the key parts. The controller then reads the query's
tokens starting from that state: the recalled labels reach it through the read vectors,
and its own reads can return to the same slots. Writes of the query go to free slots.
The read mass per label (the recalled votes) also reaches the head directly, as log-odds
added to the net's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Recall(NamedTuple):
    """Neighbours retrieved for a batch of ``B`` queries.

    x: ``(U, *input_shape)`` the distinct retrieved inputs (raw, as stored).
    index: ``(B, k)`` long, each query's neighbours as rows of ``x``.
    y: ``(B, k)`` long, their labels (as the query should read them).
    valid: ``(B, k)`` bool, False for empty neighbour places.
    rows: ``(B, k)`` long, each neighbour's row in the store it came from (None if unknown).
    cos: ``(B, k)`` each query's :func:`recall_cosines` with its neighbours, where they do
    not depend on the weights (a raw-input key): computed once at retrieval for every
    model that reads this recall (the net and its EMA copies). None: each model computes
    its own.
    """

    x: Tensor
    index: Tensor
    y: Tensor
    valid: Tensor
    rows: Tensor | None = None
    cos: Tensor | None = None

    def select(self, queries: Tensor) -> Recall:
        """The recall of a subset of the queries (bool mask or indices)."""
        return Recall(self.x, *(None if t is None else t[queries]
                                for t in (self.index, self.y, self.valid, self.rows, self.cos)))

    def permuted(self, perm: Tensor) -> Recall:
        """The same neighbours with every stored input's elements permuted by ``perm``
        (:func:`permute_elements`), as the queries of a novel-input episode see them (their
        cosines are computed again, from the permuted inputs)."""
        return self._replace(x=permute_elements(self.x, perm), cos=None)


def permute_elements(x: Tensor, perm: Tensor) -> Tensor:
    """``(N, *shape)`` inputs with their ``prod(shape)`` elements reordered by ``perm``
    (one permutation for every input). A common permutation leaves the cosine between
    any two inputs unchanged, so a query still recalls the same neighbours."""
    return x.flatten(1)[:, perm].reshape(x.shape)


def gather_rows(rows: Tensor, index: Tensor) -> Tensor:
    """rows: ``(U, *D)``; index: ``(B, k)`` -> ``(B, k, *D)``: ``rows[index]`` as one
    ``index_select`` (a single contiguous copy)."""
    return rows.index_select(0, index.flatten()).view(*index.shape, *rows.shape[1:])


def recall_cosines(query: Tensor, keys: Tensor, index: Tensor) -> Tensor:
    """query: ``(B, D)``; keys: ``(U, D)`` the distinct stored items' keys; index:
    ``(B, k)`` each query's own slots as rows of ``keys`` -> ``(B, k)`` cosine of each
    query with each of its slots. Every key is normalised once, however many queries
    share it."""
    slots = gather_rows(F.normalize(keys, dim=-1), index)
    return torch.einsum("bd,bkd->bk", F.normalize(query, dim=-1), slots)


def recall_weights(query: Tensor, keys: Tensor, index: Tensor, valid: Tensor,
                   strength: Tensor) -> Tensor:
    """Content read of each query over its own slots.

    query: ``(B, D)``; keys, index: as :func:`recall_cosines`; valid: ``(B, k)``;
    strength: scalar (> 0). Returns ``(B, k)``: softmax of ``strength * cos(query, slot)``
    over the valid slots (all zeros for a query with none).
    """
    return weights_from_cosines(recall_cosines(query, keys, index), valid, strength)


def weights_from_cosines(cos: Tensor, valid: Tensor, strength: Tensor) -> Tensor:
    """:func:`recall_weights` from already computed :func:`recall_cosines` ``(B, k)``."""
    logits = (strength * cos).masked_fill(~valid, float("-inf"))
    w = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(w, nan=0.0)


VOTE_FLOOR = 1e-3


def recall_log_votes(votes: Tensor) -> Tensor:
    """``log(votes + floor) - log(1 + floor)``: per label, 0 for a unanimous vote and about
    -6.9 for a label no recalled slot holds. The agent's head adds them to its logits (its
    vote weights start as the identity), so the net's and memory's odds multiply."""
    return torch.log(votes + VOTE_FLOOR) - torch.log1p(torch.tensor(VOTE_FLOOR))


def same_label_mass(weights: Tensor, labels: Tensor, target: Tensor) -> Tensor:
    """``(B,)`` read mass on slots holding the query's own label (recall precision)."""
    return (weights * (labels == target[:, None]).to(weights.dtype)).sum(1)
