"""MemoryAgent = encoder -> token sequence -> DNC core -> classifier head, and its
memory-less twin LSTMClassifier (same encoder, an LSTM core).

Without help the core starts from its zero state on each input's token sequence. Two
ways give it experiences to read first:

* *recall* (MemoryAgent with ``recall_slots > 0``): each query's nearest labelled
  neighbours from the long-term store are written into memory slots and the read heads
  are primed on them (:mod:`cl_lightning.models.recall`);
* a labeled *context* (memory as context): the core first reads one token per context
  example (its mean encoder token plus a label embedding), once, and every query then
  starts from that state.

With ``skip_hidden > 0`` a feed-forward layer over the flattened tokens runs beside the
core and joins its readout at the head.

Under task-IL the learner masks the logits to the task's classes, which
for disjoint class sets is exactly a per-task head (each task reads its own rows of the
head's weight matrix).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cl_lightning.checks import OptionError, require_at_least
from cl_lightning.models.backbones import Classifier
from cl_lightning.models.dnc import DNC, DNCOptions, compile_for_device
from cl_lightning.models.encoders import EncoderKind, build_encoder
from cl_lightning.models.recall import (
    Recall,
    gather_rows,
    recall_cosines,
    recall_log_votes,
    weights_from_cosines,
)

Readout = Literal["last", "mean"]
RecallKey = Literal["tokens", "mean", "input"]
Context = tuple[torch.Tensor, torch.Tensor]
"""Labeled examples ``(xc: (M, *input_shape), yc: (M,))`` a query may read first."""
DNC_DEFAULTS = DNCOptions()


class TokenClassifier(Classifier):
    """Shared skeleton: encoder -> core(tokens) -> readout over time -> linear head.

    Args:
        input_shape: shape of one input (linked from the stream).
        encoder: ``vector`` (learned projection to ``num_tokens`` tokens), ``rows`` (an
            image row by row), ``cnn`` (reduced ResNet-18 feature-map positions), or
            ``auto`` (vector for flat inputs, rows for 1-channel, cnn for colour images).
        num_tokens: tokens per input for the ``vector`` encoder.
        token_dim: token width for the ``vector`` encoder.
        cnn_width: first-stage width of the ``cnn`` encoder's ResNet-18.
        readout: classify from the ``last`` core output or the ``mean`` over time.
        skip_hidden: width of a feed-forward path beside the core: one ReLU layer over the
            flattened tokens whose output joins the core's readout at the head (0: none).
            The core's recurrent state is narrow; this path gives the head the encoder's
            features in full, and leaves the core to what needs memory.
        compile_forward: run the whole forward of a query (encoder, the recalled
            neighbours' write, the core over the tokens, the head) as one ``torch.compile``
            graph, and its backward as another (a forward with a context runs eagerly).
            Per-operation overhead sets the speed of these small tensors on a CPU; the
            first calls of each shape compile (a minute or more on a CPU, seconds once
            inductor's on-disk cache holds the graphs). Values equal the eager forward's
            to float rounding.
    """

    supports_context = True
    head_on_features = True  # forward(x, **kw) == head(features(x, **kw))

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 encoder: EncoderKind = "auto", num_tokens: int = 4, token_dim: int = 64,
                 cnn_width: int = 20, readout: Readout = "last", skip_hidden: int = 0,
                 compile_forward: bool = False) -> None:
        super().__init__()
        if readout not in ("last", "mean"):
            raise OptionError(f"model.net.readout must be 'last' or 'mean', got {readout!r}")
        require_at_least(0, "model.net.", skip_hidden=skip_hidden)
        self.encoder = build_encoder(input_shape, encoder, num_tokens, token_dim, cnn_width)
        self.readout = readout
        self.skip_hidden = skip_hidden
        self.compile_forward = compile_forward
        if skip_hidden:
            width = self.encoder.num_tokens * self.encoder.token_dim
            self.skip = nn.Sequential(nn.Linear(width, skip_hidden), nn.ReLU())
        # Zero start (no random draw): the embedding is learned only when contexts are used.
        self.label_embedding = nn.Parameter(torch.zeros(num_classes, self.encoder.token_dim))

    def core_forward(self, tokens: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """tokens: (B, T, D), state: the core's state or None -> outputs (B, T, H), state."""
        raise NotImplementedError

    def expand_state(self, state: Any, batch: int, mask: torch.Tensor | None) -> Any:
        """A batch-1 state repeated for ``batch`` queries; zero where ``mask`` is False."""
        raise NotImplementedError

    def read_context(self, context: Context) -> Any:
        """The core's state after reading the context examples once (batch 1)."""
        xc, yc = context
        tokens = self.encoder(xc).mean(1) + self.label_embedding[yc]  # (M, D)
        return self.core_forward(tokens.unsqueeze(0))[1]

    recall_slots = 0
    recall_size = 0  # width of the recalled label distribution in the features (0: none)

    def recall_state(self, x: torch.Tensor, tokens: torch.Tensor,
                     recall: Recall) -> tuple[Any, torch.Tensor]:
        """The core's state with the recalled neighbours written in, and the recalled label
        votes ``(B, recall_size)`` (log of the read mass per label; zero without a
        recall, which like any constant changes no class's odds; see
        :mod:`cl_lightning.models.recall`)."""
        raise OptionError(f"{type(self).__name__} has no memory to write recalled experiences "
                         "into; use MemoryAgent with model.net.init_args.recall_slots > 0")

    def features(self, x: torch.Tensor, context: Context | None = None,
                 context_mask: torch.Tensor | None = None,
                 recall: Recall | None = None) -> torch.Tensor:
        """x: (B, *input_shape) -> (B, H) read out from the core's outputs. With a context,
        queries start from the state after reading it (only where ``context_mask``); with a
        recall, from the memory holding each query's retrieved neighbours."""
        tokens = self.encoder(x)
        state = None
        read = tokens.new_zeros(len(x), self.recall_size)
        read_context = context is not None and len(context[0]) > 0
        if recall is not None:
            if context is not None:
                raise OptionError("a query reads either recalled neighbours or a context, "
                                 "not both: set model.context false or recall_slots 0")
            state, read = self.recall_state(x, tokens, recall)
        elif read_context:
            state = self.expand_state(self.read_context(context), len(x), context_mask)
        out = self.core_forward(tokens, state)[0]
        out = out[:, -1] if self.readout == "last" else out.mean(1)
        if torch.is_grad_enabled():  # no gradient, no need: evaluation skips the anchor
            out = out + self.unused_anchor(read_context, recall is not None)
        if self.skip_hidden:
            out = torch.cat([out, self.skip(tokens.flatten(1))], 1)
        return torch.cat([out, read], 1) if self.recall_size else out

    def unused_anchor(self, read_context: bool, recalled: bool) -> torch.Tensor:
        """A zero that depends on the parameters this forward did not use (the label
        embedding without a context, the recall layers without a recall), so every
        parameter gets a (zero) gradient each step and DDP needs no
        ``find_unused_parameters``."""
        unused = [] if read_context else [self.label_embedding]
        if not recalled and self.recall_slots:
            unused += [*self.recall_word.parameters(), *self.recall_label.parameters(),
                       self.recall_strength]
            if getattr(self, "recall_gate", None) is not None:
                unused.append(self.recall_gate)
        return sum((p.sum() * 0.0 for p in unused), torch.zeros((), device=self.head.weight.device))

    last_vote_logits: torch.Tensor | None = None
    """(B, C) the recalled-label votes' part of the last forward's logits (``head`` over
    the vote features alone, no bias); None for a net without recall. A strategy that
    distils the weights' own prediction subtracts it (DER++)."""

    def forward(self, x: torch.Tensor, context: Context | None = None,
                context_mask: torch.Tensor | None = None,
                recall: Recall | None = None) -> torch.Tensor:
        if self.compile_forward and context is None and not torch.compiler.is_compiling():
            return compiled_forward(x.device.type)(self, x, recall=recall)
        return self._forward(x, context, context_mask, recall)

    def _forward(self, x: torch.Tensor, context: Context | None = None,
                 context_mask: torch.Tensor | None = None,
                 recall: Recall | None = None) -> torch.Tensor:
        """The eager forward (see :meth:`forward`)."""
        features = self.features(x, context, context_mask, recall)
        if self.recall_size:
            k = self.recall_size
            self.last_vote_logits = F.linear(features[:, -k:], self.head.weight[:, -k:])
        return self.head(features)

    def take_vote_logits(self) -> torch.Tensor | None:
        """:attr:`last_vote_logits`, cleared (no graph is kept on the module)."""
        votes, self.last_vote_logits = self.last_vote_logits, None
        return votes


@functools.cache
def compiled_forward(device_type: str = "cpu") -> Callable[..., torch.Tensor]:
    """``TokenClassifier._forward`` through ``torch.compile``, shared by every net and
    called with the module as its first argument (as :func:`~cl_lightning.models.dnc.
    compiled_step`): nothing compiled is stored on an instance, so a deepcopy (an EMA
    model) runs its own weights, and parameters swapped in by ``functional_call`` are the
    graph's inputs (options per device: :func:`~cl_lightning.models.dnc.compile_for_device`)."""
    # one graph per kind of call: with or without a recall, with gradients or not, the
    # working model's or a frozen copy's parameters, train or eval mode (dynamo's
    # default limit of 8 would send the rest back to eager)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return compile_for_device(TokenClassifier._forward, device_type)


def _masked_expand(t: torch.Tensor, batch: int, mask: torch.Tensor | None,
                   dim: int = 0) -> torch.Tensor:
    """Repeat a size-1 ``dim`` of ``t`` to ``batch``; zero the entries where ``mask`` is False."""
    shape = [-1] * t.dim()
    shape[dim] = batch
    out = t.expand(*shape)
    if mask is None:
        return out.contiguous()
    view = [1] * t.dim()
    view[dim] = batch
    return out * mask.view(view).to(t.dtype)


class MemoryAgent(TokenClassifier):
    """The product's agent: a Differentiable Neural Computer over the input's tokens.

    Args:
        input_shape: shape of one input (linked from the stream).
        num_classes: number of logits (linked from the stream).
        core_output: width of the DNC's output (the head's input).
        dnc: the DNC core's memory options (:class:`~cl_lightning.models.dnc.DNCOptions`:
            hidden_size, memory_slots, word_size, read_heads, write_heads, clip_value,
            masking, dealloc, sharpness, compile_step, temporal_links). In a config:
            ``model.net.init_args.dnc.memory_slots`` etc.
        recall_slots: memory slots that hold each query's retrieved neighbours (the number
            of neighbours the learner retrieves from the replay buffer); 0 turns the
            episodic read off. Must leave free slots: ``< dnc.memory_slots``.
        recall_strength: initial sharpness of the primed content read (learned).
        recall_gate: scale the recalled-label log-odds by a learned function of how close
            the nearest recalled neighbour is (``softplus(a * cos + b)``, starting at 1), so
            the head can trust a close neighbour's label more than a far one's.
        recall_key: what items are stored and searched by: ``input`` (the raw input: a
            key that never drifts, the better one measured on the synthetic stream and
            Split-MNIST), ``tokens`` (the encoder's tokens, flattened: learned, drifts as
            the encoder trains) or ``mean`` (their mean, for many-token encoders).
        recall_vote_init: the head's initial weight on the recalled-label log-odds (its
            vote block starts as this times the identity; learned from there). 1 starts
            as a product of the net's and the memory's odds; below 1 the head starts by
            trusting its weights more than a vote of the neighbours; 0 starts with the
            votes ignored (the recalled labels still reach the DNC's reads).
        **kwargs: the encoder options of :class:`TokenClassifier` (encoder, num_tokens,
            token_dim, cnn_width, readout, skip_hidden, compile_forward).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        core_output: int = 128,
        dnc: DNCOptions = DNC_DEFAULTS,
        recall_slots: int = 0,
        recall_strength: float = 10.0,
        recall_key: RecallKey = "input",
        recall_gate: bool = False,
        recall_vote_init: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(input_shape, num_classes, **kwargs)
        require_at_least(1, "model.net.", core_output=core_output)
        require_at_least(1, "model.net.init_args.dnc.", hidden_size=dnc.hidden_size,
                         memory_slots=dnc.memory_slots, word_size=dnc.word_size,
                         read_heads=dnc.read_heads, write_heads=dnc.write_heads)
        require_at_least(0, "model.net.", recall_slots=recall_slots)
        if recall_slots >= dnc.memory_slots:
            raise OptionError(f"model.net.recall_slots ({recall_slots}) must be below "
                             f"model.net.init_args.dnc.memory_slots ({dnc.memory_slots}) so "
                             "the query has slots to write; lower recall_slots or raise "
                             "memory_slots")
        if dnc.word_size < 2 and recall_slots:
            raise OptionError("model.net.init_args.dnc.word_size must be >= 2 with "
                             "recall_slots > 0 (a key part and a label part)")
        require_at_least(1e-3, "model.net.", recall_strength=recall_strength)
        require_at_least(0.0, "model.net.", recall_vote_init=recall_vote_init)
        if recall_key not in ("tokens", "mean", "input"):
            raise OptionError(f"model.net.recall_key must be 'tokens', 'mean' or 'input', "
                             f"got {recall_key!r}")
        self.recall_slots, self.recall_key = recall_slots, recall_key
        self.recall_size = num_classes if recall_slots else 0
        if recall_slots:
            key_size = dnc.word_size // 2
            self.recall_word = nn.Linear(self._key_width(input_shape), key_size)
            self.recall_label = nn.Embedding(num_classes, dnc.word_size - key_size)
            # softplus^-1: the read starts with the configured sharpness
            self.recall_strength = nn.Parameter(
                torch.tensor(float(recall_strength)).expm1().log())
        # (a, b) of softplus(a * cos + b): a = 0 and b = softplus^-1(1), a gate of 1
        self.recall_gate = nn.Parameter(torch.tensor([0.0, torch.tensor(1.0).expm1().log()])) \
            if recall_slots and recall_gate else None
        self.core = DNC(self.encoder.token_dim, core_output, **dataclasses.asdict(dnc))
        self.head = nn.Linear(core_output + self.skip_hidden + self.recall_size, num_classes)
        if recall_slots:
            with torch.no_grad():  # start as a product of experts: net x recalled votes
                self.head.weight[:, -self.recall_size:] = recall_vote_init * torch.eye(
                    num_classes)

    def core_forward(self, tokens: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        return self.core(tokens, state)

    def expand_state(self, state: Any, batch: int, mask: torch.Tensor | None) -> Any:
        return type(state)(*(_masked_expand(t, batch, mask) for t in state))

    def _key_width(self, input_shape: Sequence[int]) -> int:
        if self.recall_key == "input":
            return math.prod(input_shape)
        enc = self.encoder
        return enc.token_dim * (enc.num_tokens if self.recall_key == "tokens" else 1)

    def _keys(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        if self.recall_key == "input":
            return x.flatten(1)
        tokens = self.encoder(x) if tokens is None else tokens
        return tokens.flatten(1) if self.recall_key == "tokens" else tokens.mean(1)

    def recall_keys(self, x: torch.Tensor) -> torch.Tensor:
        """(N, *input_shape) -> (N, D): the key an item is stored and searched by."""
        if not self.recall_slots:
            raise OptionError("model.net.recall_slots is 0: this MemoryAgent has no "
                             "episodic read; set recall_slots > 0")
        return self._keys(x)

    @property
    def fixed_recall_key(self) -> bool:
        """Whether :meth:`recall_keys` is free of the weights (the raw input): then the
        cosines of a query with its neighbours are the same for every copy of the net, and
        the retrieval computes them once (``Recall.cos``)."""
        return self.recall_key == "input"

    def neighbour_cosines(self, x: torch.Tensor, recall: Recall,
                          tokens: torch.Tensor | None = None,
                          keys: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, k)`` the cosine of each query's key with each of its recalled neighbours'
        (``keys``: theirs, if already computed); ``recall.cos`` where the retrieval
        computed them once for every copy of the net (:attr:`fixed_recall_key`)."""
        if recall.cos is not None and self.fixed_recall_key:
            return recall.cos
        keys = self._keys(recall.x) if keys is None else keys
        return recall_cosines(self._keys(x, tokens), keys, recall.index)

    def _read_weights(self, x: torch.Tensor, recall: Recall, tokens: torch.Tensor | None = None,
                      keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The cosines ``(B, k)`` of each query with its recalled neighbours and the primed
        read's weights over them (softmax of the learned strength times the cosine)."""
        cos = self.neighbour_cosines(x, recall, tokens, keys)
        return cos, weights_from_cosines(cos, recall.valid, F.softplus(self.recall_strength))

    def _votes(self, weights: torch.Tensor, recall: Recall) -> torch.Tensor:
        votes = weights.new_zeros(len(weights), self.recall_size)
        return votes.scatter_add(1, recall.y, weights)

    def recall_votes(self, x: torch.Tensor, recall: Recall) -> torch.Tensor:
        """``(B, num_classes)`` the memory's own answer: the primed read's mass per
        recalled label (sums to 1 over a query's valid neighbours; zeros without any)."""
        return self._votes(self._read_weights(x, recall)[1], recall)

    def recall_state(self, x: torch.Tensor, tokens: torch.Tensor,
                     recall: Recall) -> tuple[Any, torch.Tensor]:
        if not self.recall_slots:
            return super().recall_state(x, tokens, recall)
        b, k = recall.index.shape
        if k > self.recall_slots:
            raise OptionError(f"{k} recalled neighbours do not fit recall_slots="
                             f"{self.recall_slots}")
        valid = recall.valid
        keys = self._keys(recall.x)  # (U, D): each distinct neighbour once
        cos, weights = self._read_weights(x, recall, tokens, keys)
        state = self.core.initial_state(b, tokens.device)
        dtype = state.memory.dtype  # the memory's, also where autocast computes in bf16
        weights = weights.to(dtype)
        key_words = gather_rows(self.recall_word(keys), recall.index)  # (B, k, W/2)
        words = torch.cat([key_words, self.recall_label(recall.y)], -1).to(dtype)
        words = words * valid[..., None].to(dtype)
        self.last_recall = (weights.detach(), recall.y.detach())
        n, r = self.core.memory_slots, self.core.read_heads
        pad = n - k
        memory = torch.cat([words, words.new_zeros(b, pad, words.shape[-1])], 1)
        usage = torch.cat([valid.to(words.dtype), words.new_zeros(b, pad)], 1)
        read_w = torch.cat([weights, weights.new_zeros(b, pad)], 1)[:, None].expand(b, r, n)
        read_v = torch.einsum("bk,bkw->bw", weights, words).to(dtype)[:, None].expand(b, r, -1)
        state = state._replace(memory=memory, usage=usage, read_weights=read_w.contiguous(),
                               read_vectors=read_v.contiguous())
        log_votes = recall_log_votes(self._votes(weights, recall))
        if self.recall_gate is not None:
            nearest_cos = cos.masked_fill(~valid, -1.0).max(1, keepdim=True).values
            log_votes = log_votes * F.softplus(self.recall_gate[0] * nearest_cos
                                               + self.recall_gate[1])
        return state, log_votes


class LSTMClassifier(TokenClassifier):
    """Baseline without external memory: the MemoryAgent's encoder and head, an LSTM core.

    Args:
        input_shape: shape of one input (linked from the stream).
        num_classes: number of logits (linked from the stream).
        hidden_size: LSTM units.
        num_layers: stacked LSTM layers.
        **kwargs: the encoder options of :class:`TokenClassifier`.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden_size: int = 128,
                 num_layers: int = 1, **kwargs: Any) -> None:
        super().__init__(input_shape, num_classes, **kwargs)
        require_at_least(1, "model.net.", hidden_size=hidden_size, num_layers=num_layers)
        self.core = nn.LSTM(self.encoder.token_dim, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size + self.skip_hidden, num_classes)

    def core_forward(self, tokens: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        return self.core(tokens, state)

    def expand_state(self, state: Any, batch: int, mask: torch.Tensor | None) -> Any:
        return tuple(_masked_expand(t, batch, mask, dim=1) for t in state)  # (layers, B, H)
