"""Replay-buffer speed: ``ReplayBuffer`` against per-sample Python loops and a mammoth-style buffer.

Each step inserts one batch of ``B`` MNIST-sized items (``x (B, 1, 28, 28)`` float32, ``y (B,)``
int64, ``task (B,)`` int64) and samples a batch of the same size. Every buffer holds 500 items
(``--capacity``) and runs on the CPU with ``torch.set_num_threads(2)`` (``--threads``).

Implementations:

- ``ReplayBuffer`` with reservoir placement, uniform and prioritized sampling.
- Two per-sample loops over the batch: :class:`TensorLoopReservoir` (preallocated tensors) and
  :class:`ListLoopReservoir` (a Python list of items, the naive one).
- :class:`MammothStyleBuffer`: mammoth's ``Buffer`` (``utils/buffer.py``), re-implemented here:
  one ``np.random.randint`` per item, ``np.random.choice`` without replacement to sample, and a
  per-item transform (the identity, as for MNIST) whose results are stacked.

For each batch size of ``--batch-sizes`` (default 8, 32, 128) every repeat starts fresh
buffers, fills them during ``--warmup`` untimed steps, then times ``--steps`` steps. With the
defaults the stream runs from ``50 B`` to ``1050 B`` items: from 400 to 8,400 at batch 8 (the
buffer is still filling for the first 13 timed steps), from 1,600 to 33,600 at batch 32 (the
reservoir admits 31% of a batch at first and 1.5% at the end) and from 6,400 to 134,400 at
batch 128. Each batch size gets a table with wall-clock time (median and best repeat), the main
thread's CPU time (median) and the mammoth-style buffer's CPU time divided by each
implementation's; a summary table then lists the CPU medians of every batch size. On a shared
machine the CPU time is the steadier number, because it leaves out time the OS gave to other
processes. It does count OpenMP threads spinning: when other processes hold the cores, torch's
parallel indexing (the mammoth-style ``examples[choice]``, large ``index_select`` gathers) can
spin for milliseconds per call, so compare implementations with ``--threads 1`` there.

    python benchmarks/replay_speed.py [--batch-sizes 8 32 128] [--steps 1000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
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

    The strongest per-sample loop here: rejected items cost only one call of Python's ``random``,
    and it samples with one ``index_select`` per key, because ``store[index]`` goes parallel over
    OpenMP threads and can stall for milliseconds on a busy machine.
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


class MammothStyleBuffer:
    """Mammoth's reservoir ``Buffer`` (aimagelab/mammoth, ``utils/buffer.py``), re-implemented.

    Kept from mammoth: ``add_data`` allocates one ``(capacity, *shape)`` tensor per attribute on
    first use (``examples`` float32, ``labels`` and ``task_labels`` int64), then loops over the
    batch; each item takes slot ``num_seen`` while the buffer fills, later slot
    ``np.random.randint(0, num_seen + 1)`` if that is below the capacity, and every attribute
    is written one item at a time (``store[slot] = value[i].to(device)``). ``get_data`` draws
    ``np.random.choice(available, size, replace=False)``, gathers the examples with that NumPy
    index, applies ``transform`` to each example separately (the identity when ``None``, as
    mammoth's MNIST streams pass) and ``torch.stack``-s them, then gathers the other attributes.

    Left out, because the benchmark does not use them: logits, attention maps, task masking and
    ``return_index``. Mammoth draws from NumPy's global generator; this draws from its own
    ``np.random.RandomState`` (the same legacy generator, the same cost per call) so that runs
    do not disturb each other. :meth:`add` and :meth:`sample` map the benchmark's dict batches
    onto mammoth's arguments (``x`` -> examples, ``y`` -> labels, ``task`` -> task_labels).
    """

    ATTRIBUTES = ("examples", "labels", "task_labels")

    def __init__(self, buffer_size: int, device: str = "cpu", seed: int = 0) -> None:
        self.buffer_size = buffer_size
        self.device = device  # a string, as mammoth's default
        self.num_seen_examples = 0
        self.rng = np.random.RandomState(seed)
        self.stores: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return min(self.num_seen_examples, self.buffer_size)

    def _reservoir(self) -> int:
        """Slot for the next item of the stream, ``-1`` to drop it."""
        if self.num_seen_examples < self.buffer_size:
            return self.num_seen_examples
        draw = self.rng.randint(0, self.num_seen_examples + 1)
        return draw if draw < self.buffer_size else -1

    def add_data(
        self, examples: Tensor, labels: Tensor | None = None, task_labels: Tensor | None = None
    ) -> None:
        given = {"examples": examples, "labels": labels, "task_labels": task_labels}
        if not self.stores:
            for name, value in given.items():
                if value is not None:
                    dtype = torch.int64 if name.endswith("els") else torch.float32
                    self.stores[name] = torch.zeros(
                        (self.buffer_size, *value.shape[1:]), dtype=dtype, device=self.device
                    )
        for i in range(examples.shape[0]):
            slot = self._reservoir()
            self.num_seen_examples += 1
            if slot >= 0:
                self.stores["examples"][slot] = examples[i].to(self.device)
                if labels is not None:
                    self.stores["labels"][slot] = labels[i].to(self.device)
                if task_labels is not None:
                    self.stores["task_labels"][slot] = task_labels[i].to(self.device)

    def get_data(
        self,
        size: int,
        transform: Callable[[Tensor], Tensor] | None = None,
        device: str | None = None,
    ) -> tuple[Tensor, ...]:
        target = self.device if device is None else device
        examples = self.stores["examples"]
        available = min(self.num_seen_examples, examples.shape[0])
        size = min(size, available)
        choice = self.rng.choice(available, size=size, replace=False)
        if transform is None:

            def transform(item: Tensor) -> Tensor:
                return item

        picked = examples[choice]
        out: tuple[Tensor, ...] = (
            torch.stack([transform(item) for item in picked.cpu()]).to(target),
        )
        for name in self.ATTRIBUTES[1:]:
            if name in self.stores:
                out += (self.stores[name][choice].to(target),)
        return out

    def add(self, batch: Batch) -> None:
        self.add_data(batch["x"], labels=batch["y"], task_labels=batch["task"])

    def sample(self, n: int) -> Batch:
        x, y, task = self.get_data(n)
        return {"x": x, "y": y, "task": task}


MAMMOTH = "mammoth-style Buffer (per-item loop, np.random)"
OURS = "ReplayBuffer reservoir + uniform"


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
    n = batches[0]["x"].shape[0]
    for i in range(args.warmup):
        buf.add(batches[i % len(batches)])
        buf.sample(n)
    wall, cpu = time.perf_counter(), time.thread_time()
    for i in range(args.steps):
        buf.add(batches[i % len(batches)])
        buf.sample(n)
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    return wall / args.steps * 1e6, cpu / args.steps * 1e6


def candidates(capacity: int) -> dict[str, Callable[[], object]]:
    return {
        OURS: lambda: ReplayBuffer(capacity),
        "ReplayBuffer reservoir + prioritized": lambda: ReplayBuffer(
            capacity, sampling="prioritized"
        ),
        "loop over batch, tensor storage": lambda: TensorLoopReservoir(capacity),
        "loop over batch, list storage (naive)": lambda: ListLoopReservoir(capacity),
        MAMMOTH: lambda: MammothStyleBuffer(capacity),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, default=500)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--batch", type=int, help="one batch size; same as --batch-sizes N")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sizes = [args.batch] if args.batch is not None else args.batch_sizes
    torch.set_num_threads(args.threads)
    print(
        f"capacity {args.capacity}, batch B in + B out per step, {args.steps} timed steps after "
        f"{args.warmup} warm-up steps, {args.repeats} repeats, torch {torch.__version__}, "
        f"{args.threads} threads"
    )
    summary: dict[int, dict[str, float]] = {}
    for size in sizes:
        batches = make_batches(64, size)
        results: dict[str, list[tuple[float, float]]] = {
            name: [] for name in candidates(args.capacity)
        }
        for _ in range(args.repeats):  # interleave implementations so machine noise hits all alike
            for name, make in candidates(args.capacity).items():
                results[name].append(time_steps(make, batches, args))
        print(f"\n### batch {size}\n")
        print(format_table(results, baseline=MAMMOTH))
        summary[size] = {
            name: statistics.median(t[1] for t in times) for name, times in results.items()
        }
    print("\n### summary: CPU µs/step (median)\n")
    print(format_summary(summary))


def format_table(results: dict[str, list[tuple[float, float]]], baseline: str) -> str:
    """Markdown table; medians over repeats, and ``baseline``'s CPU time over each one's."""
    wall = {name: statistics.median(t[0] for t in times) for name, times in results.items()}
    cpu = {name: statistics.median(t[1] for t in times) for name, times in results.items()}
    best = {name: min(t[0] for t in times) for name, times in results.items()}
    lines = [
        "| implementation | wall µs/step (median) | wall µs/step (best) | CPU µs/step (median) "
        "| mammoth-style / this, CPU |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in results:
        lines.append(
            f"| {name} | {wall[name]:.1f} | {best[name]:.1f} | {cpu[name]:.1f} "
            f"| {cpu[baseline] / cpu[name]:.1f}x |"
        )
    return "\n".join(lines)


def format_summary(summary: dict[int, dict[str, float]]) -> str:
    """One row per batch size: every implementation's CPU median, then mammoth-style / ours and
    whether ours beats every per-sample loop."""
    names = list(next(iter(summary.values())))
    loops = [name for name in names if name.startswith("loop over batch")]
    lines = [
        "| batch | " + " | ".join(names) + " | mammoth-style / ReplayBuffer | faster than loops |",
        "|---:|" + "---:|" * len(names) + "---:|---|",
    ]
    for size, cpu in summary.items():
        faster = all(cpu[OURS] < cpu[name] for name in loops)
        lines.append(
            f"| {size} | "
            + " | ".join(f"{cpu[name]:.1f}" for name in names)
            + f" | {cpu[MAMMOTH] / cpu[OURS]:.1f}x | {'yes' if faster else 'no'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
