"""How good a raw-input memory alone is: a cosine vote of the k nearest of n stored
training items per class (the read the recall agent does with ``recall_key input``, without
any network), scored on the test set.

On MNIST (``--root``): n training images per class, the 10,000 test images. On the synthetic
stream (``--synthetic``): the held-out task of a ``LinearShiftStream`` built with the given
``name=value`` options, n of its training items per class as the store (as the few-shot
metric's ``recall/n`` reads them), its test set as the queries; the reference for the
agent's few-shot read of a never-trained task.

    python benchmarks/knn_vote.py --root data --per-class 20 50 --k 1 8
    python benchmarks/knn_vote.py --synthetic noise=2.0 --per-class 5 --k 1 8

Prints a markdown table: stored per class, k, vote sharpness, accuracy (%).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchvision.datasets import MNIST

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cl_lightning.episodic_index import nearest  # noqa: E402
from cl_lightning.few_shot import pick_shots  # noqa: E402


def knn_votes(xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, k: int,
              sharpness: float, classes: int) -> torch.Tensor:
    """(Q, classes) read mass per label of a softmax(sharpness x cosine)-weighted vote of
    each query's k nearest stored items (rows of ``xs``, labels ``ys``)."""
    index, sim, _ = nearest(xq, xs, min(k, len(xs)))
    weights = torch.softmax(sharpness * sim, 1)
    return torch.zeros(len(xq), classes).scatter_add_(1, ys[index], weights)


def vote_accuracy(xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor,
                  k: int, sharpness: float) -> float:
    """Accuracy (%) of a softmax(sharpness x cosine)-weighted vote of the k nearest."""
    votes = knn_votes(xs, ys, xq, k, sharpness, int(ys.max()) + 1)
    return 100.0 * (votes.argmax(1) == yq).float().mean().item()


def synthetic_heldout(options: list[str]) -> tuple[torch.Tensor, ...]:
    """Train and test tensors of the held-out task of a ``LinearShiftStream(**options)``
    (``name=value`` strings; values parsed as int or float)."""
    from datamodules.synthetic import LinearShiftStream

    kwargs = {}
    for option in options:
        name, _, value = option.partition("=")
        kwargs[name] = int(value) if value.lstrip("-").isdigit() else float(value)
    task = LinearShiftStream(**kwargs).heldout_task()
    return (*task.train.tensors, *task.test.tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--root", help="folder holding MNIST/raw")
    source.add_argument("--synthetic", nargs="*", metavar="NAME=VALUE",
                        help="the synthetic stream's held-out task (LinearShiftStream options)")
    ap.add_argument("--per-class", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--sharpness", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.synthetic is not None:
        xtr, ytr, xte, yte = synthetic_heldout(args.synthetic)
    else:
        train, test = (MNIST(args.root, train=t, download=False) for t in (True, False))
        xtr, ytr = train.data.flatten(1).float() / 255, train.targets
        xte, yte = test.data.flatten(1).float() / 255, test.targets
    g = torch.Generator().manual_seed(args.seed)
    print("| stored per class | k | sharpness | accuracy |\n|---|---|---|---|")
    for n in args.per_class:
        idx = pick_shots(ytr, n, g)
        for k in args.k:
            acc = vote_accuracy(xtr[idx], ytr[idx], xte, yte, k, args.sharpness)
            print(f"| {n} | {k} | {args.sharpness:g} | {acc:.1f} |")


if __name__ == "__main__":
    main()
