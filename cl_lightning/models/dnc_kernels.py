"""Fused autograd kernels for the DNC step, equal to the reference math.

Each kernel computes the values and gradients of a composition of functions from
:mod:`cl_lightning.models.dnc_addressing` (the readable reference math), equal up to float
rounding, with a hand-written backward pass that makes far fewer passes over the large
``(B, N, W)`` memory and ``(B, Wr, N, N)`` link tensors, which dominate CPU time in eager mode.
:class:`~cl_lightning.models.dnc.DNC` uses them by default (``fused=True``).

Kernels and the reference composition each one equals:

* :func:`fused_content_weighting`:
  :func:`~cl_lightning.models.dnc_addressing.content_weighting` without a mask.
* :func:`fused_erase_and_write`: :func:`~cl_lightning.models.dnc_addressing.erase_and_write`;
  fused for one write head, with several heads it runs the reference function.
* :func:`fused_link_read`: :func:`~cl_lightning.models.dnc_addressing.update_link`, then
  :func:`~cl_lightning.models.dnc_addressing.directional_weightings` on the new link. Under
  ``torch.compile`` it is a ``torch.library`` custom operator (``cl_lightning::dnc_link_read``),
  so a compiled DNC step calls it as one kernel instead of tracing it; eagerly the same
  functions run as a plain autograd function (the operator's wrappers are slower). With
  ``native=True`` it runs the C++ kernel of :mod:`~cl_lightning.models.dnc_native`.
* :func:`fused_memory_step` (C++ only, one write head): a whole memory step, from
  :func:`~cl_lightning.models.dnc_addressing.update_usage` to
  :func:`~cl_lightning.models.dnc_addressing.read_vectors` (:func:`_memory_step_reference`).
* :func:`fused_time_step` (C++ only, one write head): a whole time step, the LSTM controller
  and the interface layer before that memory step
  (:meth:`~cl_lightning.models.dnc.DNC.reference_time_step`).
* :func:`fused_sequence` (C++ only, one write head): those time steps over a whole input
  sequence in one call each way (:func:`sequence_reference`).

When a backward pass is itself differentiated (``create_graph=True``, e.g. second-order
MAML), the kernels differentiate through the reference function instead, so higher-order
gradients stay exact. ``tests/test_dnc.py`` holds every kernel equal to its reference
composition: values, first-order gradients (hand-written and ``create_graph=True``) and
second-order gradients in float64 and float32, then ``gradcheck`` and ``gradgradcheck``.

Shape letters are those of :mod:`cl_lightning.models.dnc_addressing`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from cl_lightning.models import dnc_native
from cl_lightning.models.dnc_addressing import (
    EPSILON,
    allocation_weighting,
    content_weighting,
    directional_weightings,
    erase_and_write,
    read_vectors,
    read_weighting,
    update_link,
    update_precedence,
    update_usage,
    write_weighting,
)


def _reference_grads(reference, inputs: tuple, grads: tuple) -> tuple:
    """Differentiable gradients of ``reference(*inputs)`` for ``grads`` (one per output).

    The inputs are first aliased by a view: gradients are then captured right at this
    function's inputs, even when one input depends on another through the outer graph (e.g.
    keys computed from earlier reads of the same memory), while the returned gradients stay
    connected to the real inputs for the next order of differentiation.
    """
    wanted = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    with torch.enable_grad():
        inputs = tuple(t.view_as(t) if i in wanted else t for i, t in enumerate(inputs))
        outputs = reference(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    found = torch.autograd.grad(
        outputs, [inputs[i] for i in wanted], grads, create_graph=True, allow_unused=True
    )
    result = [None] * len(inputs)
    for i, g in zip(wanted, found, strict=True):
        result[i] = g
    return tuple(result)


class _CosineSoftmax(torch.autograd.Function):
    """:func:`content_weighting` without a mask."""

    @staticmethod
    def forward(ctx, memory, keys, strengths, eps):
        dot = torch.bmm(keys, memory.transpose(1, 2))
        mem_norm = torch.linalg.vector_norm(memory, dim=-1).square_().add_(eps).sqrt_()
        key_norm = torch.sqrt(keys.pow(2).sum(-1) + eps)
        denom = key_norm.unsqueeze(-1) * mem_norm.unsqueeze(1) + eps
        similarity = dot / denom
        weights = torch.softmax(similarity * strengths.unsqueeze(-1), dim=-1)
        ctx.eps = eps
        ctx.save_for_backward(
            memory, keys, strengths, mem_norm, key_norm, denom, similarity, weights
        )
        return weights

    @staticmethod
    def backward(ctx, g_weights):
        memory, keys, strengths, mem_norm, key_norm, denom, similarity, weights = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _reference_grads(
                content_weighting, (memory, keys, strengths, None, ctx.eps), (g_weights,)
            )[:3] + (None,)
        g_logits = weights * (g_weights - (g_weights * weights).sum(-1, keepdim=True))
        g_strengths = (g_logits * similarity).sum(-1)
        g_dot = g_logits * strengths.unsqueeze(-1) / denom
        g_denom = -g_dot * similarity
        g_mem_norm = (g_denom * key_norm.unsqueeze(-1)).sum(1)
        g_key_norm = (g_denom * mem_norm.unsqueeze(1)).sum(-1)
        if keys.shape[1] == 1:  # an outer product: CPU bmm is slow with an inner size of 1
            g_memory = g_dot.transpose(1, 2).expand_as(memory) * keys
        else:
            g_memory = torch.bmm(g_dot.transpose(1, 2), keys)
        g_memory.addcmul_(memory, (g_mem_norm / mem_norm).unsqueeze(-1).expand_as(memory))
        g_keys = torch.bmm(g_dot, memory).addcmul_(keys, (g_key_norm / key_norm).unsqueeze(-1))
        return g_memory, g_keys, g_strengths, None


def fused_content_weighting(
    memory: Tensor, keys: Tensor, strengths: Tensor, eps: float = EPSILON
) -> Tensor:
    """Same as :func:`content_weighting` without a mask; ``(B, N, W), (B, H, W), (B, H)``
    in, ``(B, H, N)`` out."""
    return _CosineSoftmax.apply(memory, keys, strengths, eps)


def _erase_write_one_head(memory, weights, erase, values, psi):
    """:func:`erase_and_write` with the write-head axis squeezed (reference for the fused op)."""
    return erase_and_write(
        memory, weights.unsqueeze(1), erase.unsqueeze(1), values.unsqueeze(1), psi
    )


class _EraseWrite(torch.autograd.Function):
    """:func:`erase_and_write` for a single write head (squeezed head axis)."""

    @staticmethod
    def forward(ctx, memory, weights, erase, values, psi):
        weights_col = weights.unsqueeze(-1).expand_as(memory)
        out = torch.mul(weights_col, erase.unsqueeze(1)).neg_().add_(1.0)
        if psi is not None:
            out.mul_(psi.unsqueeze(-1).expand_as(memory))
        out.mul_(memory).addcmul_(weights_col, values.unsqueeze(1))
        ctx.save_for_backward(memory, weights, erase, values, psi)
        return out

    @staticmethod
    def backward(ctx, grad):
        memory, weights, erase, values, psi = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _reference_grads(_erase_write_one_head, ctx.saved_tensors, (grad,))
        grad_mem = grad * memory
        # Row-vector products: PyTorch's CPU bmm is slow for a (B, N, W) @ (B, W, 1) shape.
        grad_mem_e = torch.bmm(erase.unsqueeze(1), grad_mem.transpose(1, 2)).squeeze(1)
        g_values = torch.bmm(weights.unsqueeze(1), grad).squeeze(1)
        g_weights = torch.bmm(values.unsqueeze(1), grad.transpose(1, 2)).squeeze(1)
        g_psi = None
        erase_scale = weights
        if psi is not None:
            g_psi = grad_mem.sum(-1) - weights * grad_mem_e
            grad_mem_e = grad_mem_e * psi
            erase_scale = weights * psi
        g_weights = g_weights - grad_mem_e
        g_erase = torch.bmm(erase_scale.unsqueeze(1), grad_mem).squeeze(1).neg_()
        # grad_mem is no longer needed: reuse its buffer.
        weights_col = weights.unsqueeze(-1).expand_as(memory)
        g_memory = torch.mul(weights_col, erase.unsqueeze(1), out=grad_mem).neg_().add_(1.0)
        if psi is not None:
            g_memory.mul_(psi.unsqueeze(-1).expand_as(memory))
        return g_memory.mul_(grad), g_weights, g_erase, g_values, g_psi


def fused_erase_and_write(
    memory: Tensor,
    write_weights: Tensor,
    erase_vectors: Tensor,
    write_vectors: Tensor,
    psi: Tensor | None = None,
) -> Tensor:
    """Same as :func:`erase_and_write`; fused for one write head, plain otherwise."""
    if write_weights.shape[1] != 1:
        return erase_and_write(memory, write_weights, erase_vectors, write_vectors, psi)
    # squeeze, not [:, 0]: a view whose backward is a view too (select's allocates zeros)
    return _EraseWrite.apply(
        memory, write_weights.squeeze(1), erase_vectors.squeeze(1), write_vectors.squeeze(1),
        psi
    )


def _link_read_reference(link, prev_precedence, write_weights, prev_read_weights):
    """:func:`update_link` + :func:`directional_weightings`, outputs in the fused op's layout."""
    new_link = update_link(link, prev_precedence, write_weights)
    forward, backward = directional_weightings(new_link, prev_read_weights)
    return new_link, forward.transpose(1, 2), backward.transpose(1, 2)


def _link_read_forward(
    link: Tensor, prev_precedence: Tensor, write_weights: Tensor, prev_read_weights: Tensor,
    native: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Values of :func:`_link_read_reference`, with ``(B, Wr, R, N)`` directional outputs.

    Work is done on ``(B * Wr, N, N)`` views; row-broadcast operands are expanded explicitly
    because PyTorch's CPU kernels are several times slower on a trailing broadcast dimension.
    With ``native`` (and a tensor :func:`~cl_lightning.models.dnc_native.usable`) the
    C++ kernel computes the same in one pass per link matrix.
    """
    batch, num_writes, n, _ = link.shape
    num_reads = prev_read_weights.shape[1]
    out_shape = (batch, num_writes, num_reads, n)
    if native and dnc_native.usable(link):
        new_link, forward, backward = dnc_native.load().link_read_forward(
            link.reshape(-1, n, n).contiguous(), prev_precedence.reshape(-1, n).contiguous(),
            write_weights.reshape(-1, n).contiguous(),
            _per_write_head(prev_read_weights, num_writes).contiguous())
        return new_link.view_as(link), forward.view(out_shape), backward.view(out_shape)
    flat_link = link.reshape(-1, n, n)
    w = write_weights.reshape(-1, n)
    new_link = _link_scale(w, flat_link.shape).mul_(flat_link)
    new_link.addcmul_(w.unsqueeze(-1).expand_as(new_link), prev_precedence.reshape(-1, 1, n))
    new_link.diagonal(dim1=-2, dim2=-1).zero_()
    reads = _per_write_head(prev_read_weights, num_writes)
    forward = torch.bmm(reads, new_link.transpose(1, 2))
    backward = torch.bmm(reads, new_link)
    return new_link.view_as(link), forward.view(out_shape), backward.view(out_shape)


def _link_read_backward(
    link: Tensor,
    prec: Tensor,
    w: Tensor,
    prev_reads: Tensor,
    new_link: Tensor,
    g_link: Tensor,
    g_forward: Tensor,
    g_backward: Tensor,
    native: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """First-order gradients of :func:`_link_read_forward` (``new_link`` is its output),
    touching each ``N x N`` matrix as few times as possible.

    Autograd on the composite needs about twice as many passes over the ``(B, Wr, N, N)``
    tensors (broadcast reductions, a copy for the zeroed diagonal, one gradient accumulation
    per use of the link). Only tensors that exist anyway (old and new link) are needed.
    With ``native`` the C++ kernel makes one pass (see :func:`_link_read_forward`).
    """
    batch, num_writes, num_reads, n = g_forward.shape
    link, new_link = link.reshape(-1, n, n), new_link.reshape(-1, n, n)
    prec, w = prec.reshape(-1, n), w.reshape(-1, n)
    reads = _per_write_head(prev_reads, num_writes)
    # Incoming gradients may be strided views; CPU bmm falls back to a per-sample loop then.
    g_forward = g_forward.reshape(-1, num_reads, n).contiguous()
    g_backward = g_backward.reshape(-1, num_reads, n).contiguous()
    if native and dnc_native.usable(link):
        g_link_prev, g_prec, g_write, g_reads = dnc_native.load().link_read_backward(
            link.contiguous(), prec.contiguous(), w.contiguous(), reads.contiguous(),
            g_link.reshape(-1, n, n).contiguous(), g_forward, g_backward)
        return (
            g_link_prev.view(batch, num_writes, n, n),
            g_prec.view(batch, num_writes, n),
            g_write.view(batch, num_writes, n),
            g_reads.view(batch, num_writes, num_reads, n).sum(1),
        )
    g_reads = torch.bmm(g_forward, new_link) + torch.bmm(g_backward, new_link.transpose(1, 2))
    g_reads = g_reads.view(batch, num_writes, num_reads, n).sum(1)
    # Total gradient of the new link: from later steps and from both directional reads.
    left = torch.cat([g_forward, reads], dim=1).transpose(1, 2)
    right = torch.cat([reads, g_backward], dim=1)
    grad = torch.baddbmm(g_link.reshape(-1, n, n), left, right)
    # The new link's diagonal is constant zero: drop its gradient with O(N) corrections.
    g_diag = grad.diagonal(dim1=-2, dim2=-1)
    buffer = grad * link
    g_write = torch.bmm(prec.unsqueeze(1), grad.transpose(1, 2)).squeeze(1)
    g_write = g_write - g_diag * prec - buffer.sum(-1) - buffer.sum(-2)
    g_prec = torch.bmm(w.unsqueeze(1), grad).squeeze(1) - g_diag * w
    # Reuse the (cache-hot) product buffer for the scale instead of a fresh one.
    g_link_prev = _link_scale(w, grad.shape, out=buffer).mul_(grad)
    g_link_prev.diagonal(dim1=-2, dim2=-1).zero_()
    return (
        g_link_prev.view(batch, num_writes, n, n),
        g_prec.view(batch, num_writes, n),
        g_write.view(batch, num_writes, n),
        g_reads,
    )


# The link kernel is a custom operator so that ``torch.compile`` calls it as one opaque
# kernel (hand-written passes, MKL batched matmuls) instead of tracing it into generated
# loops, which are several times slower for these ``N x N`` reductions.
_link_read_op = torch.library.custom_op(
    "cl_lightning::dnc_link_read", _link_read_forward, mutates_args=())


@_link_read_op.register_fake
def _(link, prev_precedence, write_weights, prev_read_weights, native=False):
    batch, num_writes, n, _ = link.shape
    out_shape = (batch, num_writes, prev_read_weights.shape[1], n)
    return link.new_empty(link.shape), link.new_empty(out_shape), link.new_empty(out_shape)


_link_read_backward_op = torch.library.custom_op(
    "cl_lightning::dnc_link_read_backward", _link_read_backward, mutates_args=())


@_link_read_backward_op.register_fake
def _(link, prec, w, prev_reads, new_link, g_link, g_forward, g_backward, native=False):
    return (link.new_empty(link.shape), prec.new_empty(prec.shape), w.new_empty(w.shape),
            prev_reads.new_empty(prev_reads.shape))


def _link_read_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:4], output[0])
    ctx.native = inputs[4]


def _link_read_grads(ctx, g_link, g_forward, g_backward, backward=_link_read_backward_op):
    link, prec, w, prev_reads, new_link = ctx.saved_tensors
    if torch.is_grad_enabled():
        return _reference_grads(
            _link_read_reference, (link, prec, w, prev_reads), (g_link, g_forward, g_backward)
        ) + (None,)
    g_link = torch.zeros_like(new_link) if g_link is None else g_link
    g_forward = torch.zeros_like(g_backward) if g_forward is None else g_forward
    g_backward = torch.zeros_like(g_forward) if g_backward is None else g_backward
    return backward(link, prec, w, prev_reads, new_link, g_link, g_forward, g_backward,
                    ctx.native) + (None,)


_link_read_op.register_autograd(_link_read_grads, setup_context=_link_read_setup)


class _LinkRead(torch.autograd.Function):
    """The same kernel as a plain autograd function, for eager mode: the custom operator's
    Python wrappers cost about 0.4 ms per call and backward on a CPU (an output clone and
    the generated autograd glue), more than the kernel itself at small sizes."""

    @staticmethod
    def forward(ctx, link, prev_precedence, write_weights, prev_read_weights, native):
        inputs = (link, prev_precedence, write_weights, prev_read_weights, native)
        outputs = _link_read_forward(*inputs)
        _link_read_setup(ctx, inputs, outputs)
        return outputs

    @staticmethod
    def backward(ctx, g_link, g_forward, g_backward):
        return _link_read_grads(ctx, g_link, g_forward, g_backward, _link_read_backward)


def _link_scale(w: Tensor, shape: torch.Size, out: Tensor | None = None) -> Tensor:
    """``(1 - w_i - w_j)`` as a ``(B', N, N)`` tensor from ``w: (B', N)`` (into ``out``)."""
    return torch.sub((1.0 - w).unsqueeze(-1).expand(shape), w.unsqueeze(-2), out=out)


def _per_write_head(read_weights: Tensor, num_writes: int) -> Tensor:
    """``(B, R, N)`` read weights repeated for each write head as ``(B * Wr, R, N)``."""
    if num_writes == 1:
        return read_weights
    batch, num_reads, n = read_weights.shape
    expanded = read_weights.unsqueeze(1).expand(batch, num_writes, num_reads, n)
    return expanded.reshape(-1, num_reads, n)


def fused_link_read(
    link: Tensor, prev_precedence: Tensor, write_weights: Tensor, prev_read_weights: Tensor,
    native: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Same values and gradients as :func:`update_link` + :func:`directional_weightings`, faster.

    Args:
        link: ``(B, Wr, N, N)`` previous link matrices (zero diagonal).
        prev_precedence: ``(B, Wr, N)`` previous precedence weightings.
        write_weights: ``(B, Wr, N)`` current write weightings.
        prev_read_weights: ``(B, R, N)`` read weightings of the previous step.
        native: on a CPU, compute with the C++ kernel of
            :mod:`~cl_lightning.models.dnc_native` (one pass per link matrix each way,
            equal to float rounding); elsewhere, or for other dtypes, the ATen path.

    Returns:
        ``(new_link, forward, backward)``: ``(B, Wr, N, N)``, ``(B, R, Wr, N)``, ``(B, R, Wr, N)``.
    """
    op = _link_read_op if torch.compiler.is_compiling() else _LinkRead.apply
    new_link, forward, backward = op(
        link, prev_precedence, write_weights, prev_read_weights, native)
    return new_link, forward.transpose(1, 2), backward.transpose(1, 2)


def _memory_step_reference(memory, usage, link, precedence, prev_reads, prev_writes, read_keys,
                           read_strengths, write_key, write_strength, erase, write_vector,
                           free_gates, allocation_gate, write_gate, read_modes):
    """The composition :func:`fused_memory_step` computes, from the reference functions (one
    write head, the previous write weights as constants; shapes as it takes them)."""
    new_usage, _ = update_usage(usage, prev_writes.unsqueeze(1), free_gates, prev_reads)
    write_content = content_weighting(memory, write_key.unsqueeze(1), write_strength[:, None])
    allocation = allocation_weighting(new_usage)
    writes = write_weighting(write_content, allocation.unsqueeze(1), allocation_gate[:, None],
                             write_gate[:, None])
    new_memory = erase_and_write(memory, writes, erase.unsqueeze(1), write_vector.unsqueeze(1))
    read_content = content_weighting(new_memory, read_keys, read_strengths)
    new_link = update_link(link.unsqueeze(1), precedence.unsqueeze(1), writes)
    forward, backward = directional_weightings(new_link, prev_reads)
    new_precedence = update_precedence(precedence.unsqueeze(1), writes)
    reads = read_weighting(read_content, forward, backward, read_modes)
    return (new_memory, new_usage, new_link[:, 0], new_precedence[:, 0], reads, writes[:, 0],
            read_vectors(reads, new_memory), allocation)


# Which saved tensors give the shape of each output's zero gradient (an unused output).
_OUTPUT_SHAPES = (16, 17, 2, 3, 18, 19, 6, 20)


class _MemoryStep(torch.autograd.Function):
    """:func:`_memory_step_reference` through the C++ kernel, forward and backward."""

    @staticmethod
    def forward(ctx, *inputs):
        out = dnc_native.load().memory_step_forward([t.contiguous() for t in inputs])
        # new memory, usage, reads, writes, allocation, then the kernel's intermediates
        ctx.save_for_backward(*inputs, out[0], out[1], out[4], out[5], *out[7:])
        return tuple(out[:8])

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        grads = tuple(torch.zeros_like(saved[i]) if g is None else g
                      for g, i in zip(grads, _OUTPUT_SHAPES, strict=True))
        if torch.is_grad_enabled():
            return _reference_grads(_memory_step_reference, saved[:16], grads)
        found = dnc_native.load().memory_step_backward(
            [t.contiguous() for t in saved], [g.contiguous() for g in grads])
        found[5] = None  # the previous write weights are constants (stop-gradient)
        return tuple(found)


def fused_memory_step(memory: Tensor, usage: Tensor, link: Tensor, precedence: Tensor,
                      prev_reads: Tensor, prev_writes: Tensor, read_keys: Tensor,
                      read_strengths: Tensor, write_key: Tensor, write_strength: Tensor,
                      erase: Tensor, write_vector: Tensor, free_gates: Tensor,
                      allocation_gate: Tensor, write_gate: Tensor, read_modes: Tensor
                      ) -> tuple[Tensor, ...]:
    """One DNC memory step with one write head as the C++ kernel of
    :mod:`~cl_lightning.models.dnc_native` (CPU, float32 or float64), equal to
    :func:`_memory_step_reference` to float rounding, first-order gradients by hand and
    higher orders through the reference.

    Shapes: memory ``(B, N, W)``; usage, precedence, prev_writes ``(B, N)``; link ``(B, N, N)``;
    prev_reads ``(B, R, N)``; read_keys ``(B, R, W)``; read_strengths, free_gates ``(B, R)``;
    write_key, erase, write_vector ``(B, W)``; write_strength, allocation_gate, write_gate
    ``(B,)``; read_modes ``(B, R, 3)`` (backward, forward, content).

    Returns:
        ``(memory, usage, link, precedence, read_weights, write_weights, read_vectors,
        allocation)`` after the step.
    """
    return _MemoryStep.apply(memory, usage, link, precedence, prev_reads, prev_writes,
                             read_keys, read_strengths, write_key, write_strength, erase,
                             write_vector, free_gates, allocation_gate, write_gate, read_modes)


def _keep_for_native_backward(ctx, reference, clip, inputs: tuple, outputs: list,
                              saved: list) -> tuple:
    """Keeps on ``ctx`` what :func:`_native_backward` reads: the PyTorch reference, the clip,
    the inputs, the C++ forward's intermediates, the outputs' shapes. Returns the outputs."""
    ctx.reference, ctx.clip, ctx.count = reference, clip, len(inputs)
    ctx.shapes = [(t.shape, t.dtype) for t in outputs]
    ctx.save_for_backward(*inputs, *saved)
    return tuple(outputs)


def _native_backward(ctx, grads: tuple, native) -> tuple:
    """The inputs' gradients of a C++ kernel's autograd node: ``native(intermediates, grads)``
    (the C++ backward), or through the PyTorch reference where the backward itself is
    differentiated (second order). Outputs without a gradient count as zero."""
    saved = ctx.saved_tensors
    grads = tuple(g if g is not None else torch.zeros(shape, dtype=dtype)
                  for g, (shape, dtype) in zip(grads, ctx.shapes, strict=True))
    if torch.is_grad_enabled():
        return _reference_grads(ctx.reference, saved[:ctx.count], grads)
    return native(list(saved[ctx.count:]), grads)


class _TimeStep(torch.autograd.Function):
    """A whole DNC time step through the C++ kernel (:func:`fused_time_step`)."""

    @staticmethod
    def forward(ctx, reference, clip, oneplus, *inputs):
        outputs, saved = dnc_native.load().time_step_forward(
            [t.contiguous() for t in inputs], clip, oneplus)
        # the gates and modes are diagnostics here; their gradients are still exact
        return _keep_for_native_backward(ctx, reference, clip, inputs, outputs, saved)

    @staticmethod
    def backward(ctx, *grads):
        found = _native_backward(ctx, grads, lambda saved, grads: dnc_native.load()
                                 .time_step_backward(saved, [g.contiguous() for g in grads],
                                                     ctx.clip))
        return (None, None, None, *found)


def fused_time_step(reference, clip: float | None, oneplus: bool, x_gates: Tensor, h: Tensor,
                    c: Tensor, read_vectors: Tensor, memory: Tensor, usage: Tensor, link: Tensor,
                    precedence: Tensor, prev_reads: Tensor, prev_writes: Tensor,
                    recurrent_weight: Tensor, interface_weight: Tensor, interface_bias: Tensor
                    ) -> tuple[Tensor, ...]:
    """One whole DNC time step with one write head (LSTM controller, interface layer and
    activations, memory step) as the C++ kernel of :mod:`~cl_lightning.models.dnc_native`
    (CPU, float32 or float64).

    ``reference(x_gates, ..., interface_bias)`` is the same step in PyTorch operations
    (:meth:`~cl_lightning.models.dnc.DNC.reference_time_step`): values and first-order
    gradients equal it to float rounding, and higher orders differentiate through it.
    ``clip``: the clamp of the interface pre-activations (``None``: none); ``oneplus``: the
    strengths are ``1 + softplus`` rather than ``softplus``. Shapes as
    :func:`fused_memory_step` takes them; ``x_gates`` ``(B, 4H)``, ``h``, ``c`` ``(B, H)``,
    ``read_vectors`` ``(B, R, W)``.

    Returns:
        ``(h, c, memory, usage, link, precedence, read_weights, write_weights, read_vectors,
        allocation, allocation_gate, write_gate, free_gates, read_modes)`` after the step.
    """
    return _TimeStep.apply(reference, float(clip or 0.0), oneplus, x_gates, h, c, read_vectors,
                           memory, usage, link, precedence, prev_reads, prev_writes,
                           recurrent_weight, interface_weight, interface_bias)


# the time step's outputs that become the next step's state, in the state's argument order
# (h, c, read_vectors, memory, usage, link, precedence, read weights, write weights)
_NEXT_STATE = (0, 1, 8, 2, 3, 4, 5, 6, 7)


def sequence_reference(step_reference, x_gates: Tensor, *state_and_weights: Tensor
                       ) -> tuple[Tensor, ...]:
    """The time steps of :func:`fused_sequence` in PyTorch operations: ``step_reference``
    (the arguments and outputs of :func:`fused_time_step`) over ``x_gates`` ``(B, T, 4H)``
    from the state ``h, c, read_vectors, memory, usage, link, precedence, prev_reads,
    prev_writes``, with the weights ``recurrent_weight, interface_weight, interface_bias``.

    Returns:
        ``features (B, T, H + R W)``: each step's ``[h | read vectors]``, then the state
        after the last step in the order it was given.
    """
    state, weights = list(state_and_weights[:9]), state_and_weights[9:]
    features = []
    for x_t in x_gates.unbind(1):
        out = step_reference(x_t, *state, *weights)
        state = [out[k] for k in _NEXT_STATE]
        features.append(torch.cat([out[0], out[8].flatten(1)], 1))
    return (torch.stack(features, 1), *state)



def _run_sequence(args: tuple[Tensor, ...], clip: float, oneplus: bool, keep: bool
                  ) -> tuple[list[Tensor], list[Tensor]]:
    """The C++ forward over :func:`fused_sequence`'s arguments: its outputs, and what its
    backward reads (each step's intermediates; none without ``keep``). The kernel reads the
    arguments' values only: detached, the views it takes of them at every step carry no
    autograd metadata."""
    args = [t.detach() for t in args]
    state = [t.contiguous() for t in args[1:10]]
    return dnc_native.load().sequence_forward(args[0], state, args[10:], clip, oneplus, keep)


class _Sequence(torch.autograd.Function):
    """A DNC's time steps over a whole sequence through the C++ kernel
    (:func:`fused_sequence`)."""

    @staticmethod
    def forward(ctx, reference, clip, oneplus, *inputs):
        outputs, saved = _run_sequence(inputs, clip, oneplus, keep=True)
        return _keep_for_native_backward(ctx, reference, clip, inputs, outputs, saved)

    @staticmethod
    def backward(ctx, *grads):
        found = _native_backward(ctx, grads, lambda saved, grads: dnc_native.load()
                                 .sequence_backward(saved, grads[0].contiguous(),
                                                    list(grads[1:]), ctx.clip))
        return (None, None, None, *found)


def fused_sequence(step_reference, clip: float | None, oneplus: bool, x_gates: Tensor,
                   h: Tensor, c: Tensor, read_vectors: Tensor, memory: Tensor, usage: Tensor,
                   link: Tensor, precedence: Tensor, prev_reads: Tensor, prev_writes: Tensor,
                   recurrent_weight: Tensor, interface_weight: Tensor, interface_bias: Tensor
                   ) -> tuple[Tensor, ...]:
    """The DNC's time steps over a whole sequence as one C++ call each way: the steps of
    :func:`fused_time_step` in a loop, ``x_gates`` ``(B, T, 4H)`` (the inputs' gate
    contributions), the other arguments and the options as there. Values and first-order
    gradients equal :func:`sequence_reference` over ``step_reference`` to float rounding;
    higher orders differentiate through it.

    Returns:
        ``features (B, T, H + R W)`` (each step's ``[h | read vectors]``), then the state
        after the last step: ``h, c, read_vectors, memory, usage, link, precedence,
        read_weights, write_weights``.
    """
    args = (x_gates, h, c, read_vectors, memory, usage, link, precedence, prev_reads,
            prev_writes, recurrent_weight, interface_weight, interface_bias)
    clip = float(clip or 0.0)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in args)):
        # nothing to differentiate: no autograd node, no step's intermediates kept
        return tuple(_run_sequence(args, clip, oneplus, keep=False)[0])
    reference = functools.partial(sequence_reference, step_reference)
    return _Sequence.apply(reference, clip, oneplus, *args)
