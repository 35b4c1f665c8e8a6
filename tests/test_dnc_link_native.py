"""The C++ link kernel (``link_kernel="cpp"``) equals the reference math and the ATen path.

Skipped where the kernel cannot be built (no C++ compiler or ninja): the DNC then refuses
the option in one line, tested here with a build that fails on purpose.
"""

from __future__ import annotations

import pytest
import torch

from cl_lightning.checks import OptionError
from cl_lightning.models import dnc_kernels as kernels
from cl_lightning.models import dnc_link_native
from cl_lightning.models.dnc import DNC
from tests.test_dnc import (
    _link_inputs,
    _link_read_reference,
    check_kernel_against_reference,
    random_distribution,
)


@pytest.fixture(scope="module")
def built() -> None:
    try:
        dnc_link_native.load()
    except OptionError as err:
        pytest.skip(f"the C++ link kernel cannot be built here: {err}")


def native_link_read(*args):
    return kernels.fused_link_read(*args, native=True)


@pytest.mark.parametrize("heads", [(1, 1), (2, 3), (2, 2, True)])
def test_native_link_equals_reference(built, heads: tuple) -> None:
    """Values, first-order gradients (the C++ backward) and second-order gradients (through
    the reference) in float64 and float32, gradcheck and gradgradcheck; with two write
    heads and a constant state (only the write weights need a gradient) too."""
    torch.manual_seed(0)
    check_kernel_against_reference(native_link_read, _link_read_reference, _link_inputs(*heads))


def test_native_link_equals_the_aten_path_on_a_written_chain(built) -> None:
    """Ten steps of a link chain at a size where every loop runs many vector lanes and a
    remainder (N 37, R 4, B 3): the native and ATen paths agree to float32 rounding, values
    and the gradients that flow back through all ten links, and the chain keeps the
    invariants of a link (zero diagonal, rows and columns summing to at most 1)."""
    torch.manual_seed(1)
    b, r, n, steps = 3, 4, 37, 10
    writes = [random_distribution(b, 1, n).requires_grad_() for _ in range(steps)]
    reads = [random_distribution(b, r, n).requires_grad_() for _ in range(steps)]
    results = []
    for native in (True, False):
        link, prec, total = torch.zeros(b, 1, n, n), torch.zeros(b, 1, n), 0.0
        for w, rw in zip(writes, reads, strict=True):
            link, fwd, bwd = kernels.fused_link_read(link, prec, w, rw, native=native)
            prec = (1 - w.sum(-1, keepdim=True)) * prec + w
            total = total + (fwd * torch.linspace(0, 1, n)).sum() + bwd.square().sum()
        grads = torch.autograd.grad(total + link.sum(), writes + reads)
        results.append((link.detach(), grads))
    (link, g_native), (link_aten, g_aten) = results
    torch.testing.assert_close(link, link_aten, atol=1e-6, rtol=1e-5)
    for a, c in zip(g_native, g_aten, strict=True):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)
    assert link.diagonal(dim1=-2, dim2=-1).abs().max() == 0
    assert link.min() >= 0 and link.sum(-1).max() <= 1 + 1e-5 and link.sum(-2).max() <= 1 + 1e-5


def test_dnc_with_the_cpp_link_equals_the_default(built) -> None:
    """A DNC with ``link_kernel="cpp"`` computes the default DNC's outputs and parameter
    gradients to float32 rounding, eager and with the compiled step (the kernel inside the
    compiled graph as the custom operator); types and devices it does not serve (float16)
    run the ATen path, bit for bit."""
    torch.manual_seed(0)
    sizes = dict(hidden_size=16, memory_slots=12, word_size=6, read_heads=3)
    default = DNC(5, 4, **sizes)
    native = DNC(5, 4, link_kernel="cpp", **sizes)
    native.load_state_dict(default.state_dict())
    x = torch.randn(4, 6, 5)
    y_ref = default(x)[0]
    g_ref = torch.autograd.grad(y_ref.square().sum(), list(default.parameters()))
    for compiled in (False, True):
        native.compile_step = compiled
        y = native(x)[0]
        g = torch.autograd.grad(y.square().sum(), list(native.parameters()))
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        for a, c in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)
    assert "link_kernel=cpp" in repr(native) and "link_kernel" not in repr(default)
    half = [t.half() for t in _link_inputs(1, 2)]
    for a, c in zip(kernels.fused_link_read(*half, native=True),
                    kernels.fused_link_read(*half), strict=True):
        assert torch.equal(a, c)


def test_bad_link_kernel_options_fail_in_one_line(monkeypatch) -> None:
    with pytest.raises(OptionError, match=r"link_kernel must be 'aten' or 'cpp', got 'fast'"):
        DNC(4, 3, link_kernel="fast")

    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore lines")

    from torch.utils import cpp_extension

    dnc_link_native.load.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    try:
        with pytest.raises(OptionError) as err:
            DNC(4, 3, link_kernel="cpp")
        message = str(err.value)
        assert "\n" not in message and "link_kernel" in message and "Ninja" in message
        assert "link_kernel aten" in message
    finally:
        monkeypatch.undo()
        dnc_link_native.load.cache_clear()
