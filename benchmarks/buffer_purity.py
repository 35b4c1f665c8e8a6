"""Buffer purity of label-noise runs: the fraction of stored samples whose label is clean.

Reads the last checkpoint of every run under a log root (as written by run_table.py) and
prints one row per run directory, plus mean ± std per group (the part before _seed).

    python benchmarks/buffer_purity.py /tmp/tables/noise
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch


def purity(ckpt: Path) -> float | None:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    for cb in state.get("callbacks", {}).values():
        data = (cb.get("buffer") or {}).get("data") if isinstance(cb, dict) else None
        if data and "y_clean" in data:
            return (data["y"] == data["y_clean"]).float().mean().item() * 100
    return None


def main() -> None:
    root = Path(sys.argv[1])
    groups: dict[str, list[float]] = defaultdict(list)
    print("| run | buffer purity (%) |\n|---|---|")
    for ckpt in sorted(root.glob("*/version_*/checkpoints/last.ckpt")):
        run = ckpt.parts[-4]
        p = purity(ckpt)
        if p is not None:
            groups[run.rsplit("_seed", 1)[0]].append(p)
            print(f"| {run} | {p:.1f} |")
    print("\n| group | purity mean ± std |\n|---|---|")
    for g, vals in groups.items():
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        print(f"| {g} | {statistics.mean(vals):.1f} ± {sd:.1f} (n={len(vals)}) |")


if __name__ == "__main__":
    main()
