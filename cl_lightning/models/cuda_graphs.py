"""Replay a module's forward (and its backward) from CUDA graphs, one capture per input
signature.

A small recurrent step such as the DNC's launches hundreds of tiny kernels per sequence; on
a GPU the launches, not the arithmetic, set its speed. Captured once as a CUDA graph, the
whole forward (or backward) over the sequence is one launch. The captured graph reads and
writes fixed memory, which sets the rules this module enforces:

* One capture per *signature*: input shapes, dtypes and ``requires_grad``, grad mode and
  inference mode. A new signature is captured on its first call (a few eager warm-up runs
  and the capture); after ``max_signatures`` the calls of further signatures run eagerly.
* A forward with grad keeps its activations inside the graph's memory until its backward
  has run. A second forward of the same signature before that backward would overwrite
  them, so each signature keeps a few *instances* (separate captures); an instance is busy
  from its forward until its backward has run or its autograd graph is freed. With every
  instance busy the call runs eagerly.
* A capture that fails (an operation CUDA cannot capture) is reported once as a warning,
  and the module runs eagerly from then on.
* The graph reads the parameters it was captured with. Calls whose parameters are not
  those (``torch.func.functional_call`` with MAML's fast weights, a module moved to
  another device) run eagerly; outputs are returned as copies, never as the graph's own
  buffers. Under autocast the calls run eagerly. A replay has no double backward: code that
  differentiates twice runs inside :func:`paused` (second-order MAML does); a double
  backward through a replay otherwise raises an error.

Capture and replay are injected (:class:`GraphCache` takes a ``capture`` function), so the
bookkeeping is testable without a GPU.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

_PAUSE = threading.local()

Run = Callable[..., tuple[Tensor, ...]]
Capture = Callable[[nn.Module, Run, Sequence[Tensor], bool], Run]
"""``capture(module, fn, sample_args, grad)`` -> a replay function with ``fn``'s signature."""


def capture_on_gpu(module: nn.Module, fn: Run, sample_args: Sequence[Tensor],
                   grad: bool) -> Run:
    """CUDA graphs of ``fn``'s forward and, with ``grad``, its backward to the arguments
    and ``module``'s parameters (the arguments' ``requires_grad`` as in ``sample_args``).
    Returns a function of the same arguments; its outputs and gradients are fresh tensors,
    never the graphs' buffers (a gradient accumulated over two backward passes would
    otherwise be overwritten by the second replay)."""
    static = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in sample_args)
    params = tuple(p for p in module.parameters() if p.requires_grad) if grad else ()
    grad = grad and any(t.requires_grad for t in static + params)  # else nothing to train
    wrt = [t for t in static + params if t.requires_grad]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # lazy initialisation (cuBLAS workspaces) stays out of the capture
            outputs = fn(*static)
            if grad:
                _grads_of(outputs, wrt, [torch.ones_like(o) for o in outputs if o.requires_grad])
    torch.cuda.current_stream().wait_stream(stream)
    pool = torch.cuda.graph_pool_handle()
    forward = torch.cuda.CUDAGraph()
    # thread_local: CUDA work of other threads (a loader's pinning thread) cannot void it
    with torch.cuda.graph(forward, pool=pool, stream=stream, capture_error_mode="thread_local"):
        outputs = fn(*static)
    if not grad:
        def replay_forward(*args: Tensor) -> tuple[Tensor, ...]:
            _load(static, args)
            forward.replay()
            return tuple(o.clone() for o in outputs)

        return replay_forward

    differentiable = [o.requires_grad for o in outputs]
    grad_buffers = [torch.empty_like(o) for o, d in zip(outputs, differentiable, strict=True)
                    if d]
    backward = torch.cuda.CUDAGraph()
    with torch.cuda.graph(backward, pool=pool, stream=stream,
                          capture_error_mode="thread_local"):
        found = iter(_grads_of(outputs, wrt, grad_buffers))
    # Per input of the replay (the arguments, then the parameters): its gradient buffer.
    input_grads = [next(found) if t.requires_grad else None for t in static + params]

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs: Tensor) -> tuple[Tensor, ...]:
            _load(static, inputs[: len(static)])
            forward.replay()
            return tuple(o.clone() for o in outputs)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
            wanted = (g for g, d in zip(grads, differentiable, strict=True) if d)
            for buffer, g in zip(grad_buffers, wanted, strict=True):
                buffer.copy_(g)
            backward.replay()
            return tuple(None if g is None else g.clone() for g in input_grads)

    def replay(*args: Tensor) -> tuple[Tensor, ...]:
        return Replay.apply(*args, *params)

    return replay


def _grads_of(outputs: Sequence[Tensor], wrt: list[Tensor],
              grad_outputs: list[Tensor]) -> tuple[Tensor, ...]:
    """Gradients of the differentiable outputs to ``wrt``; zeros for an unused input."""
    used = [o for o in outputs if o.requires_grad]
    grads = torch.autograd.grad(used, wrt, grad_outputs, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt,
                                                                          strict=True))


def _load(static: Sequence[Tensor], args: Sequence[Tensor]) -> None:
    """Copy the call's arguments into the graph's input buffers."""
    for buffer, arg in zip(static, args, strict=True):
        if buffer.data_ptr() != arg.data_ptr():
            buffer.copy_(arg)


class _Instance:
    """One capture of a signature; ``busy`` while a replay's backward is pending."""

    def __init__(self, replay: Run) -> None:
        self.replay = replay
        self.busy = False

    def release(self, *_: Any) -> None:
        self.busy = False


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Every call inside runs eagerly (for code that differentiates twice)."""
    depth = getattr(_PAUSE, "depth", 0)
    _PAUSE.depth = depth + 1
    try:
        yield
    finally:
        _PAUSE.depth = depth


class GraphCache:
    """The captured graphs of one module, by signature (see the module docstring).

    Args:
        module: the module whose parameters the graphs read.
        capture: builds a replay function (:func:`capture_on_gpu`).
        max_signatures: signatures captured at most; later new ones run eagerly.
        max_instances: captures per signature (forwards with grad in flight at once).
    """

    def __init__(self, module: nn.Module, capture: Capture = capture_on_gpu,
                 max_signatures: int = 8, max_instances: int = 3) -> None:
        self.module = weakref.ref(module)
        self.capture = capture
        self.max_signatures, self.max_instances = max_signatures, max_instances
        self.params = self._param_ids(module)
        self.graphs: dict[tuple, list[_Instance]] = {}
        self.captures = 0
        self.replays = 0
        self.failed: str | None = None  # why a capture failed (then every call is eager)

    @staticmethod
    def _param_ids(module: nn.Module) -> tuple | None:
        """Storage and ``requires_grad`` of every parameter (a graph computes the gradients
        of the parameters that required them at capture), or None when one is not a real
        parameter (a fast weight swapped in by ``functional_call``)."""
        ids = []
        for p in module.parameters():
            if not isinstance(p, nn.Parameter):
                return None
            ids.append((p.data_ptr(), p.device, p.dtype, p.shape, p.requires_grad))
        return tuple(ids)

    def run(self, fn: Run, args: Sequence[Tensor]) -> tuple[Tensor, ...] | None:
        """``fn(*args)`` from a graph; None where the call must run eagerly."""
        module = self.module()
        if (module is None or self.failed or getattr(_PAUSE, "depth", 0)
                or torch.is_autocast_enabled(args[0].device.type)):
            return None
        params = self._param_ids(module)
        if params is None:
            return None
        if params != self.params:  # moved, rebuilt or (un)frozen: the old graphs are stale
            self.graphs, self.params = {}, params
        grad = torch.is_grad_enabled()
        key = (grad, torch.is_inference_mode_enabled(),
               tuple((a.shape, a.dtype, a.requires_grad) for a in args))
        instances = self.graphs.get(key)
        if instances is None:
            if len(self.graphs) >= self.max_signatures:
                return None
            instances = self.graphs[key] = []
        instance = next((i for i in instances if not i.busy), None)
        if instance is None:
            if len(instances) >= self.max_instances:
                return None
            try:
                instance = _Instance(self.capture(module, fn, args, grad))
            except RuntimeError as error:  # e.g. an operation that cannot be captured
                self.failed = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                warnings.warn(f"CUDA-graph capture of {type(module).__name__} failed "
                              f"({self.failed}); it runs eagerly from now on (set its "
                              "cuda_graphs option false to skip the attempt)", stacklevel=3)
                return None
            instances.append(instance)
            self.captures += 1
        outputs = instance.replay(*args)
        self.replays += 1
        node = next((o.grad_fn for o in outputs if o.grad_fn is not None), None)
        if node is not None:
            # The replay's activations stay in use until its backward (or never, if the
            # autograd graph is dropped): the replay node's post-hook or finaliser frees them.
            instance.busy = True
            node.register_hook(instance.release)
            weakref.finalize(node, instance.release)
        return outputs


_CACHES: weakref.WeakKeyDictionary[nn.Module, GraphCache] = weakref.WeakKeyDictionary()


def graph_cache(module: nn.Module, capture: Capture = capture_on_gpu) -> GraphCache:
    """The module's :class:`GraphCache` (made on first use; it is not a module attribute,
    so copies, pickles and checkpoints of the module never carry graphs)."""
    cache = _CACHES.get(module)
    if cache is None or cache.capture is not capture:
        cache = _CACHES[module] = GraphCache(module, capture)
    return cache
