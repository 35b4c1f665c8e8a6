"""The learner's episodic read: the replay buffer as the store a recalling net reads.

A net that recalls (``MemoryAgent(recall_slots > 0)``) is given, for every query, the
``recall_slots`` nearest stored items (:mod:`cl_lightning.episodic_index`); this mixin of
:class:`~cl_lightning.module.ContinualLearner` finds the store, keeps its index current,
retrieves, and builds the readers that evaluation and the few-shot metric call (with
``local_adaptation``, a reader whose head first adapts on each query's neighbours).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from cl_lightning.checks import OptionError
from cl_lightning.episodic_index import EpisodicIndex, fingerprint, nearest_others
from cl_lightning.epoch_means import EpochMeans
from cl_lightning.learner_types import ModelFn, Store
from cl_lightning.local_adaptation import LocalAdaptation
from cl_lightning.models.recall import Recall, permute_elements, same_label_mass
from cl_lightning.plugins import LearnerPlugin
from cl_lightning.read_mixture import MixtureFit, ReadMixture, same_class_partners

STORE_CHUNK = 1024
"""Stored items answered per forward when the read mixture is fitted."""


class Recalling:
    """Mixin: retrieval from the replay buffer for a net that recalls."""

    net: nn.Module
    device: torch.device
    recall_index: EpisodicIndex
    local_adaptation: LocalAdaptation | None
    read_mixture: ReadMixture | None
    recall_from_batch: float
    input_shuffle: float
    _epoch_means: EpochMeans

    def plugins(self) -> list[LearnerPlugin]:  # provided by the learner
        raise NotImplementedError

    def train_logits(self, model: Any, inputs: torch.Tensor, task: torch.Tensor,
                     **kwargs: Any) -> torch.Tensor:  # provided by the learner
        raise NotImplementedError

    @property
    def recalling(self) -> bool:
        """Whether the net reads retrieved neighbours (``recall_slots > 0``)."""
        return getattr(self.net, "recall_slots", 0) > 0

    def store(self) -> Store | None:
        """The long-term store: the first plugin's kept samples (None if none keeps any)."""
        return next((k for p in self.plugins() if (k := p.kept_samples(self)) is not None),
                    None)

    @torch.no_grad()
    def retrieve(self, inputs: torch.Tensor, raw: torch.Tensor, store: Store,
                 keys: torch.Tensor, prints: torch.Tensor | None = None,
                 also_exclude: torch.Tensor | None = None) -> Recall:
        """Each query's ``recall_slots`` nearest stored items by the net's key (cosine),
        never the query itself (an identical stored input is skipped).

        inputs: (B, ...) what the model sees; raw: (B, ...) the un-augmented inputs;
        keys: (S, D) the store's keys; prints: (S,) their fingerprints, if known;
        also_exclude: (B,) a store row each query may not retrieve either (-1: none)."""
        k = self.net.recall_slots
        query = self.net.recall_keys(inputs).float()
        prints = (fingerprint(store["x"]) if prints is None else prints).to(raw.device)
        index, _, valid = nearest_others(query, keys, k, fingerprint(raw), prints,
                                         also_exclude=also_exclude)
        used, inverse = torch.unique(index, return_inverse=True)
        x = store["x"].to(inputs.device)[used]
        y = store["y"].to(inputs.device)[index]
        recall = Recall(x, inverse, y, valid, index)
        if getattr(self.net, "fixed_recall_key", False):  # once for every copy of the net
            recall = recall._replace(cos=self.net.neighbour_cosines(inputs, recall))
        return recall

    @torch.no_grad()
    def index_store(self, store: Store) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys ``(S, D)`` (the net's current weights) and fingerprints ``(S,)`` of a
        store's items, for :meth:`retrieve`."""
        return self.net.recall_keys(store["x"]).float(), fingerprint(store["x"])

    def train_recall(self, inputs: torch.Tensor, raw: torch.Tensor, labels: torch.Tensor,
                     replay: torch.Tensor) -> Recall | None:
        """The recall of a training batch (None for a net that does not recall): with
        probability ``recall_from_batch`` from the batch's own current-task samples (true
        ``labels``; ``replay`` marks the replayed rows), else from the replay buffer
        (None before anything is stored), whose index is kept current on its refresh
        schedule."""
        if not self.recalling:
            return None
        current = ~replay
        if (self.recall_from_batch > 0 and int(current.sum()) > self.net.recall_slots
                and torch.rand(()) < self.recall_from_batch):
            own = {"x": raw[current], "y": labels[current]}
            return self.retrieve(inputs, raw, own, *self.index_store(own))
        store = self.store()
        if store is None:
            return None
        store_x = store["x"].to(self.device)
        keys = self.recall_index.sync(store_x, self.net.recall_keys)
        return self.retrieve(inputs, raw, {**store, "x": store_x}, keys,
                             self.recall_index.prints)

    def novel_input_logits(self, inputs: torch.Tensor, task: torch.Tensor,
                           recall: Recall | None,
                           rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """A novel-input episode, drawn with probability ``input_shuffle`` (None
        otherwise): the logits of ``inputs[rows]`` (default all) with their elements
        permuted by one random permutation, reading the same neighbours permuted the same
        way. The weights have never seen such inputs, but the recalled neighbours and
        labels are the right ones (a common permutation keeps every cosine), so the loss
        on these logits trains the net to follow its read where its weights do not
        recognise the input."""
        if recall is None or self.input_shuffle <= 0 or torch.rand(()) >= self.input_shuffle:
            return None
        if rows is not None:
            inputs, task, recall = inputs[rows], task[rows], recall.select(rows)
        perm = torch.randperm(inputs[0].numel(), device=inputs.device)
        logits = self.train_logits(self.net, permute_elements(inputs, perm), task,
                                   recall=recall.permuted(perm))
        getattr(self.net, "take_vote_logits", lambda: None)()  # keep no graph on the net
        return logits

    def reader(self, model: nn.Module | ModelFn | None = None, store: Store | None = None,
               index: tuple[torch.Tensor, torch.Tensor] | None = None, local: bool = False,
               **kwargs: Any) -> ModelFn:
        """``x -> logits`` of ``model`` (default the net) that recalls from ``store``
        (default the replay buffer, as it is now) when the net recalls; else the model as
        it is. ``index``: the store's :meth:`index_store`, if already computed (else it is
        computed once, on the first call). ``local``: each query's head is first adapted
        on its recalled neighbours (``model.local_adaptation``; their features are read
        the same way, each recalling its own neighbours). With ``model.read_mixture`` the
        logits are the mixture's log-probabilities, fitted on the store on the first call."""
        model = self.net if model is None else model
        store = self.store() if store is None and self.recalling else store
        if not self.recalling or store is None:
            return lambda x: model(x, **kwargs)
        store = {k: v.to(self.device) for k, v in store.items()}
        # computed on the first call, kept for the reader's life
        cached: dict[str, Any] = {"index": index, "mixture": None}
        mixture = self.read_mixture
        votes_of = self.votes_of(model)

        def answer(x: torch.Tensor, also_exclude: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, Recall]:
            if cached["index"] is None:
                cached["index"] = self.index_store(store)
            keys, prints = cached["index"]
            recall = self.retrieve(x, x, store, keys, prints, also_exclude)
            if not local:
                return model(x, recall=recall, **kwargs), recall
            near = recall.x  # the distinct neighbours, each read with its own recall
            near_feats = model.features(near, recall=self.retrieve(near, near, store, keys,
                                                                   prints))
            assert self.local_adaptation is not None
            return self.local_adaptation.logits(
                model.head, model.features(x, recall=recall, **kwargs),
                near_feats[recall.index], recall.y, recall.valid), recall

        @torch.no_grad()
        def store_answers(partners: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            """The net's logits and the vote for every stored item, read without itself
            (and without its partner, if given)."""
            net_logits, votes = [], []
            for rows in torch.arange(len(store["y"]), device=self.device).split(STORE_CHUNK):
                chunk = store["x"][rows]
                chunk_logits, recall = answer(
                    chunk, None if partners is None else partners[rows])
                net_logits.append(chunk_logits)
                votes.append(votes_of(chunk, recall))
            return torch.cat(net_logits), torch.cat(votes)

        def fit_mixture(mixture: ReadMixture) -> MixtureFit:
            left_out = store_answers(None)
            if not mixture.jackknife:
                return mixture.fit(store["y"], left_out)
            partners = same_class_partners(store["y"].cpu(), torch.Generator().manual_seed(0))
            return mixture.fit(store["y"], left_out, store_answers(partners.to(self.device)))

        def read(x: torch.Tensor) -> torch.Tensor:
            logits, recall = answer(x)
            if mixture is None:
                return logits
            if cached["mixture"] is None:  # each stored item answered leave-one-out, once
                cached["mixture"] = fit_mixture(mixture)
            assert recall.rows is not None
            return mixture.log_probs(cached["mixture"], logits, votes_of(x, recall),
                                     recall.rows, recall.valid)

        return read

    def votes_of(self, model: nn.Module | ModelFn) -> ModelFn:
        """``(x, recall) -> (B, C)`` the memory's vote as ``model`` reads it: its own
        ``recall_votes`` (an EMA copy's learned read strength), else the net's (an adapted
        model is a function of the net's weights)."""
        return getattr(model, "recall_votes", self.net.recall_votes)

    def check_recall(self) -> None:
        """Fail early where recall cannot work: more neighbours than the buffer holds."""
        if not self.recalling:
            return
        k = self.net.recall_slots
        keepers = [p for p in self.plugins() if hasattr(p, "capacity")]
        if not keepers:
            rank_zero_warn(
                f"model.net.recall_slots={k} but no strategy keeps samples to recall from "
                "(add a replay method, e.g. -c configs/methods/er.yaml): the agent recalls "
                "only in the few-shot evaluation")
            return
        capacity = keepers[0].capacity
        if k > capacity:
            raise OptionError(
                f"model.net.recall_slots ({k}) is larger than the replay buffer "
                f"(capacity={capacity}): lower recall_slots or raise the capacity")


    def _log_recall(self, targets: torch.Tensor) -> None:
        """Accumulate ``recall/same_label_mass`` (logged per epoch): the primed read's mass
        on slots that hold the query's label (how often memory reads land on the right
        experiences)."""
        last = getattr(self.net, "last_recall", None)
        if last is None or len(last[0]) != len(targets):
            return
        weights, labels = last
        self._epoch_means.add("recall/same_label_mass",
                              same_label_mass(weights, labels, targets).sum(), len(targets))

