"""Per-step time of the MemoryAgent's training step, eager against ``compile_forward``.

One process, one thread: the same random batches (each query recalling ``--recall``
neighbours from a store of about 150 distinct items), forward + backward + Adam, timed
``--steps`` steps a repeat, the two nets alternating, the best repeat of each printed:

    python benchmarks/compile_forward.py --batch 256 --tokens 4 --dim 128 --skip 256
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cl_lightning.models.agent import MemoryAgent
from cl_lightning.models.dnc import DNCOptions
from cl_lightning.models.recall import Recall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64, help="token_dim and core_output")
    ap.add_argument("--skip", type=int, default=256, help="skip_hidden")
    ap.add_argument("--recall", type=int, default=8, help="recall_slots")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    options = {"encoder": "vector", "num_tokens": args.tokens, "token_dim": args.dim,
               "core_output": args.dim, "skip_hidden": args.skip, "recall_slots": args.recall,
               "dnc": DNCOptions(hidden_size=64, memory_slots=32, word_size=32, read_heads=2)}
    nets = {"eager": MemoryAgent((784,), 10, **options),
            "compiled": MemoryAgent((784,), 10, compile_forward=True, **options)}
    nets["compiled"].load_state_dict(nets["eager"].state_dict())
    optimizers = {n: torch.optim.Adam(m.parameters(), 1e-3) for n, m in nets.items()}
    g = torch.Generator().manual_seed(1)
    b, k = args.batch, args.recall

    def batch(distinct: int) -> tuple[torch.Tensor, torch.Tensor, Recall]:
        recall = Recall(torch.rand(distinct, 784, generator=g),
                        torch.randint(0, distinct, (b, k), generator=g),
                        torch.randint(0, 10, (b, k), generator=g),
                        torch.ones(b, k, dtype=torch.bool))
        return torch.rand(b, 784, generator=g), torch.randint(0, 10, (b,), generator=g), recall

    batches = [batch(150 + i) for i in range(10)]

    def step(name: str, data: tuple[torch.Tensor, torch.Tensor, Recall]) -> None:
        x, y, recall = data
        F.cross_entropy(nets[name](x, recall=recall), y).backward()
        optimizers[name].step()
        optimizers[name].zero_grad()
        nets[name].take_vote_logits()

    start = time.perf_counter()
    for data in batches[:3]:  # static, then dynamic store size
        step("compiled", data)
    print(f"batch {b}, {args.tokens} tokens of {args.dim}: first compiled steps "
          f"{time.perf_counter() - start:.0f} s (compilation included)")
    best = {n: float("inf") for n in nets}
    for _ in range(args.repeats):
        for name in nets:
            start = time.perf_counter()
            for i in range(args.steps):
                step(name, batches[i % len(batches)])
            best[name] = min(best[name], (time.perf_counter() - start) / args.steps * 1e3)
    print("| batch | tokens x dim | eager ms/step | compiled ms/step | eager / compiled |")
    print("|---:|---|---:|---:|---:|")
    print(f"| {b} | {args.tokens} x {args.dim} | {best['eager']:.1f} | {best['compiled']:.1f} "
          f"| {best['eager'] / best['compiled']:.2f} |")


if __name__ == "__main__":
    main()
