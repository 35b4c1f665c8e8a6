"""CUDA-graph replay of the DNC: the per-signature bookkeeping (on any machine, with a
capture that runs eagerly) and, where a GPU exists, equality with the eager DNC."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.func import functional_call

from cl_lightning.models.cuda_graphs import GraphCache, paused
from cl_lightning.models.dnc import DNC, DNCState

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


class _Replayed(torch.autograd.Function):
    """Stands in for a graph replay: one autograd node over the outputs, like the real one."""

    @staticmethod
    def forward(ctx, *outputs):
        return tuple(o.clone() for o in outputs)

    @staticmethod
    def backward(ctx, *grads):
        return grads


class EagerCapture:
    """A capture that runs the function eagerly; records what was captured."""

    def __init__(self) -> None:
        self.captured: list[tuple] = []

    def __call__(self, module, fn, sample_args, grad):
        self.captured.append((tuple(a.shape for a in sample_args), grad))

        def replay(*args):
            outputs = fn(*args)
            return _Replayed.apply(*outputs) if grad else tuple(o.detach() for o in outputs)

        return replay


def small_dnc(**kw) -> DNC:
    torch.manual_seed(0)
    return DNC(4, 3, hidden_size=8, memory_slots=6, word_size=5, read_heads=2, **kw)


def test_one_capture_per_signature_and_grad_mode() -> None:
    dnc, capture = small_dnc(), EagerCapture()
    cache = GraphCache(dnc, capture)
    x = torch.randn(2, 3, 4)
    for _ in range(3):
        y = cache.run(dnc._flat_forward, (x,))[0]
        y.sum().backward()
    with torch.no_grad():
        cache.run(dnc._flat_forward, (x,))
    cache.run(dnc._flat_forward, (torch.randn(5, 3, 4),))
    assert capture.captured == [(((2, 3, 4),), True), (((2, 3, 4),), False),
                                (((5, 3, 4),), True)]
    assert cache.replays == 5


def test_flat_forward_through_the_cache_equals_the_eager_dnc() -> None:
    dnc = small_dnc()
    cache = GraphCache(dnc, EagerCapture())
    x = torch.randn(2, 3, 4)
    start = dnc(torch.randn(2, 2, 4))[1].detach()
    memory = start.memory.clone().requires_grad_()
    state = start._replace(memory=memory)
    outputs = cache.run(dnc._flat_forward, (x, *state))
    y, new_state = outputs[0], DNCState(*outputs[1:])
    (y.square().sum() + new_state.memory.sum()).backward()
    got = [memory.grad.clone()] + [p.grad.clone() for p in dnc.parameters()]
    memory.grad = None
    dnc.zero_grad()
    y_ref, state_ref = dnc(x, state)
    (y_ref.square().sum() + state_ref.memory.sum()).backward()
    assert torch.equal(y, y_ref) and all(
        torch.equal(a, b) for a, b in zip(new_state, state_ref, strict=True))
    want = [memory.grad] + [p.grad for p in dnc.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_a_forward_in_flight_keeps_its_capture_busy() -> None:
    dnc, capture = small_dnc(), EagerCapture()
    cache = GraphCache(dnc, capture, max_instances=2)
    x = torch.randn(2, 3, 4)
    first = cache.run(dnc._flat_forward, (x,))[0]
    second = cache.run(dnc._flat_forward, (x,))[0]  # the first's backward is pending
    assert len(capture.captured) == 2
    assert cache.run(dnc._flat_forward, (x,)) is None  # both busy, no third capture: eager
    (first.sum() + second.sum()).backward()
    cache.run(dnc._flat_forward, (x,))[0].sum().backward()  # free again: reused
    assert len(capture.captured) == 2


def test_a_dropped_forward_frees_its_capture() -> None:
    dnc, capture = small_dnc(), EagerCapture()
    cache = GraphCache(dnc, capture, max_instances=1)
    x = torch.randn(2, 3, 4)
    outputs = cache.run(dnc._flat_forward, (x,))
    assert cache.run(dnc._flat_forward, (x,)) is None
    del outputs
    gc.collect()
    assert cache.run(dnc._flat_forward, (x,)) is not None
    assert len(capture.captured) == 1


def test_swapped_in_weights_autocast_and_new_parameters() -> None:
    dnc, capture = small_dnc(), EagerCapture()
    cache = GraphCache(dnc, capture)
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        cache.run(dnc._flat_forward, (x,))

    class Probe(nn.Module):  # calls the cache while functional_call has swapped weights in
        def __init__(self) -> None:
            super().__init__()
            self.dnc = dnc

        def forward(self, x):
            return cache.run(self.dnc._flat_forward, (x,))

    fast = {f"dnc.{name}": p * 2.0 for name, p in dnc.named_parameters()}
    with torch.no_grad():
        assert functional_call(Probe(), fast, (x,)) is None  # fast weights: eager
        assert cache.run(dnc._flat_forward, (x,)) is not None  # the real ones again
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert cache.run(dnc._flat_forward, (x,)) is None
    assert len(capture.captured) == 1
    dnc.output.weight = nn.Parameter(dnc.output.weight.detach().clone())  # rebuilt
    with torch.no_grad():
        cache.run(dnc._flat_forward, (x,))
    assert len(capture.captured) == 2 and len(cache.graphs) == 1
    dnc.output.requires_grad_(False)  # frozen: a graph made before would still train it
    with torch.no_grad():
        cache.run(dnc._flat_forward, (x,))
    assert len(capture.captured) == 3 and len(cache.graphs) == 1


def test_a_failed_capture_warns_once_and_runs_eagerly_after() -> None:
    dnc, calls = small_dnc(), []

    def failing(module, fn, sample_args, grad):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing\ndetails")

    cache = GraphCache(dnc, failing)
    x = torch.randn(2, 3, 4)
    with pytest.warns(UserWarning, match="operation not permitted.*runs eagerly"):
        assert cache.run(dnc._flat_forward, (x,)) is None
    assert cache.run(dnc._flat_forward, (torch.randn(4, 3, 4),)) is None
    assert calls == [1]  # no second attempt


def test_paused_runs_eagerly() -> None:
    dnc, capture = small_dnc(), EagerCapture()
    cache = GraphCache(dnc, capture)
    x = torch.randn(2, 3, 4)
    with paused(), torch.no_grad():
        assert cache.run(dnc._flat_forward, (x,)) is None
        with paused():
            pass
        assert cache.run(dnc._flat_forward, (x,)) is None  # still paused after the inner one
    with torch.no_grad():
        assert cache.run(dnc._flat_forward, (x,)) is not None


@cuda
def test_gpu_replay_equals_eager_with_two_forwards_and_accumulated_gradients() -> None:
    eager = small_dnc(cuda_graphs=False).cuda()
    graphed = small_dnc().cuda()
    xs = [torch.randn(3, 5, 4, device="cuda") for _ in range(2)]
    for model in (eager, graphed):
        for _ in range(2):  # the second round replays (and accumulates into .grad)
            ys = [model(x)[0] for x in xs]  # two forwards in flight before the backward
            sum(y.square().sum() for y in ys).backward()
        model.result = [y.detach() for y in ys]
    for a, b in zip(eager.result, graphed.result, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(eager.parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@cuda
def test_gpu_fast_weights_run_eagerly_and_stay_exact() -> None:
    dnc = small_dnc().cuda()
    x = torch.randn(3, 5, 4, device="cuda")
    dnc(x)[0].sum().backward()  # captured with the real parameters
    fast = {name: p * 2.0 for name, p in dnc.named_parameters()}
    got = functional_call(dnc, fast, (x,))[0]
    reference = small_dnc(cuda_graphs=False).cuda()
    want = functional_call(reference, {n: p * 2.0 for n, p in reference.named_parameters()},
                           (x,))[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@cuda
def test_gpu_second_order_gradients_need_the_pause() -> None:
    dnc = small_dnc().cuda()
    x = torch.randn(3, 5, 4, device="cuda")
    dnc(x)[0].sum().backward()  # captured

    def grad_norm() -> torch.Tensor:
        params = dict(dnc.named_parameters())
        loss = functional_call(dnc, params, (x,))[0].square().sum()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True,
                                    allow_unused=True)
        return sum(g.square().sum() for g in grads if g is not None)

    with paused():
        want = torch.autograd.grad(grad_norm(), dnc.output.weight)[0]
    reference = small_dnc(cuda_graphs=False).cuda()
    params = dict(reference.named_parameters())
    loss = functional_call(reference, params, (x,))[0].square().sum()
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True,
                                allow_unused=True)
    norm = sum(g.square().sum() for g in grads if g is not None)
    torch.testing.assert_close(want, torch.autograd.grad(norm, reference.output.weight)[0],
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError):  # a replay has no double backward
        torch.autograd.grad(grad_norm(), dnc.output.weight)
