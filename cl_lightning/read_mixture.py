"""Read mixture: the net's prediction and its memory's vote, each trusted where it has
shown itself right on the store.

A recalling net answers a query from two sources: its weights (the logits, which already
take the recalled labels in through the head) and the vote of the recalled neighbours'
labels alone (the read mass per label). Which one to trust depends on the data: on tasks
the weights were trained on they beat a vote of a small buffer; on a task they never saw,
read from a few examples, a vote of those examples can beat them by many points, while the
weights stay confidently wrong. The store itself tells which case holds: every stored item
is a labelled example that both sources can predict without seeing it (the item reads its
own neighbours, never itself).

At evaluation :class:`ReadMixture` therefore

1. predicts every stored item leave-one-out with both sources;
2. calibrates each on those predictions: one temperature for the net's logits and one
   power for the vote, chosen by negative log-likelihood on a grid (a vote of 8 soft
   neighbours is under-confident, the weights on an unseen domain over-confident, and
   uncalibrated probabilities would let the more confident source win);
3. mixes the two calibrated distributions, ``p = g * p_vote + (1 - g) * p_net``, with
   ``g`` either one weight for the whole store (``gate="store"``: the weight that gives
   the stored items the highest mixture likelihood) or one per query (``gate="local"``:
   the posterior that the vote rather than the net is right, from the evidence of the
   query's own recalled neighbours: ``g = sigmoid(sum_j [log p_vote(y_j) - log p_net(y_j)])``
   over its valid neighbours ``j``, equal prior odds).

Leaving one item out makes each source look worse than it is on a query, which reads the
whole store, and not equally: a vote of a few examples per class loses a fifth of its
evidence when one of 5 is left out, the weights much less. Without a correction, small
stores pick the net too often. With ``jackknife`` (the default) every item is also
predicted with one more item of its own class left out, and each source's
log-probabilities are extrapolated back to the full store by the jackknife's bias
correction, ``2 * logp(leave one out) - logp(leave two out)`` (renormalised), before the
weight and the evidence are fitted (Quenouille 1949; the temperature and the power stay
fitted on the leave-one-out predictions).

Nothing is learned in training and nothing is stored: the fit is recomputed from the
store each time a reader is built (each evaluation), at the cost of one pass of the net
over the store (two with ``jackknife``). The pure functions below do the math; the learner's reader
(:meth:`~cl_lightning.recalling.Recalling.reader`) feeds them.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from cl_lightning.checks import OptionError
from cl_lightning.models.recall import VOTE_FLOOR

Gate = Literal["local", "store"]
SCALES = torch.logspace(-1.5, 1.5, 31, dtype=torch.float64)
"""Candidate temperatures (multipliers of the logits): 0.03 to 31.6, 31 log-spaced."""
WEIGHTS = torch.linspace(0.0, 1.0, 21, dtype=torch.float64)
"""Candidate store-wide mixture weights of the vote."""


def vote_logits(votes: Tensor) -> Tensor:
    """``(N, C)`` read mass per label -> its log (with the recall's floor, so a label no
    neighbour holds stays possible): logits whose softmax is the vote."""
    return torch.log(votes + VOTE_FLOOR)


def fit_scale(logits: Tensor, y: Tensor, scales: Tensor = SCALES) -> Tensor:
    """The multiplier ``s`` among ``scales`` that minimises the mean negative
    log-likelihood of ``softmax(s * logits)`` on the labels ``y`` (temperature scaling,
    Guo et al. 2017, on a grid). ``logits: (N, C)``; returns a 0-dim tensor (the first of
    equal minima)."""
    logp = (scales.to(logits)[:, None, None] * logits[None]).log_softmax(-1)
    nll = -logp.gather(2, y.expand(len(scales), -1)[..., None]).mean((1, 2))
    return scales.to(logits)[nll.argmin()]


def mix_log_probs(logp_net: Tensor, logp_vote: Tensor, g: Tensor) -> Tensor:
    """``log(g * p_vote + (1 - g) * p_net)`` per class, computed in log space.
    ``logp_*: (N, C)`` log-probabilities; ``g``: scalar or ``(N,)`` in [0, 1]."""
    g = torch.as_tensor(g, dtype=logp_net.dtype, device=logp_net.device)
    g = g[..., None] if g.dim() else g
    return torch.logaddexp(torch.log(g) + logp_vote, torch.log1p(-g) + logp_net)


def fit_store_weight(logp_net: Tensor, logp_vote: Tensor, y: Tensor,
                     weights: Tensor = WEIGHTS) -> Tensor:
    """The vote's weight among ``weights`` whose mixture gives the labels ``y`` the highest
    mean log-likelihood (the first of equal maxima); a 0-dim tensor."""
    ll = torch.stack([mix_log_probs(logp_net, logp_vote, g).gather(1, y[:, None]).mean()
                      for g in weights.to(logp_net)])
    return weights.to(logp_net)[ll.argmax()]


def same_class_partners(y: Tensor, generator: torch.Generator) -> Tensor:
    """``(S,)`` for every item a random other item with the same label (its row), -1 for
    an item alone in its class: within each class, a random cyclic order pairs every item
    with the next. ``y``: ``(S,)`` labels on the CPU."""
    order = torch.randperm(len(y), generator=generator)
    order = order[torch.argsort(y[order], stable=True)]  # grouped by label, random within
    grouped = y[order]
    start = torch.searchsorted(grouped, grouped, side="left")
    size = torch.searchsorted(grouped, grouped, side="right") - start
    position = torch.arange(len(y)) - start
    nxt = order[start + (position + 1) % size]
    partners = torch.empty_like(order)
    partners[order] = torch.where(size > 1, nxt, torch.full_like(nxt, -1))
    return partners


def jackknife_log_probs(left_one_out: Tensor, left_two_out: Tensor) -> Tensor:
    """``log_softmax(2 * a - b)``: log-probabilities ``(N, C)`` read without the item
    (``a``) and without it and one more (``b``), extrapolated back to the whole store."""
    return (2 * left_one_out - left_two_out).log_softmax(-1)


def local_gate(evidence: Tensor, rows: Tensor, valid: Tensor) -> Tensor:
    """Per query, the posterior weight of the vote: ``sigmoid`` of the summed
    ``evidence`` (per stored item: the vote's log-likelihood of its label minus the
    net's) of the query's valid neighbours. ``evidence: (S,)``; ``rows: (B, k)`` the
    neighbours' store rows; ``valid: (B, k)`` -> ``(B,)`` (0.5 for a query without
    neighbours)."""
    return torch.sigmoid((evidence[rows] * valid.to(evidence.dtype)).sum(1))


class MixtureFit(NamedTuple):
    """What :meth:`ReadMixture.fit` learns from one store."""

    net_scale: Tensor
    """0-dim: multiplier of the net's logits."""
    vote_scale: Tensor
    """0-dim: power of the vote."""
    store_weight: Tensor
    """0-dim: the vote's store-wide weight (``gate="store"``)."""
    evidence: Tensor
    """(S,) per stored item: calibrated log p_vote(y) - log p_net(y), leave-one-out
    (jackknife-corrected, if asked)."""


class ReadMixture:
    """Evaluation-time mixture of a recalling net's prediction and its memory's vote,
    each calibrated on the store's items predicted leave-one-out (see the module text).

    Args:
        gate: ``local`` (one weight per query, from its own neighbours' evidence) or
            ``store`` (one weight for the whole store).
        jackknife: correct the leave-one-out predictions for the item left out, from a
            second pass that leaves out one more item of the same class.
    """

    def __init__(self, gate: Gate = "local", jackknife: bool = True) -> None:
        if gate not in ("local", "store"):
            raise OptionError(f"model.read_mixture.gate must be 'local' or 'store', got {gate!r}")
        self.gate, self.jackknife = gate, jackknife

    def fit(self, y: Tensor, left_one_out: tuple[Tensor, Tensor],
            left_two_out: tuple[Tensor, Tensor] | None = None) -> MixtureFit:
        """From the stored labels ``y (S,)`` and the store's predictions without each item,
        ``(net_logits (S, C), votes (S, C))`` (votes: read mass per label), and, for the
        jackknife, the same without each item and its partner
        (:func:`same_class_partners`)."""
        net_logits, vote_l = left_one_out[0].double(), vote_logits(left_one_out[1].double())
        net_scale, vote_scale = fit_scale(net_logits, y), fit_scale(vote_l, y)
        logp_net = (net_scale * net_logits).log_softmax(1)
        logp_vote = (vote_scale * vote_l).log_softmax(1)
        if left_two_out is not None:
            logp_net = jackknife_log_probs(
                logp_net, (net_scale * left_two_out[0].double()).log_softmax(1))
            logp_vote = jackknife_log_probs(
                logp_vote, (vote_scale * vote_logits(left_two_out[1].double())).log_softmax(1))
        own = y[:, None]
        evidence = (logp_vote.gather(1, own) - logp_net.gather(1, own))[:, 0]
        weight = fit_store_weight(logp_net, logp_vote, y) if self.gate == "store" else \
            torch.zeros((), dtype=torch.float64, device=y.device)
        return MixtureFit(net_scale, vote_scale, weight, evidence)

    def log_probs(self, fit: MixtureFit, net_logits: Tensor, votes: Tensor, rows: Tensor,
                  valid: Tensor) -> Tensor:
        """``(B, C)`` log-probabilities of the mixture for queries with ``net_logits``,
        ``votes`` (as in :meth:`fit`) and their neighbours' store ``rows`` and ``valid``
        ``(B, k)``; in the dtype of ``net_logits``."""
        logp_net = (fit.net_scale * net_logits.double()).log_softmax(1)
        logp_vote = (fit.vote_scale * vote_logits(votes.double())).log_softmax(1)
        g = local_gate(fit.evidence, rows, valid) if self.gate == "local" else fit.store_weight
        return mix_log_probs(logp_net, logp_vote, g).to(net_logits.dtype)
