"""Cost of one training step against the replay buffer's capacity and the number of tasks.

What is measured: wall milliseconds per training step of the real harness
(``python train.py fit -c configs/synthetic_mlp.yaml -c configs/methods/er.yaml``: the
``LinearShiftStream``, MLP 256-256, experience replay with a reservoir buffer and 32 replayed
samples per step) for every capacity of ``--capacities`` (default 1k, 10k, 100k) and every
task count of ``--tasks`` (default 5, 50). The target: flat in both.

How: each configuration is one ``train.py fit`` subprocess (``OMP_NUM_THREADS=--threads``,
one at a time) with Lightning's ``SimpleProfiler``; its report is parsed afterwards.
Every run sees the same number of training samples, ``--fill-factor`` x the largest capacity
(default 3 x 100k = 300k, split evenly over the tasks, one epoch per task, batch
``--batch-size``), so every run takes about the same number of steps (a task's last batch may
be short) and the buffer is full for at least the last ``1 - 1/fill-factor`` of every run (two
thirds at the largest capacity, nearly all of it at the smaller ones). Test sets are
``--test-per-task`` samples per task, the few-shot metric is off (it would run once, at the
last task end), task checkpoints are off (``last.ckpt`` is still written at every task end)
and logs go to a temporary directory.

Columns (profiler actions, means per call):

- ``ms/step``: ``run_training_epoch`` total / number of ``run_training_batch`` calls: the whole
  training loop per step (fetch, forward/backward/optimizer with the replay draw, the buffer
  insert in ``on_train_batch_end``, logging), without the task-end work;
- ``batch ms``: ``run_training_batch`` (training_step with the replay draw, backward, step);
- ``insert ms``: the learner's ``on_train_batch_end`` (the buffer insert);
- ``task end ms``: the learner's ``on_train_epoch_end`` at a task end (the evaluation of every
  task's test set, logging, the heatmap, results.json, the buffer statistics); it grows with
  the number of tasks by design, and is not part of ``ms/step``;
- ``ckpt ms``: ``TaskCheckpoint.on_train_epoch_end`` (writing ``last.ckpt``, buffer included).

Command::

    python benchmarks/cost_growth.py [--capacities 1000 10000 100000] [--tasks 5 50]
        [--out-md benchmarks/results/cost_growth.md] [--out-png benchmarks/results/cost_growth.png]

With the defaults the six runs take about 5 minutes on a 2-core machine (one thread).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("configs/synthetic_mlp.yaml", "configs/methods/er.yaml")
PROFILE = "profile"


@dataclass
class Result:
    tasks: int
    capacity: int
    steps: int
    step_ms: float
    batch_ms: float
    insert_ms: float
    task_end_ms: float
    ckpt_ms: float
    run_s: float


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacities", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--tasks", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--fill-factor", type=float, default=3.0,
                        help="training samples of every run, as a multiple of the largest "
                             "capacity")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--replay-batch-size", type=int, default=32)
    parser.add_argument("--test-per-task", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per configuration (interleaved); the table shows medians")
    parser.add_argument("--out-md", type=Path, help="write the table (and the command) here")
    parser.add_argument("--out-png", type=Path, help="write the plot here")
    return parser.parse_args()


def fit_command(tasks: int, capacity: int, train_per_task: int, args: argparse.Namespace,
                workdir: Path) -> list[str]:
    """The ``train.py fit`` command line of one configuration."""
    command = [sys.executable, "train.py", "fit"]
    for config in CONFIGS:
        command += ["-c", config]
    options = {
        "trainer.callbacks.capacity": capacity,
        "trainer.callbacks.replay_batch_size": args.replay_batch_size,
        "data.num_tasks": tasks,
        "data.train_per_task": train_per_task,
        "data.test_per_task": args.test_per_task,
        "data.epochs_per_task": 1,
        "data.batch_size": args.batch_size,
        "trainer.enable_progress_bar": "false",
        "trainer.logger.init_args.save_dir": workdir / "logs",
        "checkpoint.dirpath": workdir / "checkpoints",
        "checkpoint.every_n_tasks": 0,
        "evaluation.few_shot_shots": "[]",
        "evaluation.print_table": "false",
        "trainer.profiler": "lightning.pytorch.profilers.SimpleProfiler",
        "trainer.profiler.dirpath": workdir / "profile",
        "trainer.profiler.filename": PROFILE,
    }
    for key, value in options.items():
        command.append(f"--{key}={value}")
    return command


def parse_profile(text: str) -> dict[str, tuple[float, int, float]]:
    """``{action: (mean seconds, calls, total seconds)}`` from a SimpleProfiler report."""
    actions = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] in ("Action", "Total"):
            continue
        try:
            actions[cells[0]] = (float(cells[1]), int(cells[2]), float(cells[3]))
        except ValueError:
            continue
    return actions


def mean_ms(actions: dict[str, tuple[float, int, float]], prefix: str, suffix: str) -> float:
    """Mean milliseconds per call of the one action named ``prefix...suffix``."""
    found = [v for k, v in actions.items() if k.startswith(prefix) and k.endswith(suffix)]
    if len(found) != 1:
        raise RuntimeError(f"expected one profiler action {prefix}...{suffix}, got {len(found)}")
    return found[0][0] * 1e3


def summarize(tasks: int, capacity: int, actions: dict[str, tuple[float, int, float]],
              run_s: float) -> Result:
    steps = actions["run_training_batch"][1]
    return Result(
        tasks=tasks, capacity=capacity, steps=steps,
        step_ms=actions["run_training_epoch"][2] / steps * 1e3,
        batch_ms=actions["run_training_batch"][0] * 1e3,
        insert_ms=mean_ms(actions, "[LightningModule]", ".on_train_batch_end"),
        task_end_ms=mean_ms(actions, "[LightningModule]", ".on_train_epoch_end"),
        ckpt_ms=mean_ms(actions, "[Callback]TaskCheckpoint", ".on_train_epoch_end"),
        run_s=run_s,
    )


def run_one(tasks: int, capacity: int, args: argparse.Namespace) -> Result:
    """One ``train.py fit`` run of a configuration, summarized from its profiler report."""
    total = round(args.fill_factor * max(args.capacities))
    train_per_task = -(-total // tasks)  # ceil: at least ``total`` samples in all
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory(prefix="cost_growth_") as tmp:
        workdir = Path(tmp)
        command = fit_command(tasks, capacity, train_per_task, args, workdir)
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        run_s = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"run failed ({done.returncode}): {shlex.join(command)}\n{done.stderr}")
        text = (workdir / "profile" / f"fit-{PROFILE}.txt").read_text()
    return summarize(tasks, capacity, parse_profile(text), run_s)


def median_result(runs: list[Result]) -> Result:
    """Field-wise median of repeated runs of one configuration."""
    fields = ("step_ms", "batch_ms", "insert_ms", "task_end_ms", "ckpt_ms", "run_s")
    medians = {f: statistics.median(getattr(r, f) for r in runs) for f in fields}
    return Result(tasks=runs[0].tasks, capacity=runs[0].capacity, steps=runs[0].steps,
                  **medians)


def format_table(results: list[Result]) -> str:
    """Markdown table; ``ratio`` is ms/step over the smallest configuration's."""
    base = min(results, key=lambda r: (r.tasks, r.capacity)).step_ms
    lines = [
        "| tasks | capacity | steps | ms/step (mean) | ratio | batch ms | insert ms "
        "| task end ms | ckpt ms | run s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.tasks} | {r.capacity:,} | {r.steps:,} | {r.step_ms:.2f} "
            f"| {r.step_ms / base:.2f}x | {r.batch_ms:.2f} | {r.insert_ms:.3f} "
            f"| {r.task_end_ms:.0f} | {r.ckpt_ms:.0f} | {r.run_s:.0f} |"
        )
    return "\n".join(lines)


def spread(results: list[Result]) -> str:
    steps = [r.step_ms for r in results]
    return (f"ms/step: largest / smallest = {max(steps):.2f} / {min(steps):.2f} "
            f"= {max(steps) / min(steps):.2f}x over all configurations")


def machine(threads: int) -> str:
    """E.g. ``2-core x86-64, 1 thread``."""
    arch = platform.machine().replace("_", "-")
    return f"{os.cpu_count()}-core {arch}, {threads} thread{'' if threads == 1 else 's'}"


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for tasks in sorted({r.tasks for r in results}):
        rows = sorted((r for r in results if r.tasks == tasks), key=lambda r: r.capacity)
        ax.plot([r.capacity for r in rows], [r.step_ms for r in rows], marker="o",
                label=f"{tasks} tasks")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.2 * max(r.step_ms for r in results))
    ax.set_xlabel("replay buffer capacity")
    ax.set_ylabel("ms per training step (mean)")
    ax.set_title("ER training step cost (synthetic MLP)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(results: list[Result], args: argparse.Namespace, path: Path) -> None:
    import lightning
    import torch

    command = shlex.join(["python", "benchmarks/cost_growth.py", *sys.argv[1:]])
    total = round(args.fill_factor * max(args.capacities))
    text = (
        f"`{command}`\n\n"
        f"Machine: {machine(args.threads)}; torch {torch.__version__}, "
        f"lightning {lightning.__version__}. One `train.py fit` run per row "
        f"(`-c {' -c '.join(CONFIGS)}`), {total:,} training samples per run split over the "
        f"tasks, batch {args.batch_size} + {args.replay_batch_size} replayed, 1 epoch per "
        f"task, {args.test_per_task} test samples per task, median of {args.repeats} run(s).\n\n"
        f"{format_table(results)}\n\n"
        f"{spread(results)}.\n\n"
        "ms/step: SimpleProfiler `run_training_epoch` total / steps (the whole training loop "
        "per step, without task-end work); batch: `run_training_batch` mean (forward, backward, "
        "optimizer, replay draw); insert: the learner's `on_train_batch_end` mean (buffer "
        "insert); task end: the learner's `on_train_epoch_end` mean (evaluation of every "
        "task, logging, heatmap); ckpt: writing `last.ckpt` (buffer included) at a task end.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main() -> None:
    args = parse_args()
    grid = [(t, c) for t in sorted(args.tasks) for c in sorted(args.capacities)]
    runs: dict[tuple[int, int], list[Result]] = {key: [] for key in grid}
    for repeat in range(args.repeats):  # interleaved, so machine noise hits all alike
        for tasks, capacity in grid:
            result = run_one(tasks, capacity, args)
            runs[(tasks, capacity)].append(result)
            print(f"[{repeat + 1}/{args.repeats}] tasks {tasks}, capacity {capacity}: "
                  f"{result.step_ms:.2f} ms/step, {result.steps} steps, {result.run_s:.0f} s",
                  file=sys.stderr, flush=True)
    results = [median_result(runs[key]) for key in grid]
    print(f"{machine(args.threads)}\n\n{format_table(results)}\n\n{spread(results)}")
    if args.out_md is not None:
        write_markdown(results, args, args.out_md)
    if args.out_png is not None:
        plot(results, args.out_png)


if __name__ == "__main__":
    main()
