"""Retrieval speed: each query's nearest stored items, never its own stored copy.

Compares, in one process and interleaved, the two ways the learner can exclude a query's
own item from its neighbours:

- ``full mask``: ``nearest(queries, keys, k, same_item(query_prints, key_prints))``, which
  compares every query's fingerprint with every stored one (a ``(B, S)`` float64 mask);
- ``candidates`` (what :meth:`Recalling.retrieve` uses): ``nearest_others``, which compares
  fingerprints only on each query's ``k + 2`` most similar keys (and, for a store of at
  most 256 items, takes the full mask itself).

Both return the same neighbours (tested). Keys are random ``(S, D)`` float32 rows, as the
raw-input keys of the recall agents (synthetic stream: D 64, store 1,000, training batch 64
and evaluation batch 256; Split-MNIST: D 784, store 200, batch 20). Median µs per call of
``--repeats`` runs of ``--calls`` calls, one thread.

    python benchmarks/retrieval_speed.py [--k 8] [--calls 300] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cl_lightning.episodic_index import fingerprint, nearest, nearest_others, same_item

CASES = [  # (name, queries B, store S, key width D)
    ("synthetic, training batch", 64, 1000, 64),
    ("synthetic, evaluation batch", 256, 1000, 64),
    ("Split-MNIST, training batch", 20, 200, 784),
    ("Split-MNIST, evaluation batch", 256, 200, 784),
]


def full_mask(queries, keys, k, query_prints, key_prints):
    return nearest(queries, keys, k, same_item(query_prints, key_prints))


def per_call_us(fn, calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e6 * (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print("| case | B | S | D | full mask µs | candidates µs | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, b, s, d in CASES:
        keys = torch.randn(s, d, generator=g)
        queries = torch.cat([keys[: b // 4], torch.randn(b - b // 4, d, generator=g)])
        qp, kp = fingerprint(queries), fingerprint(keys)
        full = functools.partial(full_mask, queries, keys, args.k, qp, kp)
        cand = functools.partial(nearest_others, queries, keys, args.k, qp, kp)
        times = {"full": [], "cand": []}
        for _ in range(args.repeats):
            times["full"].append(per_call_us(full, args.calls))
            times["cand"].append(per_call_us(cand, args.calls))
        f, c = statistics.median(times["full"]), statistics.median(times["cand"])
        print(f"| {name} | {b} | {s} | {d} | {f:.0f} | {c:.0f} | {f / c:.2f}× |")


if __name__ == "__main__":
    main()
