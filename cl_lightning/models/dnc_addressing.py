"""Reference math for the memory addressing of a Differentiable Neural Computer.

Readable, pure tensor functions, differentiated by plain autograd. Faster versions of the
hottest compositions, with hand-written backward passes, are in
:mod:`cl_lightning.models.dnc_kernels`; tests hold them equal to the functions here.

The maths follows Graves et al. (Nature 2016) as realised in DeepMind's reference code
(``dnc/addressing.py`` and ``dnc/access.py``), with the optional extensions of Csordás &
Schmidhuber (ICLR 2019): key/memory masking, de-allocation and link-distribution sharpening.

Shape letters used throughout:

* ``B``  batch size
* ``N``  number of memory slots
* ``W``  word size
* ``R``  number of read heads
* ``Wr`` number of write heads (``H`` in some docstrings where it means "any number of heads")

Every function is stateless and batched over all heads; none of them loops over the batch.
The only loop is over write heads inside :func:`write_allocation_weightings`, which is
sequential by definition (each head allocates after the previous one has claimed its slots).

No function here waits on the device: autograd's own backward passes of ``torch.prod`` and
``torch.cumprod`` test the input for zeros on the host (a GPU synchronisation, which also
makes a step impossible to capture as a CUDA graph), so products over heads are chains of
multiplications (:func:`product`) and the allocation's cumulative product has its own
backward (:func:`exclusive_cumprod`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPSILON = 1e-6
"""Small constant keeping norms, usages and link distributions away from zero."""


def oneplus(x: Tensor) -> Tensor:
    """``1 + softplus(x)``: maps reals to ``[1, inf)`` (strengths in the Nature paper)."""
    return 1.0 + F.softplus(x)


def content_weighting(
    memory: Tensor,
    keys: Tensor,
    strengths: Tensor,
    mask: Tensor | None = None,
    eps: float = EPSILON,
) -> Tensor:
    """Content-based address: softmax over slots of strength-scaled cosine similarity.

    ``sim[b, h, n] = <k, M_n> / (sqrt(|k|^2 + eps) * sqrt(|M_n|^2 + eps) + eps)``, so all-zero
    keys or memory give similarity 0 (a uniform weighting) with finite gradients.

    With ``mask`` (Csordás & Schmidhuber 2019, "memory masking") both the key and every memory
    word are multiplied element-wise by the head's mask before the cosine is taken, so that
    only the "key part" of a word takes part in the look-up. The masked memory is never
    materialised: ``<k*m, M_n*m> = <k*m*m, M_n>`` and ``|M_n*m|^2 = <m*m, M_n*M_n>``.

    Args:
        memory: ``(B, N, W)`` memory matrix.
        keys: ``(B, H, W)`` look-up keys, one per head.
        strengths: ``(B, H)`` positive (already activated) key strengths.
        mask: optional ``(B, H, W)`` mask with entries in ``[0, 1]``.
        eps: numerical epsilon.

    Returns:
        ``(B, H, N)`` weightings, each row a distribution over slots.
    """
    if mask is None:
        dot = torch.bmm(keys, memory.transpose(1, 2))
        mem_norm = torch.sqrt(memory.pow(2).sum(-1) + eps).unsqueeze(1)
        key_norm = torch.sqrt(keys.pow(2).sum(-1) + eps).unsqueeze(-1)
    else:
        mask_sq = mask * mask
        dot = torch.bmm(keys * mask_sq, memory.transpose(1, 2))
        mem_norm = torch.sqrt(torch.bmm(mask_sq, memory.pow(2).transpose(1, 2)) + eps)
        key_norm = torch.sqrt((keys * mask).pow(2).sum(-1) + eps).unsqueeze(-1)
    similarity = dot / (key_norm * mem_norm + eps)
    return torch.softmax(similarity * strengths.unsqueeze(-1), dim=-1)


def product(x: Tensor, dim: int) -> Tensor:
    """Product over a short dimension (heads) as a chain of multiplications.

    Equal to ``torch.prod(x, dim)``, but its gradient is the product rule's, with no host
    check for zeros (see the module docstring). Meant for a handful of factors.
    """
    factors = x.unbind(dim)
    out = factors[0]
    for factor in factors[1:]:
        out = out * factor
    return out


class _ExclusiveCumprod(torch.autograd.Function):
    """``[1, x_0, x_0 x_1, ...]`` along the last dimension, for strictly positive ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        prod = torch.cumprod(x, dim=-1)
        out = torch.cat([torch.ones_like(prod[..., :1]), prod[..., :-1]], dim=-1)
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # d out_j / d x_i = out_j / x_i for j > i, so grad_x_i = sum_{j > i} g_j out_j / x_i:
        # autograd's formula for cumprod without zeros, without its host-side zero test.
        # Written in differentiable operations, so a double backward is exact as well.
        x, out = ctx.saved_tensors
        weighted = grad * out
        later = torch.cat([weighted[..., 1:], torch.zeros_like(weighted[..., :1])], dim=-1)
        return later.flip(-1).cumsum(-1).flip(-1) / x


def exclusive_cumprod(x: Tensor) -> Tensor:
    """Exclusive cumulative product ``out_j = prod_{i<j} x_i`` along the last dimension.

    Values equal ``torch.cumprod`` shifted by one (bitwise), and so do the gradients where
    ``x > 0`` (autograd's own formula for that case); the backward never reads a value on
    the host. ``x`` must be strictly positive (allocation maps usage to ``[eps, 1]``).
    """
    return _ExclusiveCumprod.apply(x)


def retention(free_gates: Tensor, prev_read_weights: Tensor) -> Tensor:
    """Memory retention ``psi = prod_r (1 - f_r * w^r_{t-1})``.

    Args:
        free_gates: ``(B, R)`` free gates in ``[0, 1]``.
        prev_read_weights: ``(B, R, N)`` read weightings of the previous step.

    Returns:
        ``(B, N)`` retention vector in ``[0, 1]``.
    """
    return product(1.0 - free_gates.unsqueeze(-1) * prev_read_weights, dim=1)


def update_usage(
    prev_usage: Tensor,
    prev_write_weights: Tensor,
    free_gates: Tensor,
    prev_read_weights: Tensor,
    stop_write_gradient: bool = True,
) -> tuple[Tensor, Tensor]:
    """Usage after last step's writes and this step's frees.

    ``u_t = (u + w - u * w) * psi`` where ``w`` aggregates the write heads as
    ``1 - prod_i (1 - w^w_i)``. As in the reference implementation the previous write weights
    are treated as constants (stop-gradient) unless ``stop_write_gradient`` is False; gradients
    always flow through ``u`` and ``psi``.

    Args:
        prev_usage: ``(B, N)`` usage ``u_{t-1}`` in ``[0, 1]``.
        prev_write_weights: ``(B, Wr, N)`` write weightings of the previous step.
        free_gates: ``(B, R)`` free gates.
        prev_read_weights: ``(B, R, N)`` read weightings of the previous step.
        stop_write_gradient: detach ``prev_write_weights`` (reference behaviour).

    Returns:
        ``(usage, psi)``: ``(B, N)`` new usage and ``(B, N)`` retention vector.
    """
    written = prev_write_weights.detach() if stop_write_gradient else prev_write_weights
    if written.shape[1] == 1:
        written = written[:, 0]
    else:
        written = 1.0 - product(1.0 - written, dim=1)
    psi = retention(free_gates, prev_read_weights)
    usage = (prev_usage + written - prev_usage * written) * psi
    return usage, psi


def allocation_weighting(usage: Tensor, eps: float = EPSILON) -> Tensor:
    """Allocation weighting from usage (the "free list" of the Nature paper).

    Usage is mapped to ``[eps, 1]`` by ``eps + (1 - eps) * u`` (as the reference does, so the
    map stays differentiable), sorted ascending (stable, lower index first on ties), and
    ``a[phi_j] = (1 - u[phi_j]) * prod_{i<j} u[phi_i]`` is scattered back to slot order.

    Args:
        usage: ``(..., N)`` usage in ``[0, 1]``.
        eps: lower bound of the usage before the cumulative product.

    Returns:
        ``(..., N)`` allocation weighting (sum <= 1), peaked at the least-used slot.
    """
    usage = eps + (1.0 - eps) * usage
    sorted_usage, order = torch.sort(usage, dim=-1, stable=True)
    sorted_alloc = (1.0 - sorted_usage) * exclusive_cumprod(sorted_usage)
    return torch.zeros_like(sorted_alloc).scatter(-1, order, sorted_alloc)


def write_allocation_weightings(usage: Tensor, write_gates: Tensor) -> Tensor:
    """Allocation weightings for several write heads, allocated one after the other.

    After head ``i`` allocates ``a_i``, usage is bumped to ``u + (1 - u) * g_i * a_i`` so that
    head ``i + 1`` prefers other slots (the reference's "simulated new usage").

    Args:
        usage: ``(B, N)`` current usage.
        write_gates: ``(B, Wr)`` amount each head writes through allocation
            (``allocation_gate * write_gate`` in the reference).

    Returns:
        ``(B, Wr, N)`` allocation weightings (not yet scaled by any gate).
    """
    num_writes = write_gates.shape[1]
    if num_writes == 1:
        return allocation_weighting(usage).unsqueeze(1)
    allocations = []
    for i in range(num_writes):
        alloc = allocation_weighting(usage)
        allocations.append(alloc)
        usage = usage + (1.0 - usage) * write_gates[:, i : i + 1] * alloc
    return torch.stack(allocations, dim=1)


def write_weighting(
    content: Tensor, allocation: Tensor, allocation_gate: Tensor, write_gate: Tensor
) -> Tensor:
    """``w^w = g^w * (g^a * a + (1 - g^a) * c)`` per write head.

    Args:
        content: ``(B, Wr, N)`` content weightings of the write keys.
        allocation: ``(B, Wr, N)`` allocation weightings.
        allocation_gate: ``(B, Wr)`` allocation gates in ``[0, 1]``.
        write_gate: ``(B, Wr)`` write gates in ``[0, 1]``.

    Returns:
        ``(B, Wr, N)`` write weightings (sum <= 1).
    """
    mixed = torch.lerp(content, allocation, allocation_gate.unsqueeze(-1))
    return write_gate.unsqueeze(-1) * mixed


def erase_and_write(
    memory: Tensor,
    write_weights: Tensor,
    erase_vectors: Tensor,
    write_vectors: Tensor,
    psi: Tensor | None = None,
) -> Tensor:
    """Memory update ``M' = M * prod_i (1 - w_i e_i^T) [* psi 1^T] + sum_i w_i v_i^T``.

    With ``psi`` given (Csordás & Schmidhuber 2019, "de-allocation"), every word is also
    scaled by its retention ``psi``, so slots freed by the free gates are really zeroed instead
    of keeping stale content that content look-up could still find.

    Args:
        memory: ``(B, N, W)`` previous memory.
        write_weights: ``(B, Wr, N)`` write weightings.
        erase_vectors: ``(B, Wr, W)`` erase vectors in ``[0, 1]``.
        write_vectors: ``(B, Wr, W)`` vectors to add.
        psi: optional ``(B, N)`` retention vector (see :func:`retention`).

    Returns:
        ``(B, N, W)`` new memory.
    """
    if write_weights.shape[1] == 1:
        # Outer products by broadcasting; the (B, N, 1) factor is expanded explicitly because
        # CPU kernels are much slower with a trailing broadcast dimension.
        weights = write_weights.transpose(1, 2).expand_as(memory)
        keep = 1.0 - weights * erase_vectors
        if psi is not None:
            keep = keep * psi.unsqueeze(-1).expand_as(memory)
        return torch.addcmul(memory * keep, weights, write_vectors)
    keep = product(1.0 - write_weights.unsqueeze(-1) * erase_vectors.unsqueeze(2), dim=1)
    if psi is not None:
        keep = keep * psi.unsqueeze(-1)
    return torch.baddbmm(memory * keep, write_weights.transpose(1, 2), write_vectors)


def update_link(link: Tensor, prev_precedence: Tensor, write_weights: Tensor) -> Tensor:
    """Temporal link update, one ``N x N`` graph per write head, diagonal kept at zero.

    ``L[i, j] <- (1 - w_i - w_j) * L[i, j] + w_i * p_j`` where ``L[i, j]`` is the degree to
    which slot ``i`` was written right after slot ``j``.

    Args:
        link: ``(B, Wr, N, N)`` previous link matrices (zero diagonal).
        prev_precedence: ``(B, Wr, N)`` previous precedence weightings.
        write_weights: ``(B, Wr, N)`` current write weightings.

    Returns:
        ``(B, Wr, N, N)`` new link matrices; rows and columns sum to at most 1.
    """
    w_i = write_weights.unsqueeze(-1)
    scale = (1.0 - w_i) - write_weights.unsqueeze(-2)
    new_link = torch.addcmul(link * scale, w_i, prev_precedence.unsqueeze(-2))
    # In-place on a fresh tensor: autograd only records a cheap diagonal copy.
    new_link.diagonal(dim1=-2, dim2=-1).zero_()
    return new_link


def update_precedence(prev_precedence: Tensor, write_weights: Tensor) -> Tensor:
    """``p <- (1 - sum_i w_i) * p + w`` per write head.

    Args:
        prev_precedence: ``(B, Wr, N)``.
        write_weights: ``(B, Wr, N)``.

    Returns:
        ``(B, Wr, N)`` new precedence weightings (sum <= 1).
    """
    return (1.0 - write_weights.sum(-1, keepdim=True)) * prev_precedence + write_weights


def directional_weightings(link: Tensor, prev_read_weights: Tensor) -> tuple[Tensor, Tensor]:
    """Forward ``f = L w`` and backward ``b = L^T w`` weightings for every (read, write) head pair.

    Computed with two batched matrix products; no ``(B, R, N, N)`` tensor is built.

    Args:
        link: ``(B, Wr, N, N)`` link matrices.
        prev_read_weights: ``(B, R, N)`` read weightings of the previous step.

    Returns:
        ``(forward, backward)``, each ``(B, R, Wr, N)``.
    """
    reads = prev_read_weights.unsqueeze(1)
    forward = torch.matmul(reads, link.transpose(-1, -2))
    backward = torch.matmul(reads, link)
    return forward.transpose(1, 2), backward.transpose(1, 2)


def sharpen(weights: Tensor, exponent: Tensor | float, eps: float = EPSILON) -> Tensor:
    """Link-distribution sharpness control (Csordás & Schmidhuber 2019).

    ``S(d, s)_i = d_i^s / sum_j d_j^s``. Like the authors' code, ``d`` is first offset by
    ``eps`` and divided by its maximum, which keeps ``d^s`` in ``[0, 1]`` and the gradient of
    ``s`` finite. Note that the result is renormalised to sum to 1.

    Args:
        weights: ``(..., N)`` directional weightings.
        exponent: sharpness ``s >= 1``; a float or a tensor broadcastable to ``weights[..., 0]``.
        eps: offset keeping every entry positive.

    Returns:
        ``(..., N)`` sharpened distribution.
    """
    shifted = weights + eps
    shifted = shifted / shifted.amax(dim=-1, keepdim=True)
    if isinstance(exponent, Tensor):
        exponent = exponent.unsqueeze(-1)
    powered = shifted.pow(exponent)
    return powered / powered.sum(dim=-1, keepdim=True)


def read_weighting(
    content: Tensor, forward: Tensor, backward: Tensor, read_modes: Tensor
) -> Tensor:
    """Read weighting as the read-mode mixture of backward, forward and content weightings.

    Mode order is the reference's: ``read_modes[..., :Wr]`` backward (one per write head),
    ``read_modes[..., Wr:2Wr]`` forward, ``read_modes[..., 2Wr]`` content.

    Args:
        content: ``(B, R, N)`` content weightings of the read keys.
        forward: ``(B, R, Wr, N)`` forward weightings.
        backward: ``(B, R, Wr, N)`` backward weightings.
        read_modes: ``(B, R, 1 + 2 Wr)`` mode distributions.

    Returns:
        ``(B, R, N)`` read weightings (sum <= 1).
    """
    stacked = torch.cat([backward, forward, content.unsqueeze(2)], dim=2)
    return (read_modes.unsqueeze(-1) * stacked).sum(2)


def read_vectors(read_weights: Tensor, memory: Tensor) -> Tensor:
    """``r_i = M^T w^r_i``.

    Args:
        read_weights: ``(B, R, N)``.
        memory: ``(B, N, W)``.

    Returns:
        ``(B, R, W)`` read vectors.
    """
    return torch.bmm(read_weights, memory)
