"""MAML inner loops in weight space: pure functions plus the :class:`MetaLearning` options.

The inner loop never touches a module's real parameters: it starts from them, takes
``steps`` SGD steps on a support loss with ``torch.autograd.grad`` and returns the adapted
tensors ("fast weights"), which a caller feeds to ``torch.func.functional_call``. With
``create_graph`` (second order) the outer loss differentiates through the inner updates;
first order (FOMAML) treats the inner gradients as constants. Gradients reach ``.grad``
only through the caller's single outer ``backward`` — which is what DDP synchronises.

The same :func:`inner_loop` serves the learner's meta-training, the few-shot evaluation
and ``benchmarks/maml_sine.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from cl_lightning.checks import OptionError, require_at_least

Params = dict[str, Tensor]
LossFn = Callable[[Params], Tensor]
StepLR = Callable[[int, str], Tensor | float]

GROUPS: dict[str, str] = {
    "head": r"^head\.",
    "controller": r"^core\.(input_gates|recurrent_gates|interface|weight_|bias_)",
    "all": r".",
}
"""Named parameter groups; any other string is used as a regular expression."""


def select_parameters(model: nn.Module, spec: str | Sequence[str],
                      option: str = "model.meta.params") -> list[str]:
    """Names of the trainable parameters of ``model`` that ``spec`` selects.

    ``spec``: ``head``, ``controller`` (the recurrent core's LSTM gates and interface),
    ``all``, a regular expression matched (``re.search``) against parameter names, or a
    list of exact names.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(spec, str):
        pattern = re.compile(GROUPS.get(spec, spec))
        chosen = [n for n in names if pattern.search(n)]
    else:
        unknown = sorted(set(spec) - set(names))
        if unknown:
            raise OptionError(f"{option} names unknown parameters {unknown[:5]}; "
                             f"the model has e.g. {names[:5]}")
        chosen = [n for n in names if n in set(spec)]
    if not chosen:
        raise OptionError(f"{option}={spec!r} selects no parameter of {type(model).__name__} "
                         f"(its parameters: {names[:8]}...); use 'all' or a matching regex")
    return chosen


def inner_loop(params: Params, loss_fn: LossFn, steps: int, lr: StepLR,
               create_graph: bool) -> list[Params]:
    """``steps`` SGD steps on ``loss_fn`` from ``params``; returns the fast weights after
    each step (``[θ_1, ..., θ_k]``).

    ``lr(step, name)`` is the step size of one tensor at one step (a float or a learned
    scalar tensor). ``create_graph=False`` is first order: the inner gradients are
    detached, so the fast weights depend on ``params`` only through the identity path.
    Parameters that do not affect the loss keep their value.
    """
    fast = dict(params)
    trajectory = []
    for k in range(steps):
        loss = loss_fn(fast)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph,
                                    allow_unused=True)
        fast = {
            name: p if g is None else p - lr(k, name) * (g if create_graph else g.detach())
            for (name, p), g in zip(fast.items(), grads, strict=True)
        }
        trajectory.append(fast)
    return trajectory


def multi_step_weights(steps: int, progress: float, min_weight: float = 0.03) -> Tensor:
    """MAML++ multi-step loss importance of each inner step's outer loss.

    ``progress`` in [0, 1] (fraction of the annealing period done): at 0 every step weighs
    ``1/steps``; the non-final weights then fall linearly to ``min_weight/steps`` and the
    final one takes the rest. The weights always sum to 1.
    """
    progress = min(max(progress, 0.0), 1.0)
    floor = min_weight / steps
    early = 1.0 / steps - progress * (1.0 / steps - floor)
    w = torch.full((steps,), early, dtype=torch.float64)
    w[-1] = 1.0 - early * (steps - 1)
    return w


def label_permutation(classes: Sequence[int], num_classes: int, device: torch.device,
                      generator: torch.Generator | None = None) -> Tensor:
    """``(num_classes,)`` label map of a shuffled-label episode: ``classes`` go through one
    random permutation of themselves, every other label maps to itself."""
    cls = torch.as_tensor(list(classes), device=device)
    mapping = torch.arange(num_classes, device=device)
    mapping[cls] = cls[torch.randperm(len(cls), generator=generator).to(device)]
    return mapping


def shuffle_labels(y: Tensor, where: Tensor, classes: Sequence[int], num_classes: int,
                   generator: torch.Generator | None = None) -> Tensor:
    """A shuffled-label episode: ``y`` with ``classes`` mapped through one random
    permutation of themselves where ``where`` is True (other labels unchanged)."""
    mapping = label_permutation(classes, num_classes, y.device, generator)
    return torch.where(where, mapping[y], y)


def _key(name: str) -> str:
    return name.replace(".", "__")


class MetaLearning(nn.Module):
    """MAML options of the learner (``model.meta``); holds the learned inner step sizes.

    Args:
        steps: inner SGD steps on the support set (>= 1).
        lr: inner learning rate (the initial value when ``learn_lr``).
        params: parameters the inner loop adapts: ``head`` (cheap, default),
            ``controller`` (the recurrent core's LSTM gates and interface), ``all``, a
            regular expression over parameter names, or a list of names.
        first_order: first-order MAML (no second derivatives).
        learn_lr: MAML++ learned inner step size per inner step and per parameter tensor.
        multi_step_loss: MAML++ multi-step loss: the outer loss also scores every inner
            step, weights annealed towards the last step over ``msl_epochs``.
        msl_epochs: epochs over which the multi-step weights anneal.
    """

    def __init__(
        self,
        steps: int = 5,
        lr: float = 0.01,
        params: str | list[str] = "head",
        first_order: bool = False,
        learn_lr: bool = False,
        multi_step_loss: bool = False,
        msl_epochs: int = 10,
    ) -> None:
        super().__init__()
        if steps < 1:
            raise OptionError(
                f"model.meta.steps must be >= 1, got {steps}; to train without an inner "
                "loop, remove model.meta (model.meta: null)")
        require_at_least(0.0, "model.meta.", lr=lr)
        require_at_least(1, "model.meta.", msl_epochs=msl_epochs)
        self.steps, self.lr, self.params_spec = steps, lr, params
        self.first_order = first_order
        self.learn_lr, self.multi_step_loss, self.msl_epochs = learn_lr, multi_step_loss, msl_epochs
        self.names: list[str] = []
        self.step_lrs = nn.ParameterDict()

    def bind(self, model: nn.Module) -> None:
        """Choose the adapted parameters of ``model`` (and create the learned step sizes)."""
        self.names = select_parameters(model, self.params_spec)
        if self.learn_lr:
            for name in self.names:
                self.step_lrs[_key(name)] = nn.Parameter(torch.full((self.steps,), self.lr))

    def step_lr(self, step: int, name: str) -> Tensor | float:
        return self.step_lrs[_key(name)][step] if self.learn_lr else self.lr

    def second_order(self, detached: bool = False) -> bool:
        """Whether :meth:`adapt` differentiates through the inner updates."""
        return not (self.first_order or detached)

    def adapt(self, model: nn.Module, loss_fn: LossFn, detached: bool = False) -> list[Params]:
        """Fast weights of the bound parameters after each of the ``steps`` inner steps on
        ``loss_fn`` (one step size per step and parameter: the number of steps is fixed).

        Training (``detached=False``) starts from the real parameters, second order unless
        ``first_order``. ``detached=True`` (evaluation) starts from detached copies and is
        first order: nothing flows back to the model.
        """
        if not self.names:
            self.bind(model)
        own = dict(model.named_parameters())
        start = {n: own[n] for n in self.names}
        if detached:
            start = {n: p.detach().requires_grad_() for n, p in start.items()}
        second_order = self.second_order(detached)
        lr: StepLR = self.step_lr
        if detached:
            def lr(k: int, name: str) -> float:
                return float(torch.as_tensor(self.step_lr(k, name)).detach())
        with torch.enable_grad():
            return inner_loop(start, loss_fn, self.steps, lr, second_order)

    def outer_weights(self, epoch: int) -> Tensor:
        """Weight of each inner step's outer loss (only the last step without MSL)."""
        if not self.multi_step_loss:
            w = torch.zeros(self.steps, dtype=torch.float64)
            w[-1] = 1.0
            return w
        return multi_step_weights(self.steps, epoch / self.msl_epochs)
