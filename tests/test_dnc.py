"""Tests for the Differentiable Neural Computer and its addressing functions."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cl_lightning.models import dnc_addressing as addr
from cl_lightning.models import dnc_kernels as kernels
from cl_lightning.models.dnc import DNC, DNCState, DNCTrace

TOL = 1e-5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: extra threads only add synchronisation (which is very slow on a
    busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_dnc(**kw) -> DNC:
    sizes = dict(hidden_size=16, memory_slots=8, word_size=5, read_heads=2, write_heads=1)
    sizes.update(kw)
    return DNC(input_size=4, output_size=3, **sizes)


def random_state(model: DNC, batch: int, dtype: torch.dtype = torch.float32) -> DNCState:
    """A non-degenerate state: distinct usages, so no sort ties (whose gradients are
    ill-defined) arise from the all-zero initial state."""
    s = model.initial_state(batch, dtype=dtype)
    n = model.memory_slots
    return s._replace(
        memory=torch.randn_like(s.memory),
        usage=torch.rand_like(s.usage),
        read_weights=random_distribution(batch, model.read_heads, n).to(dtype),
        write_weights=random_distribution(batch, model.write_heads, n).to(dtype),
    )


def assert_weighting(w: torch.Tensor, exact_sum: bool = False) -> None:
    """Entries in [0, 1] and sum over the last axis <= 1 (== 1 if ``exact_sum``)."""
    assert torch.isfinite(w).all()
    assert w.min() >= -TOL and w.max() <= 1 + TOL
    sums = w.sum(-1)
    assert sums.max() <= 1 + TOL
    if exact_sum:
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=TOL, rtol=0)


def assert_link(link: torch.Tensor) -> None:
    diag = link.diagonal(dim1=-2, dim2=-1)
    assert diag.abs().max() == 0
    assert link.min() >= -TOL
    assert link.sum(-1).max() <= 1 + TOL
    assert link.sum(-2).max() <= 1 + TOL


def random_distribution(*shape: int, total: float = 1.0) -> torch.Tensor:
    """Random non-negative weights whose last axis sums to ``total * U(0, 1)``."""
    w = torch.softmax(3 * torch.randn(*shape), -1)
    return w * total * torch.rand(*shape[:-1], 1)


# --------------------------------------------------------------------- content addressing


def test_content_weighting_hand_example() -> None:
    memory = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    keys = torch.tensor([[[1.0, 0.0]]])
    strength = torch.tensor([[2.0]])
    expected_sim = torch.tensor([1.0, 0.0, 1.0 / math.sqrt(2.0)])
    expected = torch.exp(2 * expected_sim) / torch.exp(2 * expected_sim).sum()
    got = addr.content_weighting(memory, keys, strength)[0, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_content_weighting_mask_selects_key_part() -> None:
    # Rows 0 and 1 match the key on the first two features and differ on the third.
    memory = torch.tensor([[[1.0, 2.0, 5.0], [1.0, 2.0, -5.0], [-1.0, 0.5, 0.0]]])
    keys = torch.tensor([[[1.0, 2.0, 0.0]]])
    strength = torch.tensor([[10.0]])
    mask = torch.tensor([[[1.0, 1.0, 0.0]]])
    masked = addr.content_weighting(memory, keys, strength, mask)[0, 0]
    torch.testing.assert_close(masked[0], masked[1])
    assert masked[0] > 0.49 and masked[2] < 0.01
    # An all-ones mask is the same as no mask.
    ones = torch.ones_like(keys)
    torch.testing.assert_close(
        addr.content_weighting(memory, keys, strength, ones),
        addr.content_weighting(memory, keys, strength),
    )


def test_content_weighting_is_distribution() -> None:
    memory, keys = torch.randn(3, 7, 4), torch.randn(3, 5, 4)
    for mask in (None, torch.rand(3, 5, 4)):
        w = addr.content_weighting(memory, keys, torch.rand(3, 5) * 5, mask)
        assert w.shape == (3, 5, 7)
        assert_weighting(w, exact_sum=True)
    torch.testing.assert_close(
        kernels.fused_content_weighting(memory, keys, torch.ones(3, 5)),
        addr.content_weighting(memory, keys, torch.ones(3, 5)),
    )


def test_zero_memory_and_keys_have_finite_gradients() -> None:
    memory = torch.zeros(2, 6, 4, requires_grad=True)
    keys = torch.zeros(2, 3, 4, requires_grad=True)
    strengths = torch.ones(2, 3, requires_grad=True)
    mask = torch.full((2, 3, 4), 0.5, requires_grad=True)
    for m in (None, mask):
        w = addr.content_weighting(memory, keys, strengths, m)
        torch.testing.assert_close(w, torch.full_like(w, 1 / 6))
        grads = torch.autograd.grad((w * torch.randn_like(w)).sum(), [memory, keys, strengths])
        assert all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------- usage and allocation


def test_allocation_hand_computed_three_slots() -> None:
    usage = torch.tensor([[0.4, 0.1, 0.8]])
    # Ascending order: slot 1 (0.1), slot 0 (0.4), slot 2 (0.8).
    expected = torch.tensor([[(1 - 0.4) * 0.1, 1 - 0.1, (1 - 0.8) * 0.1 * 0.4]])
    got = addr.allocation_weighting(usage)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_allocation_peaks_at_least_used_slot() -> None:
    usage = torch.tensor([[0.9, 0.7, 0.95, 0.05, 0.6], [0.0, 1.0, 1.0, 1.0, 1.0]])
    alloc = addr.allocation_weighting(usage)
    assert alloc.argmax(-1).tolist() == [3, 0]
    assert_weighting(alloc)
    # Fully used memory allocates (almost) nothing.
    assert addr.allocation_weighting(torch.ones(1, 5)).sum() < 1e-5


def test_allocation_random_batched_and_leading_dims() -> None:
    usage = torch.rand(4, 3, 16)
    alloc = addr.allocation_weighting(usage)
    assert_weighting(alloc)
    torch.testing.assert_close(alloc.argmax(-1), usage.argmin(-1))
    for i in range(4):
        torch.testing.assert_close(alloc[i], addr.allocation_weighting(usage[i]))


def test_exclusive_cumprod_equals_shifted_torch_cumprod_bitwise() -> None:
    x = addr.EPSILON + (1 - addr.EPSILON) * torch.rand(6, 40)  # allocation's range
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = addr.exclusive_cumprod(ours)
    prod = torch.cumprod(ref, -1)
    expected = torch.cat([torch.ones(6, 1), prod[:, :-1]], -1)
    assert torch.equal(out, expected)
    torch.testing.assert_close(out[:, 3], x[:, 0] * x[:, 1] * x[:, 2])
    grad = torch.randn(6, 40)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(ours.grad, ref.grad)
    x64 = (torch.rand(3, 7, dtype=torch.float64) + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(addr.exclusive_cumprod, (x64,))
    assert torch.autograd.gradgradcheck(addr.exclusive_cumprod, (x64,))


def test_product_over_heads_equals_torch_prod_also_with_zero_factors() -> None:
    x = torch.rand(5, 4, 9, dtype=torch.float64)
    x[0, 1, 2] = 0.0  # one zero factor: the gradient of that slot's other factors is 0
    x[1, :2, 3] = 0.0  # two zeros: every factor's gradient is 0
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = addr.product(ours, 1)
    expected = torch.prod(ref, 1)
    torch.testing.assert_close(out, expected, rtol=1e-15, atol=0)
    grad = torch.randn(5, 9, dtype=torch.float64)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-12, atol=1e-15)
    assert ours.grad[0, 1, 2] != 0 and ours.grad[0, 0, 2] == 0 and (ours.grad[1, :, 3] == 0).all()


def backward_node_names(output: torch.Tensor) -> set[str]:
    """Names of every autograd node ``output`` depends on."""
    seen, names, stack = set(), set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("options", [{}, {"dealloc": True, "write_heads": 2},
                                     {"fused": False, "stop_write_gradient": False,
                                      "write_heads": 2}])
def test_dnc_backward_has_no_operation_that_reads_values_on_the_host(options: dict) -> None:
    """autograd's backward of prod and cumprod look for zeros on the host: a device
    synchronisation per step on a GPU, and no CUDA-graph capture of a training step."""
    y, _ = small_dnc(**options)(torch.randn(2, 3, 4))
    names = backward_node_names(y)
    assert "_ExclusiveCumprodBackward" in names and "SortBackward1" in names
    assert not {n for n in names if n.startswith(("ProdBackward", "CumprodBackward"))}


def test_multiple_write_heads_allocate_distinct_slots() -> None:
    usage = torch.tensor([[0.5, 0.0, 0.9, 0.2]])
    alloc = addr.write_allocation_weightings(usage, torch.ones(1, 2))
    assert alloc.shape == (1, 2, 4)
    assert alloc[0].argmax(-1).tolist() == [1, 3]
    # With a closed gate the first head does not claim its slot.
    alloc = addr.write_allocation_weightings(usage, torch.tensor([[0.0, 1.0]]))
    assert alloc[0].argmax(-1).tolist() == [1, 1]


def test_usage_update_formula_and_stop_gradient() -> None:
    prev_usage = torch.tensor([[0.5, 0.0, 1.0]], requires_grad=True)
    prev_write = torch.tensor([[[0.5, 1.0, 0.0]]], requires_grad=True)
    free_gates = torch.tensor([[1.0, 0.5]], requires_grad=True)
    prev_read = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])
    usage, psi = addr.update_usage(prev_usage, prev_write, free_gates, prev_read)
    torch.testing.assert_close(psi, torch.tensor([[1.0, 0.5, 0.0]]))
    torch.testing.assert_close(usage, torch.tensor([[0.75, 0.5, 0.0]]))
    usage.sum().backward()
    assert prev_write.grad is None  # stop-gradient on the previous write weights
    assert prev_usage.grad is not None and free_gates.grad is not None


# ------------------------------------------------------------- writing and temporal links


def test_write_weighting_mixes_allocation_and_content() -> None:
    content = torch.tensor([[[1.0, 0.0, 0.0]]])
    alloc = torch.tensor([[[0.0, 1.0, 0.0]]])
    w = addr.write_weighting(content, alloc, torch.tensor([[0.25]]), torch.tensor([[0.8]]))
    torch.testing.assert_close(w, torch.tensor([[[0.6, 0.2, 0.0]]]))


def test_erase_and_write_and_deallocation() -> None:
    memory = torch.ones(1, 3, 2)
    weights = torch.tensor([[[0.0, 1.0, 0.5]]])
    erase = torch.tensor([[[1.0, 0.0]]])
    values = torch.tensor([[[2.0, 3.0]]])
    out = addr.erase_and_write(memory, weights, erase, values)
    expected = torch.tensor([[[1.0, 1.0], [2.0, 4.0], [1.5, 2.5]]])
    torch.testing.assert_close(out, expected)
    # De-allocation: slot 0 fully freed (psi = 0) is zeroed.
    psi = torch.tensor([[0.0, 1.0, 1.0]])
    out = addr.erase_and_write(memory, weights, erase, values, psi)
    torch.testing.assert_close(out[0, 0], torch.zeros(2))
    torch.testing.assert_close(out[0, 1:], expected[0, 1:])


def test_multi_head_erase_matches_sequential_definition() -> None:
    memory = torch.randn(2, 5, 3)
    weights = random_distribution(2, 2, 5)
    erase, values = torch.rand(2, 2, 3), torch.randn(2, 2, 3)
    keep = (1 - weights[:, 0, :, None] * erase[:, 0, None]) * (
        1 - weights[:, 1, :, None] * erase[:, 1, None]
    )
    expected = memory * keep + weights.transpose(1, 2) @ values
    torch.testing.assert_close(addr.erase_and_write(memory, weights, erase, values), expected)


def test_link_follows_write_order() -> None:
    n = 4
    link = torch.zeros(1, 1, n, n)
    prec = torch.zeros(1, 1, n)
    for slot in (0, 2, 1):
        w = torch.zeros(1, 1, n)
        w[0, 0, slot] = 1.0
        link = addr.update_link(link, prec, w)
        prec = addr.update_precedence(prec, w)
    assert_link(link)
    assert link[0, 0, 2, 0] == 1 and link[0, 0, 1, 2] == 1 and link.sum() == 2
    reads = torch.zeros(1, 2, n)
    reads[0, 0, 0] = 1.0  # head 0 at slot 0
    reads[0, 1, 1] = 1.0  # head 1 at slot 1
    forward, backward = addr.directional_weightings(link, reads)
    assert forward.shape == (1, 2, 1, n)
    assert forward[0, 0, 0].argmax() == 2  # after slot 0 came slot 2
    assert backward[0, 1, 0].argmax() == 2  # before slot 1 came slot 2
    assert forward[0, 1, 0].sum() == 0  # nothing was written after slot 1


@pytest.mark.parametrize("write_heads", [1, 2])
def test_link_invariants_and_fused_equivalence(write_heads: int) -> None:
    b, r, n = 3, 2, 6
    link = torch.zeros(b, write_heads, n, n)
    prec = torch.zeros(b, write_heads, n)
    for _ in range(6):
        w = random_distribution(b, write_heads, n)
        reads = random_distribution(b, r, n)
        new_link, fwd, bwd = kernels.fused_link_read(link, prec, w, reads)
        ref_link = addr.update_link(link, prec, w)
        ref_fwd, ref_bwd = addr.directional_weightings(ref_link, reads)
        torch.testing.assert_close(new_link, ref_link)
        torch.testing.assert_close(fwd, ref_fwd)
        torch.testing.assert_close(bwd, ref_bwd)
        # Directional weightings against explicit matrix-vector products.
        torch.testing.assert_close(fwd, torch.einsum("bhij,brj->brhi", ref_link, reads))
        torch.testing.assert_close(bwd, torch.einsum("bhji,brj->brhi", ref_link, reads))
        link, prec = new_link, addr.update_precedence(prec, w)
        assert_link(link)
        assert_weighting(prec)
        assert_weighting(fwd)
        assert_weighting(bwd)


# ------------------------------------------------- fused kernels equal the reference math
#
# Every kernel of dnc_kernels against the reference composition it replaces, on shapes that
# take each of its branches, in float64 to KERNEL_TOL and in float32 to torch's float32
# defaults: values; first-order gradients for the same random upstream gradients, both from
# the hand-written backward and with create_graph=True (the path second-order MAML takes);
# a second-order gradient through the latter. Then gradcheck against finite differences and
# gradgradcheck.

KERNEL_TOL = dict(atol=1e-12, rtol=1e-10)
"""float64 tolerance of a kernel against its reference: only the summation order differs."""


def _double(*tensors: torch.Tensor, grad: bool = True) -> list[torch.Tensor]:
    return [t.double().requires_grad_(grad) for t in tensors]


def _link_read_reference(link, prev_precedence, write_weights, prev_read_weights):
    """``update_link`` then ``directional_weightings``: what ``fused_link_read`` replaces."""
    new_link = addr.update_link(link, prev_precedence, write_weights)
    return (new_link, *addr.directional_weightings(new_link, prev_read_weights))


def _content_inputs(heads: int) -> tuple:
    """memory ``(2, 5, 3)``, keys ``(2, heads, 3)``, strengths ``(2, heads)``."""
    return tuple(_double(torch.randn(2, 5, 3), torch.randn(2, heads, 3), torch.rand(2, heads) * 3))


def _erase_inputs(write_heads: int, with_psi: bool) -> tuple:
    """memory, write weights, erase and write vectors, and the retention ``psi`` or None."""
    memory, weights, erase, values, psi = _double(
        torch.randn(2, 5, 3),
        random_distribution(2, write_heads, 5),
        torch.rand(2, write_heads, 3),
        torch.randn(2, write_heads, 3),
        torch.rand(2, 5),
    )
    return memory, weights, erase, values, psi if with_psi else None


def _link_inputs(write_heads: int, read_heads: int, constant_state: bool = False) -> tuple:
    """link (zero diagonal), precedence, write weights, previous read weights. With
    ``constant_state`` only the write weights need a gradient, as at a sequence's first step."""
    link = torch.rand(2, write_heads, 5, 5) * 0.2
    link.diagonal(dim1=-2, dim2=-1).zero_()
    (write_weights,) = _double(random_distribution(2, write_heads, 5))
    link, precedence, reads = _double(
        link,
        random_distribution(2, write_heads, 5),
        random_distribution(2, read_heads, 5),
        grad=not constant_state,
    )
    return link, precedence, write_weights, reads


def _second_order(first: tuple, inputs: list, probes: list) -> list[torch.Tensor]:
    """Gradient of ``sum(first_i * probe_i)`` for the ``inputs`` (zeros where it is constant)."""
    total = sum((g * p).sum() for g, p in zip(first, probes, strict=True))
    if not total.requires_grad:  # e.g. a link update is linear in the write weights
        return [torch.zeros_like(t) for t in inputs]
    return torch.autograd.grad(total, inputs, allow_unused=True, materialize_grads=True)


KERNEL_CASES = {
    # name: (kernel, reference composition, inputs)
    "content-1-head": (
        kernels.fused_content_weighting, addr.content_weighting, lambda: _content_inputs(1)
    ),
    "content-3-heads": (
        kernels.fused_content_weighting, addr.content_weighting, lambda: _content_inputs(3)
    ),
    "erase-1-head": (
        kernels.fused_erase_and_write, addr.erase_and_write, lambda: _erase_inputs(1, False)
    ),
    "erase-1-head-psi": (
        kernels.fused_erase_and_write, addr.erase_and_write, lambda: _erase_inputs(1, True)
    ),
    "erase-2-heads-psi": (
        kernels.fused_erase_and_write, addr.erase_and_write, lambda: _erase_inputs(2, True)
    ),
    "link-1-write-1-read": (
        kernels.fused_link_read, _link_read_reference, lambda: _link_inputs(1, 1)
    ),
    "link-2-writes-3-reads": (
        kernels.fused_link_read, _link_read_reference, lambda: _link_inputs(2, 3)
    ),
    "link-constant-state": (
        kernels.fused_link_read, _link_read_reference, lambda: _link_inputs(2, 2, True)
    ),
}


def test_every_fused_kernel_has_a_reference_case() -> None:
    # fused_memory_step, fused_time_step and fused_sequence run only as C++: their cases
    # are in tests/test_dnc_native.py
    public = ({name for name in vars(kernels) if name.startswith("fused_")}
              - {"fused_memory_step", "fused_time_step", "fused_sequence"})
    assert public == {kernel.__name__ for kernel, _, _ in KERNEL_CASES.values()}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_fused_kernel_equals_reference(case: str) -> None:
    kernel, reference, make_inputs = KERNEL_CASES[case]
    check_kernel_against_reference(kernel, reference, make_inputs())


def check_kernel_against_reference(kernel, reference, args: tuple,
                                   numerical: bool = True) -> None:
    """``kernel(*args)`` equals ``reference(*args)``: values, first- and second-order
    gradients in float64 and float32, then (with ``numerical``) gradcheck and gradgradcheck
    against finite differences."""
    for dtype, tol in ((torch.float64, KERNEL_TOL), (torch.float32, {})):
        typed = [
            t.detach().to(dtype).requires_grad_(t.requires_grad) if t is not None else None
            for t in args
        ]
        got, want = kernel(*typed), reference(*typed)
        got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **tol)
        inputs = [t for t in typed if t is not None and t.requires_grad]
        upstream = [torch.randn_like(t) for t in want]
        for create_graph in (False, True):
            grads = [
                torch.autograd.grad(
                    out, inputs, upstream, retain_graph=True, create_graph=create_graph
                )
                for out in (got, want)
            ]
            for a, b in zip(*grads, strict=True):
                torch.testing.assert_close(a, b, **tol)
        probes = [torch.randn_like(t) for t in inputs]
        second = [_second_order(first, inputs, probes) for first in grads]
        for a, b in zip(*second, strict=True):
            torch.testing.assert_close(a, b, **tol)
    if not numerical:
        return
    assert torch.autograd.gradcheck(kernel, args)
    # Second order (e.g. MAML) stays exact; random projections keep this fast.
    assert torch.autograd.gradgradcheck(kernel, args, fast_mode=True)


def test_dnc_second_order_gradients_fused_equal_plain() -> None:
    fused = small_dnc(stop_write_gradient=False).double()
    plain = small_dnc(stop_write_gradient=False, fused=False).double()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    state = random_state(fused, 2, torch.float64)
    results = []
    for model in (fused, plain):
        params = list(model.parameters())
        y = model(x, state)[0]
        grads = torch.autograd.grad(y.square().sum(), params, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        results.append(torch.autograd.grad(penalty, params))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------ reading


def test_read_weighting_mode_mixture() -> None:
    content = torch.tensor([[[1.0, 0.0, 0.0]]])
    forward = torch.tensor([[[[0.0, 1.0, 0.0]]]])
    backward = torch.tensor([[[[0.0, 0.0, 1.0]]]])
    modes = torch.tensor([[[0.2, 0.3, 0.5]]])  # backward, forward, content
    w = addr.read_weighting(content, forward, backward, modes)
    torch.testing.assert_close(w, torch.tensor([[[0.5, 0.3, 0.2]]]))


def test_sharpen_is_sharper_distribution() -> None:
    d = random_distribution(2, 3, 1, 8)
    s = addr.sharpen(d, torch.full((2, 3, 1), 3.0))
    assert_weighting(s, exact_sum=True)
    flat = (d + addr.EPSILON) / (d + addr.EPSILON).sum(-1, keepdim=True)
    assert (s.amax(-1) >= flat.amax(-1) - TOL).all()
    torch.testing.assert_close(s, addr.sharpen(d, 3.0))


# ---------------------------------------------------------------------- full model


OPTION_SETS = [
    {},
    {"masking": True},
    {"dealloc": True},
    {"sharpness": True},
    {"sharpness": 2.0},
    {"masking": True, "dealloc": True, "sharpness": True, "write_heads": 2},
    {"fused": False, "strength_activation": "oneplus"},
]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_dnc_invariants(options: dict) -> None:
    model = small_dnc(**options)
    x = torch.randn(3, 12, 4) * 3
    y, state, trace = model(x, return_trace=True)
    assert y.shape == (3, 12, 3) and torch.isfinite(y).all()
    assert isinstance(trace, DNCTrace) and isinstance(state, DNCState)
    wr = model.write_heads
    assert trace.read_weights.shape == (3, 12, 2, 8)
    assert trace.write_weights.shape == (3, 12, wr, 8)
    assert trace.read_modes.shape == (3, 12, 2, 1 + 2 * wr)
    for name in ("read_weights", "write_weights", "allocation"):
        assert_weighting(getattr(trace, name))
    assert_weighting(trace.read_modes, exact_sum=True)
    assert trace.usage.min() >= 0 and trace.usage.max() <= 1 + TOL
    for gate in (trace.allocation_gate, trace.write_gate, trace.free_gates):
        assert gate.min() >= 0 and gate.max() <= 1
    assert_link(state.link)
    assert_weighting(state.precedence)
    # The directional and content weightings of the final state are valid too.
    forward, backward = addr.directional_weightings(state.link, state.read_weights)
    assert_weighting(forward)
    assert_weighting(backward)


def test_dnc_gradients_finite_from_zero_state_and_zero_keys() -> None:
    model = small_dnc()
    with torch.no_grad():
        model.interface.weight.zero_()
        model.interface.bias.zero_()  # all keys zero, memory starts at zero
    x = torch.zeros(2, 4, 4, requires_grad=True)
    y, _ = model(x)
    y.square().sum().backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "options", [{}, {"masking": True, "dealloc": True, "sharpness": True, "write_heads": 2}]
)
def test_dnc_gradcheck_float64(options: dict) -> None:
    # The reference's stop-gradient on the previous write weights (inside the usage update)
    # makes autograd deliberately differ from finite differences; switch it off here.
    sizes = dict(hidden_size=5, memory_slots=4, word_size=3, read_heads=2)
    model = DNC(3, 2, stop_write_gradient=False, **sizes, **options).double()
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)

    def run(inp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, state = model(inp)
        return y, state.memory, state.usage, state.link, state.read_weights

    # Full Jacobian of the output; random projections (fast mode) for the whole state.
    assert torch.autograd.gradcheck(lambda inp: model(inp)[0], (x,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(run, (x,), eps=1e-6, atol=1e-6, fast_mode=True)

    # With the stop-gradient on, the usage Jacobian no longer matches finite differences.
    model.stop_write_gradient = True
    usage_only = lambda inp: model(inp)[1].usage  # noqa: E731
    assert not torch.autograd.gradcheck(usage_only, (x,), eps=1e-6, raise_exception=False)


def test_dnc_batched_equals_per_sample() -> None:
    model = small_dnc(write_heads=2, masking=True)
    x = torch.randn(4, 9, 4)
    y, state = model(x)
    for i in range(4):
        yi, si = model(x[i : i + 1])
        torch.testing.assert_close(yi, y[i : i + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(si.link, state.link[i : i + 1], atol=1e-5, rtol=1e-5)


def test_dnc_state_carries_across_calls() -> None:
    model = small_dnc()
    x = torch.randn(2, 10, 4)
    y_full, s_full = model(x)
    y_a, s_a = model(x[:, :6])
    y_b, s_b = model(x[:, 6:], s_a.detach())
    torch.testing.assert_close(torch.cat([y_a, y_b], 1), y_full)
    torch.testing.assert_close(s_b.memory, s_full.memory)
    y_init, _ = model(x, model.initial_state(2))
    torch.testing.assert_close(y_init, y_full)


def test_fused_and_autograd_models_agree() -> None:
    fused = small_dnc(write_heads=2)
    plain = small_dnc(write_heads=2, fused=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 7, 4)
    state = random_state(fused, 2)
    y1, _ = fused(x, state)
    y2, _ = plain(x, state)
    torch.testing.assert_close(y1, y2)
    g1 = torch.autograd.grad(y1.square().sum(), list(fused.parameters()))
    g2 = torch.autograd.grad(y2.square().sum(), list(plain.parameters()))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def transplant(base: DNC, other: DNC, extra_bias: float | None) -> None:
    """Copy ``base``'s weights into ``other``, whose interface may have extra rows.

    Extra interface rows get zero weights and bias ``extra_bias`` (random if ``None``).
    """
    with torch.no_grad():
        for name in ("input_gates", "recurrent_gates", "output"):
            getattr(other, name).load_state_dict(getattr(base, name).state_dict())
        w, b = other.interface.weight, other.interface.bias
        w.zero_()
        if extra_bias is None:
            b.normal_(0, 2)
        else:
            b.fill_(extra_bias)
        src = dst = 0
        for size_base, size_other in zip(
            base.layout.block_sizes, other.layout.block_sizes, strict=True
        ):
            w[dst : dst + size_base] = base.interface.weight[src : src + size_base]
            b[dst : dst + size_base] = base.interface.bias[src : src + size_base]
            src, dst = src + size_base, dst + size_other


def test_options_change_output_only_when_on() -> None:
    base = small_dnc()
    x = torch.randn(2, 10, 4)
    y_base, _ = base(x)

    # Same weights, option flags off: identical output.
    same = small_dnc(masking=False, dealloc=False, sharpness=False)
    same.load_state_dict(base.state_dict())
    torch.testing.assert_close(same(x)[0], y_base)

    # De-allocation and a fixed sharpness add no parameters: same weights, new output.
    for options in ({"dealloc": True}, {"sharpness": 3.0}):
        other = small_dnc(**options)
        other.load_state_dict(base.state_dict())
        assert (other(x)[0] - y_base).abs().max() > 1e-4, options

    # Masking with masks saturated at 1 is the plain DNC; random masks change the output.
    masked = small_dnc(masking=True)
    transplant(base, masked, extra_bias=40.0)  # clipped to 20: sigmoid(20) ~ 1 - 2e-9
    torch.testing.assert_close(masked(x)[0], y_base, atol=1e-5, rtol=1e-5)
    transplant(base, masked, extra_bias=None)
    assert (masked(x)[0] - y_base).abs().max() > 1e-4

    # Learned sharpness changes the output.
    sharp = small_dnc(sharpness=True)
    transplant(base, sharp, extra_bias=2.0)
    assert (sharp(x)[0] - y_base).abs().max() > 1e-4


def test_default_path_returns_pair_and_initial_state_shapes() -> None:
    model = small_dnc(write_heads=2)
    out = model(torch.randn(2, 3, 4))
    assert len(out) == 2
    s = model.initial_state(5, dtype=torch.float64)
    assert s.memory.shape == (5, 8, 5) and s.memory.dtype == torch.float64
    assert s.link.shape == (5, 2, 8, 8)
    assert s.read_vectors.shape == (5, 2, 5)
    assert s.h.shape == s.c.shape == (5, 16)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        small_dnc(strength_activation="exp")
    with pytest.raises(ValueError):
        small_dnc(sharpness=-1.0)


def test_compiled_step_equals_eager_and_copies_use_their_own_weights() -> None:
    """``compile_step`` changes speed, not maths: outputs, final state and parameter gradients
    equal the eager step's; a deepcopy (ESMER's semantic memory) runs on its own weights."""
    model = small_dnc()
    x = torch.randn(3, 5, 4)
    y_eager, s_eager = model(x)
    g_eager = torch.autograd.grad(y_eager.square().sum(), list(model.parameters()))

    model.compile_step = True
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    y_comp, s_comp = model(x)
    # one compiled step (forward and backward) serves every time step, the first included
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    g_comp = torch.autograd.grad(y_comp.square().sum(), list(model.parameters()))
    torch.testing.assert_close(y_comp, y_eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_comp.link, s_eager.link, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_comp, g_eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.1 * torch.randn_like(p))
    y_twin = twin(x)[0]
    assert (y_twin - y_comp).abs().max() > 1e-3  # the copy's weights, not the original's
    twin.compile_step = False
    torch.testing.assert_close(y_twin, twin(x)[0], atol=1e-5, rtol=1e-5)
    assert "compile_step=True" in repr(model) and "compile_step" not in repr(twin)


@pytest.mark.parametrize("options", [{}, {"fused": False, "write_heads": 2, "masking": True}])
def test_dnc_without_temporal_links_equals_content_only_read_modes(options: dict) -> None:
    """``temporal_links=False`` is the default DNC with every read mode on content: same
    outputs, state and gradients (to 1e-5; the default's read modes are a softmax of clipped
    logits, so their non-content share is ``~exp(-40)``), an empty link and precedence, and
    content-only read modes in the trace."""
    plain = small_dnc(temporal_links=False, **options)
    linked = small_dnc(**options)
    transplant(plain, linked, extra_bias=0.0)
    with torch.no_grad():  # read-mode logits: content +20, backward and forward -20
        start = sum(linked.layout.block_sizes[:3])
        modes = linked.interface.bias[start : start + linked.layout.mode_size]
        modes.view(linked.read_heads, -1).fill_(-20.0)[:, -1] = 20.0
    x = torch.randn(3, 9, 4) * 3
    y_plain, s_plain, trace = plain(x, return_trace=True)
    y_linked, s_linked = linked(x)
    torch.testing.assert_close(y_plain, y_linked)
    for name in ("memory", "usage", "read_weights", "write_weights", "read_vectors"):
        torch.testing.assert_close(getattr(s_plain, name), getattr(s_linked, name))
    assert s_plain.link.shape == (3, plain.write_heads, 0, 0)
    assert s_plain.precedence.shape == (3, plain.write_heads, 0)
    wr = plain.write_heads
    assert trace.read_modes.shape == (3, 9, 2, 1 + 2 * wr)
    assert (trace.read_modes[..., -1] == 1).all() and (trace.read_modes[..., :-1] == 0).all()
    shared = ["input_gates", "recurrent_gates", "output"]
    params = lambda m: [p for n in shared for p in getattr(m, n).parameters()]  # noqa: E731
    g_plain = torch.autograd.grad(y_plain.square().sum(), params(plain))
    g_linked = torch.autograd.grad(y_linked.square().sum(), params(linked))
    for a, b in zip(g_plain, g_linked, strict=True):
        torch.testing.assert_close(a, b)
    # the state API is unchanged: carrying the state across calls, detaching it
    y_a, s_a = plain(x[:, :4])
    y_b, _ = plain(x[:, 4:], s_a.detach())
    torch.testing.assert_close(torch.cat([y_a, y_b], 1), y_plain)
    assert "temporal_links=False" in repr(plain) and "temporal_links" not in repr(linked)


def test_sharpness_needs_temporal_links() -> None:
    with pytest.raises(ValueError, match="temporal_links"):
        small_dnc(temporal_links=False, sharpness=True)


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_autocast_keeps_the_memory_in_float32_and_stays_close(fused: bool) -> None:
    model = DNC(input_size=6, output_size=3, hidden_size=32, memory_slots=16, word_size=8,
                read_heads=2, fused=fused)
    x = torch.randn(3, 12, 6)
    ref, _ = model(x)
    ref_grads = torch.autograd.grad(ref.square().mean(), list(model.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = model(x)
        grads = torch.autograd.grad(out.float().square().mean(), list(model.parameters()))
    assert out.dtype == torch.bfloat16  # the output layer ran in bf16
    assert all(t.dtype == torch.float32 for t in state)  # the addressing did not
    # bf16 keeps 8 bits of mantissa: outputs within a few of its steps of float32's.
    torch.testing.assert_close(out.float(), ref, atol=3e-2 * ref.abs().max().item(), rtol=0)
    flat = torch.cat([g.flatten() for g in grads])
    ref_flat = torch.cat([g.flatten() for g in ref_grads])
    assert torch.isfinite(flat).all()
    assert torch.nn.functional.cosine_similarity(flat, ref_flat, dim=0) > 0.99


@pytest.mark.parametrize("options", [
    {}, {"write_heads": 2}, {"fused": False}, {"dealloc": True, "masking": True},
    {"sharpness": True}, {"sharpness": 2.0},
])
def test_first_step_of_an_unwritten_state_skips_the_link_exactly(options: dict) -> None:
    """A state from ``initial_state`` (here primed with memory and reads, as recall does,
    link and precedence untouched) skips the first step's link update; values and every
    gradient are bit-equal to the full update of the same zero link (a copy, which the DNC
    cannot know to be empty). With sharpening nothing is skipped (zero sharpens to uniform)."""
    model = small_dnc(**options)
    x = torch.randn(3, 6, 4, requires_grad=True)
    primed = random_state(model, 3)
    primed = primed._replace(read_weights=primed.read_weights.requires_grad_(),
                             memory=primed.memory.requires_grad_())
    calls = []
    full_update = model._link_read
    model._link_read = lambda *a: calls.append(1) or full_update(*a)

    def run(state: DNCState) -> tuple[list[torch.Tensor], int]:
        calls.clear()
        y, final = model(x, state)
        leaves = [x, primed.read_weights, primed.memory, *model.parameters()]
        grads = torch.autograd.grad((y.square().sum() + final.link.sum()), leaves,
                                    allow_unused=True)
        return [y, *final, *(g for g in grads if g is not None)], len(calls)

    skipped, n_skipped = run(primed)
    full, n_full = run(primed._replace(link=primed.link.clone()))
    assert n_full == 6
    assert n_skipped == (6 if model.learned_sharpness or model.fixed_sharpness else 5)
    assert len(skipped) == len(full)
    for a, b in zip(skipped, full, strict=True):
        assert torch.equal(a, b)
