"""Summarise the few-shot adaptation results of finished runs as a markdown table.

For each ``name=path/to/results.json``: the mean over tasks of the accuracy before
adaptation and after adapting on n examples per class by inner loop / context / both (the
``few_shot`` block the evaluation callback writes), and the same on the held-out task.

    python benchmarks/few_shot_table.py --variant domain_il \\
      "ER=logs/synthetic/version_0/results.json" "ER+MAML+context=logs/.../results.json"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cl_lightning.few_shot import mean_over_tasks  # noqa: E402


def fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="NAME=results.json")
    ap.add_argument("--variant", default=None, help="evaluation variant (default: primary)")
    args = ap.parse_args()
    header = None
    lines = []
    for spec in args.runs:
        name, path = spec.split("=", 1)
        with open(path) as f:
            res = json.load(f)
        means = mean_over_tasks(res["few_shot"])
        variant = args.variant or res["primary_variant"]
        tasks = means["tasks"][variant]
        if header is None:
            header = list(tasks)
            lines.append("| run | where | " + " | ".join(header) + " |")
            lines.append("|---|---|" + "---|" * len(header))
        lines.append(f"| {name} | trained tasks (mean) | "
                     + " | ".join(fmt(tasks.get(k)) for k in header) + " |")
        if means["heldout"]:
            held = means["heldout"][variant]
            lines.append(f"| {name} | held-out task | "
                         + " | ".join(fmt(held.get(k)) for k in header) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
