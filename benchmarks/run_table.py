"""Run a list of (config, extra args) x seeds through the CLI and print a markdown table.

Each run is ``python train.py fit -c CONFIG --seed_everything SEED [EXTRA...]`` in a
subprocess with its own log directory; the table reports mean ± std over seeds of the
primary variant (and any other variant with --variants) read from ``results.json``.

Example (the synthetic stream's numbers in the README):

    python benchmarks/run_table.py --seeds 0 1 2 --out benchmarks/results/synthetic.md \
      --run "one task=configs/synthetic.yaml --data.init_args.num_tasks 1" \
      --run "fine-tune=configs/synthetic.yaml" \
      --run "joint=configs/synthetic.yaml --data.init_args.joint true"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["avg_accuracy", "forgetting", "bwt", "fwt"]


def run_one(config: str, extra: list[str], seed: int, log_root: str, name: str) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "-c", config,
           "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false",
           "--trainer.logger.init_args.save_dir", log_root,
           "--trainer.logger.init_args.name", name, *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"run failed: {shlex.join(cmd)}")
    found = sorted(Path(log_root, name).glob("version_*/results.json"), key=os.path.getmtime)
    res = json.loads(found[-1].read_text())
    res["wall_s"] = wall
    return res


def fmt(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True,
                    help='"label=CONFIG [extra CLI args]" (repeatable)')
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="*", default=[],
                    help="also report these variants (e.g. task_il)")
    ap.add_argument("--first-task", action="store_true",
                    help="add a column with the first task's final accuracy")
    ap.add_argument("--log-root", default=None, help="where runs log (default: a temp dir)")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args()

    log_root = args.log_root or tempfile.mkdtemp(prefix="cl_table_")
    cols = ["run", "variant", *KEYS, "first task (final)", "wall s/run"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i, spec in enumerate(args.run):
        label, _, rest = spec.partition("=")
        config, *extra = shlex.split(rest)
        results = [run_one(config, extra, s, log_root, f"run{i}_seed{s}") for s in args.seeds]
        for variant in [None, *args.variants]:
            docs = [r if variant is None else r["variants"].get(variant) for r in results]
            if any(d is None for d in docs):
                continue
            name = results[0]["primary_variant"] if variant is None else variant
            row = [label, name, *(fmt([d[k] for d in docs]) for k in KEYS),
                   fmt([d["accuracy_matrix"][-1][0] for d in docs]),
                   f"{statistics.mean(r['wall_s'] for r in results):.0f}"]
            lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(f"\nseeds {args.seeds}; accuracies in %; logs under {log_root}\n\n{table}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
