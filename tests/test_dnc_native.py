"""The DNC's C++ kernels (``cpp_kernels="link"`` / ``"step"``) equal the reference math and
the PyTorch path.

Skipped where the kernels cannot be built (no C++ compiler or ninja): the DNC then refuses
the option in one line, tested here with a build that fails on purpose.
"""

from __future__ import annotations

import pytest
import torch

from cl_lightning.checks import OptionError
from cl_lightning.models import dnc_kernels as kernels
from cl_lightning.models import dnc_native
from cl_lightning.models.dnc import DNC, lstm_cell
from tests.test_dnc import (
    _link_inputs,
    _link_read_reference,
    check_kernel_against_reference,
    random_distribution,
)


@pytest.fixture(scope="module")
def built() -> None:
    try:
        dnc_native.load()
    except OptionError as err:
        pytest.skip(f"the C++ kernels cannot be built here: {err}")


def native_link_read(*args):
    return kernels.fused_link_read(*args, native=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_lstm_backward_rounds_as_the_aten_expressions(built, dtype) -> None:
    """The LSTM cell's backward, one C++ pass per element, equals the ATen expressions of
    the chain rule bit for bit: each product and difference rounded on its own, none fused
    into a multiply-add by the compiler."""
    g = torch.Generator().manual_seed(0)
    batch, hidden = 7, 37
    act = torch.rand(batch, 4 * hidden, generator=g, dtype=dtype)
    act[:, 3 * hidden:] = act[:, 3 * hidden:] * 2 - 1  # tanh's range
    c, g_h2, g_c2 = (torch.randn(batch, hidden, generator=g, dtype=dtype) for _ in range(3))
    tc = torch.tanh(torch.randn(batch, hidden, generator=g, dtype=dtype))
    i, f, o, cell = act.split(hidden, 1)
    total = g_c2 + g_h2 * o * (1 - tc * tc)
    gates = torch.cat([total * cell * (i * (1 - i)), total * c * (f * (1 - f)),
                       g_h2 * tc * (o * (1 - o)), total * i * (1 - cell * cell)], 1)
    got_gates, got_c = dnc_native.load().lstm_cell_backward(act, c, tc, g_h2, g_c2)
    assert torch.equal(got_gates, gates)
    assert torch.equal(got_c, total * f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip", [0.0, 0.7])
def test_native_interface_backward_rounds_as_the_aten_expressions(built, dtype, clip) -> None:
    """The interface's backward through softplus, sigmoids, the read modes' softmax and the
    clamp, one C++ pass per sample, equals the ATen expressions bit for bit (with a clamp
    that bites on about half the entries, and without one)."""
    g = torch.Generator().manual_seed(1)
    batch, reads, word = 5, 3, 7
    size = reads * word + 2 * word + reads + 1 + word + reads + 2 + 3 * reads

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    raw, g_raw = rand(batch, size), rand(batch, size)
    softplus_grad = torch.sigmoid(rand(batch, reads + 1))
    sig = torch.sigmoid(rand(batch, word + reads + 2))
    modes = torch.softmax(rand(batch, reads, 3), -1)
    gm_memory, gm_diagnostic = rand(batch, reads, 3), rand(batch, reads, 3)
    got = dnc_native.load().interface_activations_backward(
        raw, softplus_grad, sig, modes, gm_memory, gm_diagnostic, clip, g_raw)
    want = g_raw.clone()
    s = reads * word + 2 * word
    want[:, s:s + reads + 1] *= softplus_grad
    want[:, s + reads + 1:s + reads + 1 + sig.shape[1]] *= sig * (1 - sig)
    gm = gm_memory + gm_diagnostic
    want[:, size - 3 * reads:] = (modes * (gm - (gm * modes).sum(-1, True))).reshape(batch, -1)
    if clip:
        want *= raw.abs() <= clip
    assert torch.equal(got, want)


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


def memory_step_inputs(batch: int = 2, n: int = 7, w: int = 5, r: int = 3,
                       spread_usage: bool = True) -> tuple:
    """Inputs of :func:`fused_memory_step` in float64, each needing a gradient but the
    previous write weights (constants of the step). With ``spread_usage`` the usages are
    far apart (no sort order changes under gradcheck's perturbations)."""
    link = torch.rand(batch, n, n) * 0.3 / n
    link.diagonal(dim1=-2, dim2=-1).zero_()
    usage = (torch.randperm(n).float() / n + 0.05 * torch.rand(n)).repeat(batch, 1) \
        if spread_usage else torch.rand(batch, n)
    raw = torch.randn(batch, r * w + 3 * w, dtype=torch.float64)  # keys and vectors, strided
    tensors = [
        torch.randn(batch, n, w), usage, link, random_distribution(batch, n),
        random_distribution(batch, r, n), random_distribution(batch, n),
    ]
    tensors = [t.double() for t in tensors]
    gates = torch.rand(batch, 2 * r + 4, dtype=torch.float64)
    modes = torch.softmax(torch.randn(batch, r, 3, dtype=torch.float64), -1)
    inputs = tensors + [
        raw[:, : r * w].unflatten(-1, (r, w)),  # read keys: a strided view, like the interface's
        gates[:, :r] * 3,                       # read strengths
        raw[:, r * w: r * w + w],               # write key
        gates[:, r] * 3,                        # write strength
        torch.rand(batch, w, dtype=torch.float64),  # erase vector
        raw[:, r * w + w: r * w + 2 * w],       # write vector
        gates[:, r + 2: 2 * r + 2],             # free gates
        gates[:, 2 * r + 2],                    # allocation gate
        gates[:, 2 * r + 3],                    # write gate
        modes,
    ]
    return tuple(t.detach().requires_grad_(i != 5) for i, t in enumerate(inputs))


def test_native_memory_step_equals_reference(built) -> None:
    """The whole memory step against the composition of reference functions it replaces:
    values, first-order gradients (the C++ backward) and second-order gradients (through the
    reference), float64 and float32, gradcheck and gradgradcheck, inputs given as strided
    views (as the interface's fields are)."""
    torch.manual_seed(2)
    check_kernel_against_reference(kernels.fused_memory_step, kernels._memory_step_reference,
                                   memory_step_inputs())


@pytest.mark.parametrize("heads", [4, 7])
def test_native_memory_step_on_a_fresh_state_and_usage_ties(built, heads) -> None:
    """A never-written state (zero memory, usage, link; every usage tied, so the stable sort
    decides) and a random one at N 40: equal outputs and first-order gradients in float64,
    and the invariants of the step's weightings (sums at most 1, usage in [0, 1]). Seven read
    heads: the read vectors and their gradients go four heads per pass, then three."""
    torch.manual_seed(3)
    for fresh in (True, False):
        inputs = list(memory_step_inputs(batch=3, n=40, w=9, r=heads, spread_usage=False))
        if fresh:
            for i in (0, 1, 2, 3, 4, 5):
                inputs[i] = torch.zeros_like(inputs[i]).requires_grad_(i != 5)
        got = kernels.fused_memory_step(*inputs)
        want = kernels._memory_step_reference(*inputs)
        for a, c in zip(got, want, strict=True):
            torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-10)
        upstream = [torch.randn_like(t) for t in want]
        wanted = [t for t in inputs if t.requires_grad]
        for a, c in zip(torch.autograd.grad(got, wanted, upstream),
                        torch.autograd.grad(want, wanted, upstream), strict=True):
            torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-8)
        _, usage, _, precedence, reads, writes, _, allocation = got
        assert usage.min() >= 0 and usage.max() <= 1
        for weights in (precedence, reads, writes, allocation):
            assert weights.min() >= -1e-12 and weights.sum(-1).max() <= 1 + 1e-12


@pytest.mark.parametrize("clip, strengths", [(None, "softplus"), (0.4, "oneplus")])
def test_native_time_step_equals_reference(built, clip, strengths: str) -> None:
    """The whole time step (LSTM controller, interface layer, clamp and activations, memory
    step) against the DNC's own PyTorch composition of it (``reference_time_step``): values,
    first- and second-order gradients in float64 and float32, gradcheck and gradgradcheck,
    for every input including the three weights. With a clip of 0.4 some interface
    pre-activations are clamped (checked), so the clamp's zero gradient is exercised."""
    torch.manual_seed(4)
    batch, n, w, r, hidden = 2, 7, 5, 3, 6
    dnc = DNC(4, 3, hidden_size=hidden, memory_slots=n, word_size=w, read_heads=r,
              clip_value=clip, strength_activation=strengths, cpp_kernels="step").double()
    size = dnc.interface.weight.shape[0]
    inputs = (
        torch.randn(batch, 4 * hidden),                    # the input's gate contribution
        torch.randn(batch, hidden) * 0.5, torch.randn(batch, hidden),   # h, c
        torch.randn(batch, r, w),                          # previous read vectors
        *memory_step_inputs(batch, n, w, r)[:6],           # memory, usage, link, ..., writes
        torch.randn(4 * hidden, r * w + hidden) * 0.3,     # recurrent gate weights
        torch.randn(size, hidden), torch.randn(size) * 0.5,  # interface weight and bias
    )
    inputs = tuple(t.detach().double().requires_grad_(i != 9) for i, t in enumerate(inputs))
    if clip is not None:
        h, _ = lstm_cell(*inputs[:1], inputs[3], inputs[1], inputs[2], inputs[10])
        raw = torch.nn.functional.linear(h, inputs[11], inputs[12])
        assert (raw.abs() > clip).any() and (raw.abs() < clip).any()

    def native(*tensors):
        return kernels.fused_time_step(dnc.reference_time_step, dnc.clip_value,
                                       strengths == "oneplus", *tensors)

    check_kernel_against_reference(native, dnc.reference_time_step, inputs)


@pytest.mark.parametrize("clip, strengths", [(None, "softplus"), (0.4, "oneplus")])
def test_native_sequence_equals_reference(built, clip, strengths: str) -> None:
    """Three time steps as one C++ call each way against the same steps composed in PyTorch
    (``sequence_reference`` over the DNC's ``reference_time_step``): values, first- and
    second-order gradients in float64 and float32, for the inputs of every step, the
    starting state and the three weights (not against finite differences: like the DNC's,
    the usage update stops the gradient of the previous step's write weights, a real
    dependency once the steps chain). Without anything to differentiate the call keeps no
    autograd graph and gives the same values."""
    torch.manual_seed(5)
    batch, n, w, r, hidden, steps = 2, 6, 4, 2, 5, 3
    dnc = DNC(4, 3, hidden_size=hidden, memory_slots=n, word_size=w, read_heads=r,
              clip_value=clip, strength_activation=strengths, cpp_kernels="step").double()
    size = dnc.interface.weight.shape[0]
    inputs = (
        torch.randn(batch, steps, 4 * hidden),             # every step's gate contribution
        torch.randn(batch, hidden) * 0.5, torch.randn(batch, hidden),   # h, c
        torch.randn(batch, r, w),                          # read vectors
        *memory_step_inputs(batch, n, w, r)[:6],           # memory, usage, link, ..., writes
        torch.randn(4 * hidden, r * w + hidden) * 0.3,     # recurrent gate weights
        torch.randn(size, hidden), torch.randn(size) * 0.5,  # interface weight and bias
    )
    inputs = tuple(t.detach().double().requires_grad_(i != 9) for i, t in enumerate(inputs))
    oneplus = strengths == "oneplus"

    def native(*tensors):
        return kernels.fused_sequence(dnc.reference_time_step, dnc.clip_value, oneplus,
                                      *tensors)

    def reference(*tensors):
        return kernels.sequence_reference(dnc.reference_time_step, *tensors)

    check_kernel_against_reference(native, reference, inputs, numerical=False)
    with torch.no_grad():
        plain = native(*inputs)
    for a, c in zip(plain, native(*inputs), strict=True):
        assert a.grad_fn is None and torch.equal(a, c.detach())


def test_dnc_sequence_call_equals_its_steps_bit_for_bit(built, monkeypatch) -> None:
    """With ``step`` a DNC runs a whole sequence as one C++ call each way; asking for a
    trace runs the same kernels one time step at a time. Outputs, final state and every
    parameter gradient are bitwise equal between the two, so the sequence call changes no
    result, only the time it takes."""
    torch.manual_seed(6)
    dnc = DNC(5, 4, hidden_size=8, memory_slots=10, word_size=6, read_heads=2,
              cpp_kernels="step")
    x = torch.randn(3, 5, 5)
    calls = []
    sequence = kernels.fused_sequence
    monkeypatch.setattr(kernels, "fused_sequence",
                        lambda *args: calls.append(1) or sequence(*args))
    runs = []
    for trace in (False, True):
        y, state, *_ = dnc(x, return_trace=trace)
        runs.append((y, state, torch.autograd.grad((y.square().sum() + state.memory.sum()),
                                                   list(dnc.parameters()))))
    (y1, s1, g1), (y2, s2, g2) = runs
    assert len(calls) == 1  # the sequence call without a trace, the steps with one
    assert torch.equal(y1, y2)
    assert all(torch.equal(a, b) for a, b in zip(s1, s2, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


@pytest.mark.parametrize("kernel", ["link", "step"])
def test_dnc_with_cpp_kernels_equals_the_default(built, kernel: str) -> None:
    """A DNC with C++ kernels computes the default DNC's outputs and parameter gradients to
    float32 rounding from a fresh state, eager and with the compiled step (the link kernel
    inside the compiled graph as the custom operator, also for ``step``); the per-step trace
    matches too. Types and devices the kernels do not serve (float16) run the PyTorch path,
    bit for bit."""
    torch.manual_seed(0)
    sizes = dict(hidden_size=16, memory_slots=12, word_size=6, read_heads=3)
    default = DNC(5, 4, **sizes)
    native = DNC(5, 4, cpp_kernels=kernel, **sizes)
    native.load_state_dict(default.state_dict())
    x = torch.randn(4, 6, 5)
    y_ref, _, trace_ref = default(x, return_trace=True)
    g_ref = torch.autograd.grad(y_ref.square().sum(), list(default.parameters()))
    y, _, trace = native(x, return_trace=True)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    # The trace is per slot. Two usages a rounding apart may sort the other way under
    # another CPU's rounding, and the write then goes to the other free slot: the same
    # memory with two slots swapped (the outputs above stay equal). So each step's values
    # over the slots are compared as a set.
    for a, c in zip(trace, trace_ref, strict=True):
        torch.testing.assert_close(a.sort(-1).values, c.sort(-1).values, atol=1e-5, rtol=1e-4)
    for compiled in (False, True):
        native.compile_step = compiled
        y = native(x)[0]
        g = torch.autograd.grad(y.square().sum(), list(native.parameters()))
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        for a, c in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)
    assert f"cpp_kernels={kernel}" in repr(native) and "cpp_kernels" not in repr(default)
    half = [t.half() for t in _link_inputs(1, 2)]
    for a, c in zip(kernels.fused_link_read(*half, native=True),
                    kernels.fused_link_read(*half), strict=True):
        assert torch.equal(a, c)


def test_bad_cpp_kernels_options_fail_in_one_line(monkeypatch) -> None:
    with pytest.raises(OptionError,
                       match=r"cpp_kernels must be 'none', 'auto', 'link' or 'step', got"):
        DNC(4, 3, cpp_kernels="fast")
    for options in ({"write_heads": 2}, {"masking": True}, {"sharpness": True},
                    {"temporal_links": False}, {"dealloc": True}):
        with pytest.raises(OptionError, match="cpp_kernels step serves one write head"):
            DNC(4, 3, cpp_kernels="step", **options)

    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore lines")

    from torch.utils import cpp_extension

    dnc_native.load.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    try:
        with pytest.raises(OptionError) as err:
            DNC(4, 3, cpp_kernels="link")
        message = str(err.value)
        assert "\n" not in message and "cpp_kernels" in message and "Ninja" in message
        assert "cpp_kernels none or auto" in message
        dnc_native.available.cache_clear()
        with pytest.warns(UserWarning, match=r"cpp_kernels auto: the C\+\+ kernels cannot be "
                          r"built here \(Ninja is required to load C\+\+ extensions\); the DNC "
                          "runs in PyTorch"):
            auto = DNC(4, 3, cpp_kernels="auto")
        assert auto.cpp_kernels == "none" and "cpp_kernels" not in repr(auto)
    finally:
        monkeypatch.undo()
        dnc_native.load.cache_clear()
        dnc_native.available.cache_clear()


def test_auto_takes_the_fastest_kernel_that_serves_the_options(built) -> None:
    """``auto`` resolves to ``step`` for one write head (the default options), to ``link``
    where ``step`` cannot serve (two write heads, sharpening), to ``none`` without the
    fused path or without temporal links (nothing to run), and the resolved kernel is in
    the module's repr."""
    assert DNC(4, 3, cpp_kernels="auto").cpp_kernels == "step"
    for options in ({"write_heads": 2}, {"sharpness": True}, {"masking": True}):
        dnc = DNC(4, 3, cpp_kernels="auto", **options)
        assert dnc.cpp_kernels == "link" and "cpp_kernels=link" in repr(dnc)
    assert DNC(4, 3, cpp_kernels="auto", fused=False).cpp_kernels == "none"
    assert DNC(4, 3, cpp_kernels="auto", temporal_links=False).cpp_kernels == "none"


def test_a_failed_build_names_the_compiler_error() -> None:
    """The one-line message names the compiler's first error, not the build command."""
    log = ("Error building extension 'x': [1/5] c++ -MMD -c a.cpp -o a.o\n"
           "a.cpp:55:29: error: cannot bind non-const lvalue reference\nninja: build stopped")
    assert dnc_native.failure_reason(RuntimeError(log)) == (
        "a.cpp:55:29: error: cannot bind non-const lvalue reference")
    assert dnc_native.failure_reason(RuntimeError("Ninja is required\nmore")) == (
        "Ninja is required")
