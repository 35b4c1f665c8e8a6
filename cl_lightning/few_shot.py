"""Few-shot adaptation metric: accuracy on a task before and after adapting on n labeled
examples per class, by the MAML inner loop (``inner``), by memory as context
(``context``), both (``both``), or by recalling them as the episodic store (``recall``:
every query retrieves its nearest examples into memory).

For a task the learner has trained on, the examples come only from what the learner may
keep (its replay buffer's samples of that task); for a held-out task the stream never
trained on, from that task's training set. The adaptation itself is the learner's
:meth:`~cl_lightning.module.ContinualLearner.adapted_models`, the code meta-training uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from cl_lightning.lightning_private import attached_trainer

if TYPE_CHECKING:
    from cl_lightning.learner_types import ModelFn
    from cl_lightning.module import ContinualLearner

MODES: dict[str, tuple[bool, bool]] = {
    "inner": (True, False),
    "context": (False, True),
    "both": (True, True),
}
"""Adaptation mode -> (inner loop, context)."""


def pick_shots(y: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Indices (ascending) of ``min(n, count)`` randomly chosen items of every class in ``y``."""
    perm = torch.randperm(len(y), generator=generator)
    shuffled = y[perm].cpu()
    order = torch.argsort(shuffled, stable=True)
    grouped = shuffled[order]
    rank = torch.arange(len(y)) - torch.searchsorted(grouped, grouped, side="left")
    return perm[order[rank < n]].sort().values


def available_modes(learner: ContinualLearner) -> list[str]:
    """``inner`` always; ``recall`` for a net that recalls; else ``context`` and ``both``
    for models that read a context (a recalling net starts from recalled memory instead,
    so a context is not what it was trained to read)."""
    if learner.recalling:
        return ["inner", "recall"]
    return list(MODES) if getattr(learner.net, "supports_context", False) else ["inner"]


@torch.no_grad()
def accuracy(learner: ContinualLearner, model: ModelFn,
             batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Accuracy (percent) of ``model`` per evaluation mode of the learner, summed over
    ranks (every rank must call it)."""
    modes = learner.eval_modes()
    counts = torch.zeros(len(modes) + 1, dtype=torch.float64, device=learner.device)
    for batch in batches:
        batch = learner.transfer_batch_to_device(batch, learner.device, 0)
        logits = model(batch["x"])
        for i, mode in enumerate(modes):
            shown = learner.mode_logits(logits, batch["task"], mode)
            counts[i] += (shown.argmax(1) == batch["y"]).sum()
        counts[-1] += len(batch["y"])
    if attached_trainer(learner) is not None:
        counts = learner.trainer.strategy.reduce(counts, reduce_op="sum")
    total = max(float(counts[-1]), 1.0)
    return {mode: 100.0 * float(counts[i]) / total for i, mode in enumerate(modes)}


def evaluate_task(learner: ContinualLearner, pool: dict[str, torch.Tensor] | None,
                  loader: Iterable[dict[str, torch.Tensor]], shots: list[int],
                  generator: torch.Generator, before: ModelFn | None = None
                  ) -> dict[str, dict[str, float | None]]:
    """One task's few-shot results: ``{eval mode: {"before": acc, "<mode>/<n>": acc}}``.

    ``pool``: items (``x``, ``y``, ``task``) to draw the n-per-class support from; with
    no pool (nothing kept for the task) only ``before`` is measured, the rest is None.
    ``before``: the model read before adapting (default ``learner.reader()``; pass one
    reader for every task so its store index and read mixture are built once).
    """
    was_training = learner.net.training
    learner.net.eval()
    batches = list(loader)
    results: dict[str, dict[str, float | None]] = {m: {} for m in learner.eval_modes()}
    before = learner.reader() if before is None else before
    for mode, acc in accuracy(learner, before, batches).items():
        results[mode]["before"] = acc
    for n in shots:
        support = None
        if pool is not None and len(pool["y"]) > 0:
            idx = pick_shots(pool["y"], n, generator).to(pool["y"].device)
            support = tuple(pool[k][idx].to(learner.device) for k in ("x", "y", "task"))
        for name in available_modes(learner):
            key = f"{name}/{n}"
            if support is None:
                for mode in results:
                    results[mode][key] = None
                continue
            model = adapted_model(learner, name, support)
            for mode, acc in accuracy(learner, model, batches).items():
                results[mode][key] = acc
    learner.net.train(was_training)
    return results


def adapted_model(learner: ContinualLearner, mode: str, support: tuple[torch.Tensor, ...]
                  ) -> ModelFn:
    """The model after adapting on ``support`` by ``mode``. A net that recalls reads the
    support as its store in ``recall`` and ``inner`` (the inner loop's support loss reads
    each example's other examples; the queries read the support after adapting)."""
    inner, context = MODES.get(mode, (False, False))
    if not learner.recalling or context:
        return learner.adapted_models(support, inner, context, detached=True)[-1]
    store = dict(zip(("x", "y", "task"), support, strict=True))
    if mode == "recall":
        return learner.reader(store=store)
    index = learner.index_store(store)
    support_recall = learner.retrieve(support[0], support[0], store, *index)
    adapted = learner.adapted_models(support, True, False, detached=True,
                                     support_recall=support_recall)[-1]
    return learner.reader(adapted, store=store, index=index)


def mean_over_tasks(few_shot: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{"tasks": {variant: {key: mean over the tasks that have a value}},
    "heldout": {variant: {key: accuracy}}}`` from a ``results.json`` ``few_shot`` block."""
    def mean(accs: list[float | None]) -> float | None:
        known = [a for a in accs if a is not None]
        return sum(known) / len(known) if known else None

    tasks = {variant: {key: mean(accs) for key, accs in res.items()}
             for variant, res in few_shot["tasks"].items()}
    return {"tasks": tasks, "heldout": few_shot.get("heldout") or {}}
