"""The optimizer's step on a config's model: PyTorch's Adam as a loop over the parameters
(its CPU default), as ``foreach`` kernels and as one ``fused`` kernel, timed on the same
parameters and gradients, with each path's distance from the loop after the timed steps.

    python benchmarks/optimizer_step.py --threads 1 \
        --config "configs/split_mnist.yaml -c configs/split_mnist/agent_200.yaml" \
        --config configs/synthetic.yaml

Each ``--config`` is the ``-c`` list of a training command (extra options allowed); its
model is built as ``train.py`` builds it (no data is read) and its optimizer's
hyperparameters are kept, whichever implementation the config chose. Per row: the number of
parameter tensors and of parameters, median µs per step of ``--repeats`` timings of
``--steps`` steps each (after a warm-up), and the largest relative difference of a
parameter from the loop's after the same steps (0: bit-equal).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cl_lightning.cli import ContinualCLI  # noqa: E402

PATHS = {"loop": {"foreach": False, "fused": False}, "foreach": {"foreach": True, "fused": False},
         "fused": {"foreach": False, "fused": True}}


def config_model(config: str) -> tuple[torch.nn.Module, type, dict]:
    """The net, optimizer class and optimizer hyperparameters of a ``-c`` list."""
    words = shlex.split(config)
    args = ["-c", *words] if words and not words[0].startswith("-") else words
    cli = ContinualCLI(args=args, run=False)
    optimizer = cli.model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    hyper = {k: v for k, v in optimizer.defaults.items()
             if k not in ("foreach", "fused", "differentiable", "capturable")}
    return cli.model.net, type(optimizer), hyper


def time_paths(net: torch.nn.Module, opt_class: type, hyper: dict, steps: int, repeats: int,
               seed: int = 0) -> dict[str, tuple[float, float]]:
    """Per path: (median µs per step, largest relative difference from the loop's result
    after the warm-up and every timed step)."""
    start = [p.detach().clone() for p in net.parameters()]
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=g) * 1e-2 for p in start]
    results: dict[str, tuple[float, float]] = {}
    reference: list[torch.Tensor] | None = None
    for name, flags in PATHS.items():
        params = [torch.nn.Parameter(p.clone()) for p in start]
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr.clone()
        optimizer = opt_class(params, **hyper, **flags)
        for _ in range(10):
            optimizer.step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            times.append((time.perf_counter() - t0) / steps * 1e6)
        final = [p.detach() for p in params]
        if reference is None:
            reference = final
        diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                   for a, b in zip(final, reference, strict=True))
        results[name] = (statistics.median(times), diff)
    return results


def table(rows: list[tuple[str, int, int, dict[str, tuple[float, float]]]]) -> str:
    lines = ["| config | tensors | parameters | loop µs | foreach µs | fused µs | loop / fused "
             "| foreach: max rel. diff | fused: max rel. diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for config, tensors, numel, r in rows:
        lines.append(f"| `{config}` | {tensors} | {numel:,} | {r['loop'][0]:.0f} | "
                     f"{r['foreach'][0]:.0f} | {r['fused'][0]:.0f} | "
                     f"{r['loop'][0] / r['fused'][0]:.2f}x | {r['foreach'][1]:.1g} | "
                     f"{r['fused'][1]:.1g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True,
                        help='a training command\'s "-c" list, e.g. "configs/synthetic.yaml"')
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = []
    for config in args.config:
        net, opt_class, hyper = config_model(config)
        torch.set_num_threads(args.threads)  # after the CLI, which sets its own count
        params = list(net.parameters())
        rows.append((config, len(params), sum(p.numel() for p in params),
                     time_paths(net, opt_class, hyper, args.steps, args.repeats)))
    out = (f"`python benchmarks/optimizer_step.py --threads {args.threads}` "
           f"({args.steps} steps x {args.repeats} repeats, torch {torch.__version__})\n\n"
           + table(rows))
    print(out)
    return out


if __name__ == "__main__":
    main()
