"""Replay-buffer speed: ``ReplayBuffer`` against per-sample Python loops.

Each step inserts one batch of MNIST-sized items (``x (B, 1, 28, 28)`` float32, ``y (B,)`` int64,
``task (B,)`` int64) and samples a batch of the same size. The buffer holds 500 items and runs on
the CPU with ``torch.set_num_threads(2)``.

Every repeat starts a fresh buffer and fills it during ``--warmup`` untimed steps, then times
``--steps`` steps. With the defaults the stream runs from 1,600 to 33,600 items, so the reservoir
admits 31% of a batch at first and 1.5% at the end. The table gives wall-clock time (median
and best repeat) and the main thread's CPU time (median). On a shared machine the CPU time is
the steadier number, because it leaves out time the OS gave to other processes.

    python benchmarks/replay_speed.py [--steps 1000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cl_lightning.replay import ReplayBuffer  # noqa: E402

Batch = dict[str, Tensor]


class ListLoopReservoir:
    """Naive reservoir: a Python list of per-item tuples, one loop iteration per item."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.items: list[tuple[Tensor, Tensor, Tensor]] = []
        self.num_seen = 0
        self.rng = random.Random(seed)

    def add(self, batch: Batch) -> None:
        for x, y, task in zip(batch["x"], batch["y"], batch["task"], strict=True):
            if len(self.items) < self.capacity:
                self.items.append((x.clone(), y.clone(), task.clone()))
            else:
                j = self.rng.randint(0, self.num_seen)
                if j < self.capacity:
                    self.items[j] = (x.clone(), y.clone(), task.clone())
            self.num_seen += 1

    def sample(self, n: int) -> Batch:
        chosen = self.rng.sample(range(len(self.items)), min(n, len(self.items)))
        xs, ys, tasks = zip(*(self.items[i] for i in chosen), strict=True)
        return {"x": torch.stack(xs), "y": torch.stack(ys), "task": torch.stack(tasks)}


class TensorLoopReservoir:
    """Preallocated tensors, but a Python loop over the batch with one reservoir draw per item.

    Mammoth-style. A stronger baseline than the list: rejected items cost only one RNG call.
    It samples with ``index_select``, because ``store[index]`` goes parallel over OpenMP
    threads and can stall for milliseconds on a busy machine.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.store: Batch = {}
        self.size = 0
        self.num_seen = 0
        self.rng = random.Random(seed)

    def add(self, batch: Batch) -> None:
        if not self.store:
            self.store = {
                k: torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype)
                for k, v in batch.items()
            }
        for i in range(batch["x"].shape[0]):
            if self.num_seen < self.capacity:
                j = self.num_seen
            else:
                j = self.rng.randint(0, self.num_seen)
            self.num_seen += 1
            if j < self.capacity:
                for key, store in self.store.items():
                    store[j] = batch[key][i]
                self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int) -> Batch:
        index = torch.tensor(self.rng.sample(range(self.size), min(n, self.size)))
        return {key: store.index_select(0, index) for key, store in self.store.items()}


def make_batches(count: int, batch: int, seed: int = 0) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "x": torch.rand((batch, 1, 28, 28), generator=gen),
            "y": torch.randint(0, 10, (batch,), generator=gen),
            "task": torch.randint(0, 5, (batch,), generator=gen),
        }
        for _ in range(count)
    ]


def time_steps(
    make: Callable[[], object], batches: list[Batch], args: argparse.Namespace
) -> tuple[float, float]:
    """Wall-clock and main-thread CPU microseconds per add+sample step, after
    ``args.warmup`` untimed steps. CPU time leaves out the time the OS gave to other
    processes, so it is the steadier number on a shared machine."""
    buf = make()
    for i in range(args.warmup):
        buf.add(batches[i % len(batches)])
        buf.sample(args.batch)
    wall, cpu = time.perf_counter(), time.thread_time()
    for i in range(args.steps):
        buf.add(batches[i % len(batches)])
        buf.sample(args.batch)
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    return wall / args.steps * 1e6, cpu / args.steps * 1e6


def candidates(capacity: int) -> dict[str, Callable[[], object]]:
    return {
        "ReplayBuffer reservoir + uniform": lambda: ReplayBuffer(capacity),
        "ReplayBuffer reservoir + prioritized": lambda: ReplayBuffer(
            capacity, sampling="prioritized"
        ),
        "loop over batch, tensor storage": lambda: TensorLoopReservoir(capacity),
        "loop over batch, list storage (naive)": lambda: ListLoopReservoir(capacity),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = make_batches(64, args.batch)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in candidates(args.capacity)}
    for _ in range(args.repeats):  # interleave implementations so machine noise hits all alike
        for name, make in candidates(args.capacity).items():
            results[name].append(time_steps(make, batches, args))
    print(
        f"capacity {args.capacity}, batch {args.batch} in + {args.batch} out per step, "
        f"{args.steps} timed steps after {args.warmup} warm-up steps, {args.repeats} repeats, "
        f"torch {torch.__version__}, {args.threads} threads\n"
    )
    print(format_table(results, baseline="loop over batch, list storage (naive)"))


def format_table(results: dict[str, list[tuple[float, float]]], baseline: str) -> str:
    """Markdown table; medians over repeats, speedups relative to ``baseline``."""
    wall = {name: statistics.median(t[0] for t in times) for name, times in results.items()}
    cpu = {name: statistics.median(t[1] for t in times) for name, times in results.items()}
    best = {name: min(t[0] for t in times) for name, times in results.items()}
    lines = [
        "| implementation | wall µs/step (median) | wall µs/step (best) | CPU µs/step (median) "
        "| speedup, wall | speedup, CPU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in results:
        lines.append(
            f"| {name} | {wall[name]:.1f} | {best[name]:.1f} | {cpu[name]:.1f} "
            f"| {wall[baseline] / wall[name]:.1f}x | {cpu[baseline] / cpu[name]:.1f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
