"""ContinualEvaluation: the accuracy matrix, its summary, TensorBoard and results.json.

During ``fit`` it evaluates every task's test set (past and future) before training starts
(the initial row, used for FWT) and at the end of every training phase (with
``eval_future=False`` only the tasks trained so far and the next one), writes one row of
the accuracy matrix per evaluation variant, logs scalars and a heatmap, and rewrites
``results.json`` in the log directory. Its rows are part of every checkpoint, so a resumed
run continues the same matrix. Under ``validate``/``test`` it reports one row.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Subset

from callbacks.report import (
    HeatmapCanvas,
    log_image,
    print_few_shot,
    print_matrix,
    print_row,
)
from cl_lightning.checks import OptionError
from cl_lightning.distributed import gather_objects
from cl_lightning.few_shot import evaluate_task, mean_over_tasks, pick_shots
from cl_lightning.metrics import summarize
from cl_lightning.plugins import LearnerPlugin
from cl_lightning.rng import generators_untouched

if TYPE_CHECKING:
    from cl_lightning.module import ContinualLearner


class ContinualEvaluation(L.Callback, LearnerPlugin):
    """Per-task evaluation of the whole stream.

    Args:
        eval_initial: evaluate before training (the row that FWT needs).
        results_file: name of the JSON file written in the log directory.
        heatmap: log the accuracy matrix as a TensorBoard figure at every task end and save
            it as ``accuracy_matrix.png`` next to the results at the end.
        print_table: print the matrix and the summary at the end of fit (and the row of a
            validate/test run).
        few_shot_shots: labeled examples per class for the few-shot adaptation metric
            (accuracy after adapting by inner loop / context / both; docs/usage.md "Rapid
            adaptation"); empty disables it.
        few_shot_every_task: measure it at every task end (default: after the last task).
        few_shot_seed: seed of the draws of the examples.
        eval_future: at every task end, evaluate the tasks not trained yet too (the
            matrix's upper triangle). ``False`` evaluates the tasks trained so far and the
            next one (all that every summary metric, FWT included, reads) and leaves the rest
            of the row empty (NaN; ``null`` in results.json): on a stream of T tasks about
            half the evaluation work. The initial row and joint runs are always whole.
    """

    plugin_order = 1000  # after every strategy's own task-end work

    def __init__(
        self,
        eval_initial: bool = True,
        results_file: str = "results.json",
        heatmap: bool = True,
        print_table: bool = True,
        few_shot_shots: list[int] | None = None,
        few_shot_every_task: bool = False,
        few_shot_seed: int = 0,
        eval_future: bool = True,
    ) -> None:
        shots = [5, 20] if few_shot_shots is None else list(few_shot_shots)
        if any(n < 1 for n in shots):
            raise OptionError(f"evaluation.few_shot_shots must be >= 1 each, got {shots}")
        self.few_shot_shots, self.few_shot_every_task = shots, few_shot_every_task
        self.few_shot_seed = few_shot_seed
        self.eval_future = eval_future
        self.few_shot: dict[str, Any] | None = None
        self.eval_initial = eval_initial
        self.results_file = results_file
        self.heatmap = heatmap
        self._canvas = HeatmapCanvas()  # the figure, drawn once; each task end its cells
        self.print_table = print_table
        self.rows: dict[str, list[list[float]]] = {}
        self.initial: dict[str, list[float]] | None = None
        self.run_config: dict[str, Any] = {}

    # ----- evaluation --------------------------------------------------------------------
    def evaluate(self, trainer: L.Trainer, learner: ContinualLearner,
                 tasks: int | None = None) -> dict[str, list[float]]:
        """Accuracy (percent) on every task (the first ``tasks`` if given; NaN for the
        others), per variant; all ranks take part."""
        models = list(learner.eval_models().values())
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        loaders = trainer.datamodule.eval_loaders(trainer.global_rank, trainer.world_size)
        with trainer.strategy.precision_plugin.forward_context():
            for loader in loaders[:tasks]:
                for batch in loader:
                    learner.eval_step(learner.transfer_batch_to_device(batch, learner.device, 0))
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
        return learner.compute_eval()

    def on_train_start(self, trainer: L.Trainer, pl_module: ContinualLearner) -> None:
        if self.eval_initial and self.initial is None:
            with generators_untouched():
                self.initial = self.evaluate(trainer, pl_module)

    def on_task_end(self, learner: ContinualLearner, task: int) -> None:
        with generators_untouched():  # how much is evaluated never changes training
            self._task_end(learner, task)

    def _task_end(self, learner: ContinualLearner, task: int) -> None:
        trainer = learner.trainer
        upto = None if self.eval_future or trainer_joint(learner) else task + 2
        accs = self.evaluate(trainer, learner, upto)
        for name, row in accs.items():
            self.rows.setdefault(name, []).append(row)
        last = task == trainer.datamodule.num_phases - 1
        if self.few_shot_shots and (last or self.few_shot_every_task):
            self.few_shot = self.measure_few_shot(trainer, learner, task)
        out_dir = log_dir(trainer)  # a collective under DDP: every rank asks
        self._log(trainer, learner, out_dir)
        if last:
            self._canvas.close()
        self._write_results(out_dir, learner)

    def measure_few_shot(self, trainer: L.Trainer, learner: ContinualLearner,
                         after_task: int) -> dict[str, Any]:
        """Few-shot results on every task (examples from the kept samples) and on the
        stream's held-out task (examples from its training set), after ``after_task``."""
        g = torch.Generator().manual_seed(self.few_shot_seed)
        dm = trainer.datamodule
        kept = every_ranks_samples(learner.store())
        loaders = dm.eval_loaders(trainer.global_rank, trainer.world_size)
        per_task = []
        before = learner.reader()  # one reader of the store for every task (built lazily)
        for t, loader in enumerate(loaders):
            pool = None if kept is None else {k: v[kept["task"] == t] for k, v in kept.items()}
            per_task.append(evaluate_task(learner, pool, loader, self.few_shot_shots, g,
                                          before))
        tasks = {mode: {key: [r[mode][key] for r in per_task] for key in per_task[0][mode]}
                 for mode in per_task[0]}
        heldout = None
        task = dm.heldout_task() if learner.stream.scenario == "domain-il" else None
        if task is not None:
            idx = pick_shots(task.train_targets, max(self.few_shot_shots), g)
            items = [task.train[int(i)] for i in idx]
            pool = {"x": torch.stack([torch.as_tensor(x) for x, _ in items]),
                    "y": torch.as_tensor([int(y) for _, y in items]),
                    "task": torch.zeros(len(items), dtype=torch.long)}
            test = [{"x": x, "y": y, "task": torch.zeros_like(y)} for x, y in DataLoader(
                Subset(task.test, range(trainer.global_rank, len(task.test), trainer.world_size)),
                batch_size=dm.eval_batch_size)]
            heldout = evaluate_task(learner, pool, test, self.few_shot_shots, g, before)
        return {"after_task": after_task, "shots": self.few_shot_shots,
                "examples_from": "replay buffer" if kept is not None else None,
                "tasks": tasks, "heldout": heldout}

    def on_train_end(self, trainer: L.Trainer, pl_module: ContinualLearner) -> None:
        if not self.rows:
            return
        self._write_results(log_dir(trainer), pl_module, final=True)
        if self.print_table and trainer.is_global_zero:
            primary = pl_module.primary_variant
            print_matrix(self.rows[primary], self.summary(pl_module, primary), primary,
                         {k: self.summary(pl_module, k) for k in self.rows if k != primary})
            if self.few_shot is not None:
                print_few_shot(mean_over_tasks(self.few_shot))

    def _report_row(self, trainer: L.Trainer, learner: ContinualLearner, stage: str) -> None:
        accs = learner.compute_eval()
        for name, row in accs.items():
            avg = sum(row) / len(row)
            for logger in trainer.loggers:
                logger.log_metrics({f"{stage}/{name}/avg_accuracy": avg}, step=trainer.global_step)
        if self.print_table and trainer.is_global_zero and accs:
            print_row(accs, stage)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: ContinualLearner) -> None:
        if not trainer.sanity_checking:
            self._report_row(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: ContinualLearner) -> None:
        self._report_row(trainer, pl_module, "test")

    # ----- summaries and outputs ---------------------------------------------------------
    def summary(self, learner: ContinualLearner, variant: str) -> dict[str, Any]:
        rows = self.rows[variant]
        seen = learner.stream.num_tasks if trainer_joint(learner) else None
        initial = None if self.initial is None else self.initial.get(variant)
        s = summarize(rows, initial, seen).as_dict()
        return {"accuracy_matrix": rows, **s, "initial_accuracy": initial}

    def _log(self, trainer: L.Trainer, learner: ContinualLearner, out_dir: str) -> None:
        for name in self.rows:
            s = self.summary(learner, name)
            metrics = {f"eval/{name}/{k}": v for k, v in s.items()
                       if k not in ("accuracy_matrix", "initial_accuracy") and v is not None}
            last = s["accuracy_matrix"][-1]
            metrics.update({f"eval/{name}/acc_task{j:02d}": a for j, a in enumerate(last)
                            if not math.isnan(a)})
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        if self.few_shot is not None:
            means = mean_over_tasks(self.few_shot)
            metrics = {f"few_shot{tag}/{variant}/{key}": a
                       for part, tag in (("tasks", ""), ("heldout", "_heldout"))
                       for variant, res in means[part].items()
                       for key, a in res.items() if a is not None}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        if self.heatmap and trainer.is_global_zero:
            primary = learner.primary_variant
            pixels = self._canvas.pixels(self.rows[primary], f"accuracy matrix ({primary})",
                                         trainer.datamodule.num_phases)
            png = log_image(trainer.loggers, "eval/accuracy_matrix", pixels,
                            step=len(self.rows[primary]))
            with open(os.path.join(out_dir, "accuracy_matrix.png"), "wb") as f:
                f.write(png)

    def results(self, learner: ContinualLearner) -> dict[str, Any]:
        """The results.json document (schema in docs/usage.md)."""
        primary = learner.primary_variant
        dm = learner.trainer.datamodule
        return {
            "scenario": learner.stream.scenario,
            "num_tasks": learner.stream.num_tasks,
            "primary_variant": primary,
            **self.summary(learner, primary),
            "tasks_trained": len(self.rows[primary]),
            "variants": {k: self.summary(learner, k) for k in self.rows if k != primary},
            "few_shot": self.few_shot,
            "stream": dm.stream_definition(),
            "config": self.run_config,
        }

    @rank_zero_only
    def _write_results(self, out_dir: str, learner: ContinualLearner,
                       final: bool = False) -> None:
        doc = self.results(learner)
        doc["complete"] = final
        path = os.path.join(out_dir, self.results_file)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(_plain(doc), f, indent=2, default=str, allow_nan=False)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written file

    # ----- checkpointed state ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "initial": self.initial, "few_shot": self.few_shot}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = state_dict.get("rows", {})
        self.initial = state_dict.get("initial")
        self.few_shot = state_dict.get("few_shot")


def trainer_joint(learner: ContinualLearner) -> bool:
    return bool(getattr(learner.trainer.datamodule, "joint", False))


def every_ranks_samples(kept: dict[str, torch.Tensor] | None
                        ) -> dict[str, torch.Tensor] | None:
    """The kept samples of all ranks (each holds a shard of the buffer), the same on every
    rank, so every rank draws the same support and takes part in the same collectives.
    A collective under DDP: every rank calls it."""
    parts = [p for p in gather_objects(None if kept is None else
                                       {k: v.cpu() for k, v in kept.items()}) if p is not None]
    if not parts:
        return None
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def log_dir(trainer: L.Trainer) -> str:
    """The run's log directory. ``trainer.log_dir`` broadcasts under DDP: call on every rank."""
    path = trainer.log_dir or trainer.default_root_dir
    os.makedirs(path, exist_ok=True)
    return path


def _plain(obj: Any) -> Any:
    """``obj`` as strict JSON values: tensors, tuples and sets as lists, NaN (a task not
    evaluated) as ``None``; anything else JSON cannot hold is written as its ``str``."""
    if isinstance(obj, torch.Tensor):
        obj = obj.tolist()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj
