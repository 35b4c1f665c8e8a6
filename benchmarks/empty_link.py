"""What skipping the first step's link update saves, at the default run's sizes.

A DNC state that was never written (from ``DNC.initial_state``, also when recall has filled
its memory) has an all-zero link and precedence, so the first time step's link update and
directional reads are exact zeros; the DNC skips them (values and gradients bit-equal:
``tests/test_dnc.py::test_first_step_of_an_unwritten_state_skips_the_link_exactly``). This
script times the MemoryAgent of ``configs/synthetic.yaml`` (DNC 32 x 32, 2 read heads,
controller 64, 8 recalled neighbours; 4 tokens per query, as when it was measured: the
config now has 3) both ways, interleaved in one process: an
evaluation forward at batch 256 and a training step (forward, backward, Adam) at batch 64.
The reference path treats every link as written (the full update of the zero link).

    python benchmarks/empty_link.py [--repeats 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cl_lightning.models.dnc as dnc_module  # noqa: E402
from cl_lightning.episodic_index import nearest  # noqa: E402
from cl_lightning.models.agent import MemoryAgent  # noqa: E402
from cl_lightning.models.dnc import DNCOptions  # noqa: E402
from cl_lightning.models.recall import Recall  # noqa: E402


def default_agent() -> MemoryAgent:
    dnc = DNCOptions(hidden_size=64, memory_slots=32, word_size=32, read_heads=2,
                     write_heads=1)
    return MemoryAgent((64,), 10, core_output=64, dnc=dnc, recall_slots=8,
                       recall_key="input", encoder="vector", num_tokens=4, token_dim=64)


def workload(batch: int, train: bool) -> Callable[[], None]:
    """One evaluation forward (``train`` False) or training step on random data, every
    query recalling its 8 nearest of 1,000 stored items."""
    net = default_agent()
    store_x, store_y = torch.randn(1000, 64), torch.randint(0, 10, (1000,))
    x, y = torch.randn(batch, 64), torch.randint(0, 10, (batch,))
    index, _, valid = nearest(x, store_x, 8)
    used, rows = torch.unique(index, return_inverse=True)
    recall = Recall(store_x[used], rows, store_y[index], valid)
    if not train:
        net.eval()

        def forward() -> None:
            with torch.inference_mode():
                net(x, recall=recall)
        return forward
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)

    def step() -> None:
        F.cross_entropy(net(x, recall=recall), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return step


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--calls", type=int, default=10, help="calls per timed repeat")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    skipping = dnc_module.is_empty_link
    print(f"threads {args.threads}; median over {args.repeats} repeats of {args.calls} calls, "
          "the two paths interleaved\n")
    print("| workload | full link update, ms | first step skipped, ms | speed-up |")
    print("|---|---:|---:|---:|")
    for label, batch, train in (("evaluation forward, batch 256", 256, False),
                                ("training step, batch 64", 64, True)):
        run = workload(batch, train)
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats + 2):  # the first two rounds warm up
            for skip in (True, False):
                dnc_module.is_empty_link = skipping if skip else (lambda link: False)
                start = time.perf_counter()
                for _ in range(args.calls):
                    run()
                times[skip].append(1e3 * (time.perf_counter() - start) / args.calls)
        dnc_module.is_empty_link = skipping
        full, skipped = median(times[False][2:]), median(times[True][2:])
        print(f"| {label} | {full:.2f} | {skipped:.2f} | {full / skipped:.3f}x |")


if __name__ == "__main__":
    main()
