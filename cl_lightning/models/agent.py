"""MemoryAgent = encoder -> token sequence -> DNC core -> classifier head, and its
memory-less twin LSTMClassifier (same encoder, an LSTM core).

Memory is fresh for every sample: the core starts from its zero state on each input's
token sequence, unless a labeled *context* is given (memory as context): the core first
reads one token per context example (its mean encoder token plus a label embedding), once,
and every query then starts from that state.

Under task-IL the learner masks the logits to the task's classes, which
for disjoint class sets is exactly a per-task head (each task reads its own rows of the
head's weight matrix).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from cl_lightning.checks import require_at_least
from cl_lightning.models.backbones import Classifier
from cl_lightning.models.dnc import DNC
from cl_lightning.models.encoders import EncoderKind, build_encoder

Readout = Literal["last", "mean"]
Context = tuple[torch.Tensor, torch.Tensor]
"""Labeled examples ``(xc: (M, *input_shape), yc: (M,))`` a query may read first."""


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
    """

    supports_context = True
    head_on_features = True  # forward(x, **kw) == head(features(x, **kw))

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 encoder: EncoderKind = "auto", num_tokens: int = 4, token_dim: int = 64,
                 cnn_width: int = 20, readout: Readout = "last") -> None:
        super().__init__()
        if readout not in ("last", "mean"):
            raise ValueError(f"model.net.readout must be 'last' or 'mean', got {readout!r}")
        self.encoder = build_encoder(input_shape, encoder, num_tokens, token_dim, cnn_width)
        self.readout = readout
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

    def features(self, x: torch.Tensor, context: Context | None = None,
                 context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, *input_shape) -> (B, H) read out from the core's outputs. With a context,
        queries start from the state after reading it (only where ``context_mask``)."""
        state = None
        if context is not None and len(context[0]) > 0:
            state = self.expand_state(self.read_context(context), len(x), context_mask)
        out = self.core_forward(self.encoder(x), state)[0]
        return out[:, -1] if self.readout == "last" else out.mean(1)

    def forward(self, x: torch.Tensor, context: Context | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(x, context, context_mask))


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
        hidden_size: LSTM controller units.
        memory_slots: memory rows N.
        word_size: memory word width W.
        read_heads: read heads R.
        write_heads: write heads.
        clip_value: clamp of the interface pre-activations.
        masking: key/memory masking (Csordas & Schmidhuber 2019).
        dealloc: zero freed slots (Csordas & Schmidhuber 2019).
        sharpness: link-distribution sharpness (Csordas & Schmidhuber 2019).
        compile_step: compile the DNC's time step with ``torch.compile`` (see
            :class:`~cl_lightning.models.dnc.DNC`): about 3x faster memory-as-context
            reading on a CPU, after a compile of tens of seconds at the start of the run.
        **kwargs: the encoder options of :class:`TokenClassifier` (encoder, num_tokens,
            token_dim, cnn_width, readout).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        core_output: int = 128,
        hidden_size: int = 128,
        memory_slots: int = 128,
        word_size: int = 64,
        read_heads: int = 4,
        write_heads: int = 1,
        clip_value: float = 20.0,
        masking: bool = False,
        dealloc: bool = False,
        sharpness: bool = False,
        compile_step: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(input_shape, num_classes, **kwargs)
        require_at_least(1, "model.net.", core_output=core_output, hidden_size=hidden_size,
                         memory_slots=memory_slots, word_size=word_size, read_heads=read_heads,
                         write_heads=write_heads)
        self.core = DNC(self.encoder.token_dim, core_output, hidden_size=hidden_size,
                        memory_slots=memory_slots, word_size=word_size, read_heads=read_heads,
                        write_heads=write_heads, clip_value=clip_value, masking=masking,
                        dealloc=dealloc, sharpness=sharpness, compile_step=compile_step)
        self.head = nn.Linear(core_output, num_classes)

    def core_forward(self, tokens: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        return self.core(tokens, state)

    def expand_state(self, state: Any, batch: int, mask: torch.Tensor | None) -> Any:
        return type(state)(*(_masked_expand(t, batch, mask) for t in state))


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
        self.head = nn.Linear(hidden_size, num_classes)

    def core_forward(self, tokens: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        return self.core(tokens, state)

    def expand_state(self, state: Any, batch: int, mask: torch.Tensor | None) -> Any:
        return tuple(_masked_expand(t, batch, mask, dim=1) for t in state)  # (layers, B, H)
