"""One CPU thread against two on every shipped CPU config, as a markdown table.

Each run is ``python train.py fit -c STREAM [-c METHOD] --threads N`` for the first
``--max-steps`` training steps (start-up included, no initial evaluation, progress bar off),
timed as a whole process. Every config runs once with each thread count, the two one after
the other, so both see the same machine; the last column is the two-thread run's time over
the one-thread run's (below 1: the second thread helps).

With ``--busy`` each config also runs both ways while another process spins on one core
(``python -c "while True: pass"``), the case of a shared machine or of two jobs on one
box: there torch's threads wait for each other at every operator.

Configs: every top-level config of ``configs/`` alone (the synthetic ones, the MNIST
streams fine-tuning, the Split-MNIST agent), and each stream config with each method config
of its folder. The CIFAR and Tiny-ImageNet configs (ResNet-18, GPU-sized) are left out;
``--only`` picks a subset by substring.

    DATA_ROOT=... python benchmarks/threads.py [--max-steps 300] [--busy]
        [--only split_mnist] [--out benchmarks/results/threads_configs.md]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run_table import train_args  # noqa: E402

GPU_STREAMS = ("split_cifar10", "split_cifar100", "split_tiny_imagenet")  # ResNet-18 configs


def shipped_configs() -> list[list[str]]:
    """``-c`` lists of every shipped CPU config: each top-level config alone, then each
    stream config with every method config of its folder (``configs/<stream>/``)."""
    configs = ROOT / "configs"
    runs = []
    for top in sorted(configs.glob("*.yaml")):
        if top.stem in GPU_STREAMS:
            continue
        runs.append([f"configs/{top.name}"])
        for method in sorted((configs / top.stem).glob("*.yaml")):
            runs.append([f"configs/{top.name}", f"configs/{top.stem}/{method.name}"])
    return runs


def needs_mnist(configs: list[str]) -> bool:
    return any("mnist" in c for c in configs)


def run_once(configs: list[str], threads: int, args: argparse.Namespace) -> float:
    """Wall seconds of one run; exits with the run's output if it fails."""
    with tempfile.TemporaryDirectory() as out:
        extra = [arg for c in configs[1:] for arg in ("-c", c)]
        extra += ["--threads", str(threads), "--trainer.max_steps", str(args.max_steps),
                  "--evaluation.eval_initial", "false",
                  "--checkpoint.dirpath", str(Path(out) / "checkpoints")]
        if needs_mnist(configs):
            extra += ["--data.root", args.data_root, "--data.download", "false"]
        cmd = [sys.executable, "train.py", *train_args(configs[0], extra, 0, out, "threads")]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return wall


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("DATA_ROOT", "data"),
                   help="folder holding MNIST/raw (default: $DATA_ROOT, else data)")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--busy", action="store_true",
                   help="also run every config beside a process spinning on one core")
    p.add_argument("--only", nargs="*", default=[],
                   help="keep the configs whose paths contain one of these substrings")
    p.add_argument("--out", help="also write the table to this markdown file")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    runs = [c for c in shipped_configs()
            if not args.only or any(s in " ".join(c) for s in args.only)]
    if not runs:
        sys.exit("--only matched no config")
    conditions = ["idle"] + (["busy"] if args.busy else [])
    rows = []
    for configs in runs:
        row = {"run": " + ".join(Path(c).as_posix().removeprefix("configs/") for c in configs)}
        for condition in conditions:
            spinner = (subprocess.Popen([sys.executable, "-c", "while True: pass"])
                       if condition == "busy" else None)
            try:
                for threads in (1, 2):
                    row[(condition, threads)] = run_once(configs, threads, args)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
            print(row["run"], condition, f"{row[(condition, 1)]:.1f}",
                  f"{row[(condition, 2)]:.1f}", file=sys.stderr, flush=True)
        rows.append(row)

    head = ["config"] + [f"{c}, {n} thread{'s' if n > 1 else ''} (s)"
                         for c in conditions for n in (1, 2)]
    head += [f"{c}: 2 / 1 threads" for c in conditions]
    lines = [f"Command: python {' '.join(sys.argv)}", "",
             f"Whole runs of the first {args.max_steps} training steps (start-up included, no "
             "initial evaluation), wall seconds.", "",
             "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in rows:
        cells = [row["run"]] + [f"{row[(c, n)]:.1f}" for c in conditions for n in (1, 2)]
        cells += [f"{row[(c, 2)] / row[(c, 1)]:.2f}" for c in conditions]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
