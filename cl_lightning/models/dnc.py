"""Differentiable Neural Computer (Graves et al., Nature 2016) in PyTorch.

Behaviour follows DeepMind's reference implementation (``google-deepmind/dnc``): an LSTM
controller reads ``x_t ⊕ r_{t-1}``, one linear layer emits the interface vector, the memory is
written (usage → allocation → write weighting → erase/add → temporal links) and then read
(content, forward and backward weightings mixed by the read modes), and the output is
``y_t = Linear(h_t ⊕ r_t)``. The addressing maths lives in
:mod:`cl_lightning.models.dnc_addressing`, its fused kernels in
:mod:`cl_lightning.models.dnc_kernels`.

Optional extensions from Csordás & Schmidhuber (ICLR 2019), all off by default:

* ``masking``: every read and write head also emits a sigmoid mask over the word; content
  look-up compares ``key * mask`` with ``word * mask`` (key/value separation).
* ``dealloc``: memory words are multiplied by the retention vector ``psi`` during the write,
  so freed slots are zeroed instead of keeping stale content.
* ``sharpness``: forward/backward weightings are sharpened, ``S(d, s) = d^s / sum(d^s)``;
  ``True`` makes ``s = oneplus(.)`` a per-(read head, write head, direction) interface output,
  a float uses that fixed exponent.

Differences from the reference worth knowing: only the interface pre-activations are clipped
to ``±clip_value`` (the reference also clips the controller state and the output), and the
input part of the controller's gates is computed for all time steps at once.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lightning.checks import OptionError
from cl_lightning.models import dnc_addressing as addr
from cl_lightning.models import dnc_kernels as kernels
from cl_lightning.models import dnc_native
from cl_lightning.models.cuda_graphs import graph_cache

CppKernels = Literal["none", "auto", "link", "step"]

_EMPTY_LINKS: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
"""The all-zero link tensors :meth:`DNC.initial_state` made, by ``id`` (entries vanish
with their tensors). A state whose link is one of them has never been written: the DNC
never changes a state's tensors in place, and a caller that did would have to replace the
link (``state._replace(link=...)``), which takes the full update."""


def lstm_cell(x_gates: Tensor, read_vectors: Tensor, h: Tensor, c: Tensor,
              recurrent_weight: Tensor) -> tuple[Tensor, Tensor]:
    """The DNC's LSTM controller cell on ``x_t ⊕ r_{t-1}``: ``x_gates`` ``(B, 4H)`` is the
    input's contribution to the gates (order: input, forget, output, cell), ``read_vectors``
    ``(B, R, W)`` and ``h``, ``c`` ``(B, H)`` the previous step's. Returns ``(h, c)``."""
    recurrent_in = torch.cat([read_vectors.flatten(1), h], dim=-1)
    gates = torch.addmm(x_gates, recurrent_in, recurrent_weight.t())
    gates = gates.to(c.dtype)  # a no-op but under autocast
    hs = h.shape[-1]
    sig = torch.sigmoid(gates[:, : 3 * hs])
    in_gate, forget_gate, out_gate = sig.chunk(3, dim=-1)
    c = torch.addcmul(forget_gate * c, in_gate, torch.tanh(gates[:, 3 * hs :]))
    return out_gate * torch.tanh(c), c


def _memory_fields(iface: Interface) -> tuple[Tensor, ...]:
    """The interface fields in the order of the memory-step kernel's arguments (one write
    head, its dimension squeezed)."""
    return (iface.read_keys, iface.read_strengths, iface.write_keys.squeeze(1),
            iface.write_strengths.squeeze(1), iface.erase_vectors.squeeze(1),
            iface.write_vectors.squeeze(1), iface.free_gates, iface.allocation_gates.squeeze(1),
            iface.write_gates.squeeze(1), iface.read_modes)


def _native_state(h: Tensor, c: Tensor, memory: Tensor, usage: Tensor, link: Tensor,
                  precedence: Tensor, read_weights: Tensor, writes: Tensor,
                  read_vectors: Tensor, allocation: Tensor, allocation_gate: Tensor,
                  write_gate: Tensor, free_gates: Tensor, read_modes: Tensor
                  ) -> tuple[DNCState, tuple[Tensor, ...]]:
    """A kernel's outputs (one write head, its dimension squeezed) as :meth:`DNC.step`
    returns them: the new state and the diagnostics."""
    write_weights = writes.unsqueeze(1)
    state = DNCState(h, c, memory, usage, link.unsqueeze(1), precedence.unsqueeze(1),
                     read_weights, write_weights, read_vectors)
    return state, (read_weights, write_weights, allocation.unsqueeze(1), usage,
                   allocation_gate.unsqueeze(1), write_gate.unsqueeze(1), free_gates,
                   read_modes)


def is_empty_link(link: Tensor) -> bool:
    """True if ``link`` is a link tensor :meth:`DNC.initial_state` made (all zeros)."""
    if torch.compiler.is_compiling():  # a weak dictionary does not trace: take the full update
        return False
    return _EMPTY_LINKS.get(id(link)) is link


class DNCState(NamedTuple):
    """Recurrent state of a :class:`DNC` (all tensors batch-first)."""

    h: Tensor
    """``(B, H)`` controller hidden state."""
    c: Tensor
    """``(B, H)`` controller cell state."""
    memory: Tensor
    """``(B, N, W)`` memory matrix."""
    usage: Tensor
    """``(B, N)`` slot usage."""
    link: Tensor
    """``(B, Wr, N, N)`` temporal link matrices."""
    precedence: Tensor
    """``(B, Wr, N)`` precedence weightings."""
    read_weights: Tensor
    """``(B, R, N)`` read weightings."""
    write_weights: Tensor
    """``(B, Wr, N)`` write weightings."""
    read_vectors: Tensor
    """``(B, R, W)`` read vectors."""

    def detach(self) -> DNCState:
        """Copy of the state cut from the autograd graph (truncated BPTT)."""
        return DNCState(*(t.detach() for t in self))


class DNCTrace(NamedTuple):
    """Per-step diagnostics for a memory monitor; detached, time is dimension 1."""

    read_weights: Tensor
    """``(B, T, R, N)``."""
    write_weights: Tensor
    """``(B, T, Wr, N)``."""
    allocation: Tensor
    """``(B, T, Wr, N)`` allocation weightings."""
    usage: Tensor
    """``(B, T, N)``."""
    allocation_gate: Tensor
    """``(B, T, Wr)``."""
    write_gate: Tensor
    """``(B, T, Wr)``."""
    free_gates: Tensor
    """``(B, T, R)``."""
    read_modes: Tensor
    """``(B, T, R, 1 + 2 Wr)``: backward (Wr), forward (Wr), content (1)."""


class Interface(NamedTuple):
    """Activated interface vector of one time step (``H`` = heads of the given kind)."""

    read_keys: Tensor  # (B, R, W)
    read_strengths: Tensor  # (B, R)
    write_keys: Tensor  # (B, Wr, W)
    write_strengths: Tensor  # (B, Wr)
    erase_vectors: Tensor  # (B, Wr, W)
    write_vectors: Tensor  # (B, Wr, W)
    free_gates: Tensor  # (B, R)
    allocation_gates: Tensor  # (B, Wr)
    write_gates: Tensor  # (B, Wr)
    read_modes: Tensor  # (B, R, 1 + 2 Wr)
    read_masks: Tensor | None  # (B, R, W)
    write_masks: Tensor | None  # (B, Wr, W)
    forward_sharpness: Tensor | None  # (B, R, Wr)
    backward_sharpness: Tensor | None  # (B, R, Wr)


class InterfaceLayout:
    """Where each field sits in the raw interface vector, grouped by activation.

    Fields sharing an activation are contiguous, so each activation runs once per step on one
    slice: ``[keys and write vectors | strengths | sigmoid gates, erase, masks | read modes |
    sharpness]``. All field tensors are views of the activated blocks.
    """

    def __init__(
        self,
        read_heads: int,
        write_heads: int,
        word_size: int,
        masking: bool,
        sharpness: bool,
        temporal_links: bool = True,
    ) -> None:
        r, wr, w = read_heads, write_heads, word_size
        self.read_heads, self.write_heads, self.word_size = r, wr, w
        self.masking, self.sharpness = masking, sharpness
        self.temporal_links = temporal_links
        self.linear_sizes = [r * w, wr * w, wr * w]
        self.strength_sizes = [r, wr]
        self.sigmoid_sizes = [wr * w, r, wr, wr] + ([r * w, wr * w] if masking else [])
        self.mode_size = r * (1 + 2 * wr) if temporal_links else 0
        self.sharpness_size = 2 * r * wr if sharpness else 0
        self.block_sizes = [
            sum(self.linear_sizes),
            sum(self.strength_sizes),
            sum(self.sigmoid_sizes),
            self.mode_size,
            self.sharpness_size,
        ]
        self.size = sum(self.block_sizes)

    def parse(self, raw: Tensor, strength_fn: Callable[[Tensor], Tensor]) -> Interface:
        """Split and activate ``raw: (B, size)`` into an :class:`Interface`."""
        r, wr, w = self.read_heads, self.write_heads, self.word_size
        lin, strength, sig, modes, sharp = torch.split(raw, self.block_sizes, dim=-1)
        read_keys, write_keys, write_vectors = torch.split(lin, self.linear_sizes, dim=-1)
        read_strengths, write_strengths = torch.split(
            strength_fn(strength), self.strength_sizes, dim=-1
        )
        sig_parts = torch.split(torch.sigmoid(sig), self.sigmoid_sizes, dim=-1)
        erase, free_gates, alloc_gates, write_gates = sig_parts[:4]
        read_masks = write_masks = None
        if self.masking:
            read_masks = sig_parts[4].unflatten(-1, (r, w))
            write_masks = sig_parts[5].unflatten(-1, (wr, w))
        fwd_sharp = bwd_sharp = None
        if self.sharpness:
            fwd_sharp, bwd_sharp = addr.oneplus(sharp).unflatten(-1, (2, r, wr)).unbind(1)
        return Interface(
            read_keys=read_keys.unflatten(-1, (r, w)),
            read_strengths=read_strengths,
            write_keys=write_keys.unflatten(-1, (wr, w)),
            write_strengths=write_strengths,
            erase_vectors=erase.unflatten(-1, (wr, w)),
            write_vectors=write_vectors.unflatten(-1, (wr, w)),
            free_gates=free_gates,
            allocation_gates=alloc_gates,
            write_gates=write_gates,
            read_modes=self._read_modes(modes),
            read_masks=read_masks,
            write_masks=write_masks,
            forward_sharpness=fwd_sharp,
            backward_sharpness=bwd_sharp,
        )

    def _read_modes(self, modes: Tensor) -> Tensor:
        """Read-mode distributions ``(B, R, 1 + 2 Wr)``; without temporal links (no mode
        outputs) every head reads by content only: ``[0, ..., 0, 1]``."""
        r, wr = self.read_heads, self.write_heads
        if self.temporal_links:
            return torch.softmax(modes.unflatten(-1, (r, 1 + 2 * wr)), dim=-1)
        content_only = modes.new_zeros(1 + 2 * wr)
        content_only[-1] = 1.0
        return content_only.expand(modes.shape[0], r, 1 + 2 * wr)


@dataclass(frozen=True)
class DNCOptions:
    """The DNC's memory options, as one object: :class:`DNC`'s keyword arguments of the
    same names, with its defaults (``DNC(input_size, output_size, **asdict(options))``).
    A :class:`~cl_lightning.models.agent.MemoryAgent` takes them as its ``dnc`` option
    (``model.net.init_args.dnc.<field>`` in a config). The values are checked where they
    are used (:class:`DNC`, :class:`~cl_lightning.models.agent.MemoryAgent`).

    Args:
        hidden_size: LSTM controller units ``H``.
        memory_slots: memory rows ``N``.
        word_size: memory word width ``W``.
        read_heads: read heads ``R``.
        write_heads: write heads ``Wr``.
        clip_value: clamp of the interface pre-activations to ``±clip_value``
            (``null``/0: off).
        masking: key/memory masking (Csordás & Schmidhuber 2019).
        dealloc: zero freed slots (Csordás & Schmidhuber 2019).
        sharpness: link-distribution sharpening (Csordás & Schmidhuber 2019): ``true``
            learned, a positive float a fixed exponent, ``false`` off.
        compile_step: compile the DNC's time step with ``torch.compile`` (see
            :class:`DNC`): about 3x faster memory-as-context reading on a CPU, after a
            compile of tens of seconds at the start of the run.
        temporal_links: keep the temporal link matrix and the forward/backward read modes;
            ``false`` reads by content only and skips the ``N x N`` link work.
        cuda_graphs: on a GPU, replay the DNC's forward (and backward) over the sequence
            from CUDA graphs (see :class:`DNC`): 5-13x faster per time step on one H200,
            bit-equal; no effect on a CPU or with ``compile_step``.
        cpp_kernels: ``none``, ``auto``, ``link`` or ``step``: on a CPU, run the link update
            and directional reads, or the whole time step, forward and backward, as C++
            kernels built on first use; ``auto`` takes the fastest that serves the options
            and runs in PyTorch (with a warning) where they cannot be built (see
            :class:`DNC`).
    """

    hidden_size: int = 128
    memory_slots: int = 128
    word_size: int = 64
    read_heads: int = 4
    write_heads: int = 1
    clip_value: float | None = 20.0
    masking: bool = False
    dealloc: bool = False
    sharpness: bool | float = False
    compile_step: bool = False
    temporal_links: bool = True
    cuda_graphs: bool = True
    cpp_kernels: CppKernels = "none"


class DNC(nn.Module):
    """Differentiable Neural Computer with an LSTM controller.

    Args:
        input_size: features per time step ``D``.
        output_size: output features per time step ``O``.
        hidden_size: LSTM controller width ``H``.
        memory_slots: number of memory slots ``N``.
        word_size: memory word size ``W``.
        read_heads: number of read heads ``R``.
        write_heads: number of write heads ``Wr``.
        clip_value: interface pre-activations are clamped to ``±clip_value`` (``None``/0: off).
        masking: Csordás & Schmidhuber key/memory masking.
        dealloc: Csordás & Schmidhuber de-allocation (freed slots are zeroed).
        sharpness: link-distribution sharpening; ``True`` learned, a float a fixed exponent.
        strength_activation: ``"softplus"`` (DeepMind reference code) or ``"oneplus"``
            (``1 + softplus``, Nature paper and Csordás & Schmidhuber).
        fused: use the ``fused_*`` functions of :mod:`~cl_lightning.models.dnc_kernels`
            (content look-up without mask, one-head erase/add, link update + directional
            reads): same values and gradients, hand-written first-order backward passes.
        stop_write_gradient: as the reference, usage treats the previous write weights as
            constants; ``False`` gives the exact gradient (e.g. for ``gradcheck``).
        compile_step: run each time step through ``torch.compile`` (inductor). Pays off where
            per-operation overhead dominates, i.e. small batches: reading a context is a
            sequence at batch 1, 3x faster compiled on a CPU. The first call of each
            batch size and grad mode compiles (tens of seconds on a CPU); values and
            gradients equal the eager step's to float rounding.
        temporal_links: ``False`` drops the temporal link matrix, the precedence and the
            forward/backward read modes: every read is a content read, the interface has no
            read-mode outputs and the state's ``link`` and ``precedence`` are empty
            (``(B, Wr, 0, 0)`` and ``(B, Wr, 0)``). Equal to the default DNC whose read modes
            are all content, without the ``N x N`` work (the largest per-step cost).
        cuda_graphs: on a GPU, run the forward over the whole sequence, and its backward,
            as CUDA graphs (:mod:`cl_lightning.models.cuda_graphs`): one launch each instead
            of hundreds of small kernels, captured on the first call of each input
            signature (shapes, ``requires_grad``, grad mode). Same values and gradients as
            the eager DNC (bitwise on an H200). Calls it cannot serve run eagerly: on a CPU,
            with ``compile_step``, inside a compiled forward (the agent's
            ``compile_forward``), under autocast, with ``return_trace``, with swapped-in
            parameters (``functional_call``), inside
            :func:`~cl_lightning.models.cuda_graphs.paused` (the learner's second-order
            MAML inner loop: a replay has no double backward).
        cpp_kernels: ``none`` (PyTorch operations), ``auto``, ``link`` or ``step``: on a
            CPU, C++ kernels (:mod:`~cl_lightning.models.dnc_native`) with hand-written
            first-order gradients, equal to the PyTorch path to float rounding. ``link``: the
            link update and both directional reads, one pass over each ``N x N`` link matrix
            each way instead of about 24 (also inside ``compile_step``'s graph). ``step``:
            the whole time step (LSTM controller, interface layer and activations, usage,
            allocation, write, reads) as one call each way, in eager mode; it serves one
            write head without masking, de-allocation or sharpening (other options are
            refused), and ``compile_step`` runs the ``link`` kernel in its place. They are
            compiled on first use (GCC or Clang and ``ninja``; under a minute, then cached
            on disk); construction fails with one line if they cannot be built. ``auto``:
            ``step`` where it serves the options, else ``link`` (``none`` without the fused
            path or the temporal links), and ``none`` with a warning where the kernels
            cannot be built, so a checkpoint or config runs on any machine. GPU tensors,
            other dtypes than float32/float64, autocast and second-order gradients take the
            PyTorch path.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        hidden_size: int = 128,
        memory_slots: int = 128,
        word_size: int = 64,
        read_heads: int = 4,
        write_heads: int = 1,
        clip_value: float | None = 20.0,
        masking: bool = False,
        dealloc: bool = False,
        sharpness: bool | float = False,
        strength_activation: str = "softplus",
        fused: bool = True,
        stop_write_gradient: bool = True,
        compile_step: bool = False,
        temporal_links: bool = True,
        cuda_graphs: bool = True,
        cpp_kernels: CppKernels = "none",
    ) -> None:
        super().__init__()
        if cpp_kernels not in ("none", "auto", "link", "step"):
            raise OptionError(f"{dnc_native.OPTION} must be 'none', 'auto', 'link' or 'step', "
                              f"got {cpp_kernels!r}")
        step_serves = (write_heads == 1 and not masking and not dealloc and sharpness is False
                       and temporal_links and fused and stop_write_gradient)
        if cpp_kernels == "step" and not step_serves:
            raise OptionError(f"{dnc_native.OPTION} step serves one write head with temporal "
                              "links and without masking, dealloc or sharpness; use "
                              f"{dnc_native.OPTION} link or auto")
        if cpp_kernels == "auto":
            cpp_kernels = "step" if step_serves else "link" if fused and temporal_links else "none"
            if cpp_kernels != "none" and not dnc_native.available():
                cpp_kernels = "none"
        elif cpp_kernels != "none":
            dnc_native.load()  # build now: a missing compiler fails here, in one line
        if strength_activation not in ("softplus", "oneplus"):
            raise OptionError(f"unknown strength_activation {strength_activation!r}")
        learned_sharpness = sharpness is True
        fixed = None if isinstance(sharpness, bool) else float(sharpness)
        if sharpness is not False and not temporal_links:
            raise OptionError("model.net.init_args.dnc.sharpness needs temporal_links: it "
                              "sharpens the forward/backward reads")
        if fixed is not None and fixed <= 0:
            raise OptionError("model.net.init_args.dnc.sharpness must be true, false or a "
                              f"positive exponent, got {sharpness}")
        self.input_size, self.output_size, self.hidden_size = input_size, output_size, hidden_size
        self.memory_slots, self.word_size = memory_slots, word_size
        self.read_heads, self.write_heads = read_heads, write_heads
        self.clip_value = clip_value or None
        self.masking, self.dealloc, self.fused = masking, dealloc, fused
        self.stop_write_gradient = stop_write_gradient
        self.compile_step = compile_step
        self.cuda_graphs = cuda_graphs
        self.temporal_links = temporal_links
        self.cpp_kernels = cpp_kernels
        self.learned_sharpness, self.fixed_sharpness = learned_sharpness, fixed
        self._strength_fn = F.softplus if strength_activation == "softplus" else addr.oneplus
        self.layout = InterfaceLayout(
            read_heads, write_heads, word_size, masking, learned_sharpness, temporal_links
        )

        read_size = read_heads * word_size
        # LSTM gates in the order (input, forget, output, cell) so one sigmoid covers three.
        self.input_gates = nn.Linear(input_size, 4 * hidden_size)
        self.recurrent_gates = nn.Linear(read_size + hidden_size, 4 * hidden_size, bias=False)
        self.interface = nn.Linear(hidden_size, self.layout.size)
        self.output = nn.Linear(hidden_size + read_size, output_size)
        with torch.no_grad():
            self.input_gates.bias[hidden_size : 2 * hidden_size].fill_(1.0)

    def initial_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> DNCState:
        """All-zero state (defaults: the parameters' device and dtype)."""
        ref = self.interface.weight
        kw = {"device": device or ref.device, "dtype": dtype or ref.dtype}
        b, n, w = batch_size, self.memory_slots, self.word_size
        r, wr, h = self.read_heads, self.write_heads, self.hidden_size
        links = n if self.temporal_links else 0
        link = torch.zeros(b, wr, links, links, **kw)
        if not torch.compiler.is_compiling():
            _EMPTY_LINKS[id(link)] = link
        return DNCState(
            h=torch.zeros(b, h, **kw),
            c=torch.zeros(b, h, **kw),
            memory=torch.zeros(b, n, w, **kw),
            usage=torch.zeros(b, n, **kw),
            link=link,
            precedence=torch.zeros(b, wr, links, **kw),
            read_weights=torch.zeros(b, r, n, **kw),
            write_weights=torch.zeros(b, wr, n, **kw),
            read_vectors=torch.zeros(b, r, w, **kw),
        )

    def forward(
        self, x: Tensor, state: DNCState | None = None, return_trace: bool = False
    ) -> tuple[Tensor, DNCState] | tuple[Tensor, DNCState, DNCTrace]:
        """Run the DNC over a sequence.

        Args:
            x: ``(B, T, D)`` inputs.
            state: previous :class:`DNCState`, or ``None`` for :meth:`initial_state`.
            return_trace: also return a :class:`DNCTrace` of per-step diagnostics.

        Returns:
            ``(y, state)`` or ``(y, state, trace)``; ``y`` is ``(B, T, O)``.
        """
        if (self.cuda_graphs and x.is_cuda and not (return_trace or self.compile_step)
                and not torch.compiler.is_compiling()):  # (a compiled graph of its own)
            args = (x,) if state is None else (x, *state)
            outputs = graph_cache(self).run(self._flat_forward, args)
            if outputs is not None:
                return outputs[0], DNCState(*outputs[1:])
        return self._forward(x, state, return_trace)

    def _flat_forward(self, x: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        """:meth:`forward` on and to flat tensors (what a CUDA graph captures)."""
        y, new_state = self._forward(x, DNCState(*state) if state else None)
        return (y, *new_state)

    def _forward(
        self, x: Tensor, state: DNCState | None, return_trace: bool = False
    ) -> tuple[Tensor, DNCState] | tuple[Tensor, DNCState, DNCTrace]:
        """The eager forward (see :meth:`forward`)."""
        batch, steps, _ = x.shape
        if state is None:  # in the parameters' dtype, also for low-precision x under autocast
            state = self.initial_state(batch, x.device)
        if self.compile_step and torch.is_grad_enabled():
            # One compiled graph serves every step: the first step's state must require grad
            # like the later ones (the compiled step is specialised on requires_grad).
            state = DNCState(*(t if t.requires_grad else t.detach().requires_grad_()
                               for t in state))
        gates = self.input_gates(x)
        if not (return_trace or self.compile_step) and self._native_step_serves(gates, state):
            return self._native_sequence(gates, state)
        x_gates = gates.unbind(1)
        hidden, reads, diags = [], [], []
        # A state that was never written has an all-zero link and precedence: the first
        # step's link update and directional reads are exact zeros, skipped (eager only:
        # a compiled step keeps one graph for every time step).
        skip_link = (self.temporal_links and not self.compile_step and self.link_free_start
                     and is_empty_link(state.link))
        for t in range(steps):
            state, diag = (compiled_step(x.device.type)(self, x_gates[t], state)
                           if self.compile_step
                           else self.step(x_gates[t], state, empty_link=skip_link and t == 0))
            hidden.append(state.h)
            reads.append(state.read_vectors.flatten(1))
            if return_trace:
                diags.append(tuple(d.detach() for d in diag))
        features = torch.cat([torch.stack(hidden, 1), torch.stack(reads, 1)], dim=-1)
        y = self.output(features)
        if not return_trace:
            return y, state
        return y, state, DNCTrace(*(torch.stack(ds, 1) for ds in zip(*diags, strict=True)))

    @property
    def link_free_start(self) -> bool:
        """Whether an empty link reads as zero: true without sharpening (a sharpened zero
        distribution is uniform)."""
        return not self.learned_sharpness and self.fixed_sharpness is None

    def step(self, x_gates: Tensor, state: DNCState, empty_link: bool = False
             ) -> tuple[DNCState, tuple[Tensor, ...]]:
        """One time step.

        Args:
            x_gates: ``(B, 4H)`` input contribution to the controller gates
                (``self.input_gates(x_t)``).
            state: previous :class:`DNCState`.
            empty_link: the state's link and precedence are all zero (a state never
                written, see :func:`is_empty_link`) and there is no sharpening: the link
                stays zero and the reads are the content reads scaled by their mode,
                exactly what the full update gives then, without computing it.

        Returns:
            ``(state, diagnostics)``; ``diagnostics`` holds the fields of :class:`DNCTrace`
            for this step (without the time dimension).
        """
        if self._native_step_serves(x_gates, state):
            return self._native_time_step(x_gates, state)
        h, c = self._controller(x_gates, state)
        raw = self.interface(h)
        if raw.dtype != state.memory.dtype:
            # Under autocast the controller's matmuls run in low precision; the addressing
            # (cosines, the allocation sort, products of usages, the link) stays in the state's.
            with torch.autocast(raw.device.type, enabled=False):
                return self._memory_step(raw.to(state.memory.dtype), h, c, state, empty_link)
        return self._memory_step(raw, h, c, state, empty_link)

    def _memory_step(
        self, raw: Tensor, h: Tensor, c: Tensor, state: DNCState, empty_link: bool = False
    ) -> tuple[DNCState, tuple[Tensor, ...]]:
        """The write and the read of one step, from the interface pre-activations ``raw``."""
        if self.clip_value is not None:
            raw = raw.clamp(-self.clip_value, self.clip_value)
        iface = self.layout.parse(raw, self._strength_fn)
        if (self.cpp_kernels == "step" and not torch.compiler.is_compiling()
                and dnc_native.usable(state.memory)):
            return self._native_memory_step(iface, h, c, state)

        usage, psi = addr.update_usage(
            state.usage,
            state.write_weights,
            iface.free_gates,
            state.read_weights,
            self.stop_write_gradient,
        )
        write_content = self._content(
            state.memory, iface.write_keys, iface.write_strengths, iface.write_masks
        )
        allocation = addr.write_allocation_weightings(
            usage, iface.allocation_gates * iface.write_gates
        )
        write_weights = addr.write_weighting(
            write_content, allocation, iface.allocation_gates, iface.write_gates
        )
        erase_and_write = kernels.fused_erase_and_write if self.fused else addr.erase_and_write
        memory = erase_and_write(
            state.memory,
            write_weights,
            iface.erase_vectors,
            iface.write_vectors,
            psi if self.dealloc else None,
        )
        read_content = self._content(
            memory, iface.read_keys, iface.read_strengths, iface.read_masks
        )
        if self.temporal_links and empty_link:
            # L' = (1 - w_i - w_j) 0 + w_i 0 = 0 and L' r = 0: only the content mode is left
            precedence = addr.update_precedence(state.precedence, write_weights)
            link, read_weights = state.link, iface.read_modes[..., -1:] * read_content
        elif self.temporal_links:
            link, precedence, read_weights = self._link_read(
                state, iface, write_weights, read_content
            )
        else:
            link, precedence, read_weights = state.link, state.precedence, read_content
        read_vectors = addr.read_vectors(read_weights, memory)

        new_state = DNCState(
            h, c, memory, usage, link, precedence, read_weights, write_weights, read_vectors
        )
        diagnostics = (
            read_weights,
            write_weights,
            allocation,
            usage,
            iface.allocation_gates,
            iface.write_gates,
            iface.free_gates,
            iface.read_modes,
        )
        return new_state, diagnostics

    def _native_memory_step(self, iface: Interface, h: Tensor, c: Tensor, state: DNCState
                            ) -> tuple[DNCState, tuple[Tensor, ...]]:
        """:meth:`_memory_step` as the C++ kernel (``cpp_kernels="step"`` under autocast,
        where the controller runs in low precision: one write head)."""
        # squeeze, not [:, 0]: a view whose backward is a view (select's fills zeros)
        outputs = kernels.fused_memory_step(
            state.memory, state.usage, state.link.squeeze(1), state.precedence.squeeze(1),
            state.read_weights, state.write_weights.squeeze(1), *_memory_fields(iface))
        return _native_state(h, c, *outputs, iface.allocation_gates.squeeze(1),
                             iface.write_gates.squeeze(1), iface.free_gates, iface.read_modes)

    def _native_step_serves(self, x_gates: Tensor, state: DNCState) -> bool:
        """Whether the C++ time step runs here (``cpp_kernels="step"``, eager, a CPU state
        in float32/64 and inputs of its dtype, no autocast)."""
        return (self.cpp_kernels == "step" and not torch.compiler.is_compiling()
                and dnc_native.usable(state.memory) and x_gates.dtype == state.memory.dtype
                and not torch.is_autocast_enabled(x_gates.device.type))

    def _native_sequence(self, x_gates: Tensor, state: DNCState) -> tuple[Tensor, DNCState]:
        """:meth:`_forward` over the whole sequence as one C++ call each way
        (:func:`~cl_lightning.models.dnc_kernels.fused_sequence`); ``x_gates`` ``(B, T, 4H)``."""
        features, h, c, read_vectors, memory, usage, link, precedence, reads, writes = \
            kernels.fused_sequence(
                self.reference_time_step, self.clip_value, self._strength_fn is addr.oneplus,
                x_gates, state.h, state.c, state.read_vectors, state.memory, state.usage,
                state.link.squeeze(1), state.precedence.squeeze(1), state.read_weights,
                state.write_weights.squeeze(1), self.recurrent_gates.weight,
                self.interface.weight, self.interface.bias)
        state = DNCState(h, c, memory, usage, link.unsqueeze(1), precedence.unsqueeze(1),
                         reads, writes.unsqueeze(1), read_vectors)
        return self.output(features), state

    def _native_time_step(self, x_gates: Tensor, state: DNCState
                          ) -> tuple[DNCState, tuple[Tensor, ...]]:
        """:meth:`step` as one C++ kernel (``cpp_kernels="step"``): controller, interface
        and memory step (:func:`~cl_lightning.models.dnc_kernels.fused_time_step`)."""
        outputs = kernels.fused_time_step(
            self.reference_time_step, self.clip_value, self._strength_fn is addr.oneplus,
            x_gates, state.h, state.c, state.read_vectors, state.memory, state.usage,
            state.link.squeeze(1), state.precedence.squeeze(1), state.read_weights,
            state.write_weights.squeeze(1), self.recurrent_gates.weight,
            self.interface.weight, self.interface.bias)
        return _native_state(*outputs)

    def reference_time_step(
        self, x_gates: Tensor, h: Tensor, c: Tensor, read_vectors: Tensor, memory: Tensor,
        usage: Tensor, link: Tensor, precedence: Tensor, prev_reads: Tensor,
        prev_writes: Tensor, recurrent_weight: Tensor, interface_weight: Tensor,
        interface_bias: Tensor,
    ) -> tuple[Tensor, ...]:
        """The time step :func:`~cl_lightning.models.dnc_kernels.fused_time_step` computes,
        in PyTorch operations, on its arguments (one write head: the link, precedence and
        write weights without the head dimension) and with this DNC's options."""
        h, c = lstm_cell(x_gates, read_vectors, h, c, recurrent_weight)
        raw = F.linear(h, interface_weight, interface_bias)
        if self.clip_value is not None:
            raw = raw.clamp(-self.clip_value, self.clip_value)
        iface = self.layout.parse(raw, self._strength_fn)
        outputs = kernels._memory_step_reference(
            memory, usage, link, precedence, prev_reads, prev_writes, *_memory_fields(iface))
        return (h, c, *outputs, iface.allocation_gates.squeeze(1), iface.write_gates.squeeze(1),
                iface.free_gates, iface.read_modes)

    def _link_read(
        self, state: DNCState, iface: Interface, write_weights: Tensor, read_content: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Link and precedence update, then the read weightings mixed by the read modes."""
        if self.fused:
            link, forward, backward = kernels.fused_link_read(
                state.link, state.precedence, write_weights, state.read_weights,
                native=self.cpp_kernels != "none",
            )
        else:
            link = addr.update_link(state.link, state.precedence, write_weights)
            forward, backward = addr.directional_weightings(link, state.read_weights)
        precedence = addr.update_precedence(state.precedence, write_weights)
        if self.learned_sharpness:
            forward = addr.sharpen(forward, iface.forward_sharpness)
            backward = addr.sharpen(backward, iface.backward_sharpness)
        elif self.fixed_sharpness is not None:
            forward = addr.sharpen(forward, self.fixed_sharpness)
            backward = addr.sharpen(backward, self.fixed_sharpness)
        read_weights = addr.read_weighting(read_content, forward, backward, iface.read_modes)
        return link, precedence, read_weights

    def _content(
        self, memory: Tensor, keys: Tensor, strengths: Tensor, mask: Tensor | None
    ) -> Tensor:
        """Content weighting ``(B, H, N)``, fused when possible."""
        if self.fused and mask is None:
            return kernels.fused_content_weighting(memory, keys, strengths)
        return addr.content_weighting(memory, keys, strengths, mask)

    def _controller(self, x_gates: Tensor, state: DNCState) -> tuple[Tensor, Tensor]:
        """LSTM cell on ``x_t ⊕ r_{t-1}``; returns ``(h, c)``, each ``(B, H)``."""
        return lstm_cell(x_gates, state.read_vectors, state.h, state.c,
                         self.recurrent_gates.weight)

    def extra_repr(self) -> str:
        return (
            f"N={self.memory_slots}, W={self.word_size}, R={self.read_heads}, "
            f"Wr={self.write_heads}, H={self.hidden_size}, masking={self.masking}, "
            f"dealloc={self.dealloc}, sharpness={self.learned_sharpness or self.fixed_sharpness}"
            + (", compile_step=True" if self.compile_step else "")
            + ("" if self.temporal_links else ", temporal_links=False")
            + ("" if self.cuda_graphs else ", cuda_graphs=False")
            + ("" if self.cpp_kernels == "none" else f", cpp_kernels={self.cpp_kernels}")
        )


def compile_for_device(fn: Callable[..., Any], device_type: str) -> Callable[..., Any]:
    """``torch.compile(fn)`` with the options for ``device_type``: on a CPU inductor's C++
    wrapper calls the kernels without Python in between (about 20% faster per DNC step at
    B 32)."""
    options = {"cpp_wrapper": True} if device_type == "cpu" else None
    return torch.compile(fn, options=options)


@functools.cache
def compiled_step(device_type: str = "cpu") -> Callable[..., tuple[DNCState, tuple[Tensor, ...]]]:
    """``DNC.step`` through ``torch.compile``, shared by every DNC and called with the module
    as its first argument: no compiled function is stored on an instance, so deepcopy (ESMER's
    semantic memory), pickling and checkpoints see a plain module, and a copy never runs
    through a function bound to its original. Built on first use (importing the compiler
    costs seconds), one per device type (:func:`compile_for_device`)."""
    return compile_for_device(DNC.step, device_type)
