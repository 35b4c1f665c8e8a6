"""Run a list of (config, extra args) x seeds through the CLI and print a markdown table.

Each run is ``python train.py fit -c CONFIG --seed_everything SEED [EXTRA...]`` in a
subprocess with its own log directory; ``{seed}`` in EXTRA is replaced by the seed (e.g.
``--data.rotation_seed {seed}``). The table reports mean ± std over seeds of the primary
variant (and any other variant with --variants) read from ``results.json``; it is printed
and written to --out after every finished row, so an interrupted call keeps its rows.
``--jobs N`` runs N subprocesses at once, each with one torch thread.

``--resume`` with the ``--log-root`` of an earlier, interrupted call reuses its finished
runs (when their recorded command is this call's) and continues the others from their
``last.ckpt`` (``--ckpt_path auto``); a resumed run reports no wall time.

``--collect`` runs nothing: each ``--run`` is ``"label=PATTERN ..."``, glob patterns of run
folders (each holding a ``results.json``, e.g. ``logs/run0_seed*/version_0``), and the row
is their mean ± std. It puts runs made by several calls, sessions or machines in one
table. Every run records ``run_table.json`` (its CLI arguments and wall time) next to its
``results.json``; a collected run without it shows no wall time.

Example (the synthetic stream's numbers in docs/results.md):

    python benchmarks/run_table.py --seeds 0 1 2 --out benchmarks/results/synthetic.md \
      --run "one task=configs/synthetic_agent.yaml --data.init_args.num_tasks 1" \
      --run "fine-tune=configs/synthetic_agent.yaml" \
      --run "joint=configs/synthetic_agent.yaml --data.init_args.joint true"
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
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


def train_args(config: str, extra: list[str], seed: int | None, log_root: str,
               name: str) -> list[str]:
    """The ``train.py`` arguments of one run, logging to ``log_root/name`` (``{seed}`` in
    ``extra`` replaced by the seed; ``seed`` None: the config's own)."""
    return ["fit", "-c", config, *([] if seed is None else ["--seed_everything", str(seed)]),
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", log_root,
            "--trainer.logger.init_args.name", name,
            *(a.replace("{seed}", str(seed)) for a in extra)]


def run_one(config: str, extra: list[str], seed: int, log_root: str, name: str,
            env: dict[str, str] | None = None, resume: bool = False) -> dict:
    args = train_args(config, extra, seed, log_root, name)
    folder = Path(log_root, name)
    resumed = False
    if resume:
        done = finished_run(folder, args)
        if done is not None:
            return done
        resumed = any(folder.glob("version_*/checkpoints/last.ckpt"))
    cmd = [sys.executable, str(ROOT / "train.py"), *args,
           *(["--ckpt_path", "auto"] if resume else [])]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"run failed: {shlex.join(cmd)}")
    version = newest_version(folder)
    (version / "run_table.json").write_text(json.dumps(
        {"args": args, "wall_s": None if resumed else wall}, indent=1) + "\n")
    return read_run(version)


def newest_version(folder: Path) -> Path | None:
    """The ``version_*`` folder of ``folder`` with the newest ``results.json`` (None: none)."""
    found = sorted(folder.glob("version_*/results.json"), key=os.path.getmtime)
    return found[-1].parent if found else None


def finished_run(folder: Path, args: list[str]) -> dict | None:
    """--resume: the finished run of ``args`` in ``folder`` (None: none yet, run it)."""
    version = newest_version(folder)
    if version is None or not json.loads((version / "results.json").read_text()).get(
            "complete", False):
        return None
    record = version / "run_table.json"
    recorded = json.loads(record.read_text()).get("args") if record.is_file() else None
    if recorded != args:
        raise SystemExit(f"--resume: {version} holds a finished run of "
                         f"{'another command' if recorded else 'an unrecorded command'}; "
                         "give another --log-root (or tabulate it with --collect)")
    return read_run(version)


def read_run(folder: Path) -> dict:
    """A finished run's ``results.json`` with ``wall_s`` (None where not recorded)."""
    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"{folder} has no results.json (not a run folder, or the run has "
                         "not finished a task)")
    res = json.loads(path.read_text())
    if not res.get("complete", False):
        raise SystemExit(f"{path} is of an unfinished run (complete: false); finish it "
                         "with --ckpt_path last or leave it out")
    record = folder / "run_table.json"
    res["wall_s"] = json.loads(record.read_text())["wall_s"] if record.is_file() else None
    return res


def collect(patterns: list[str]) -> list[dict]:
    """The runs of every folder matched by the glob ``patterns``, in sorted order."""
    folders = sorted({Path(f) for p in patterns for f in glob.glob(p)})
    if not folders:
        raise SystemExit(f"--collect: no folder matches {' '.join(patterns)}")
    return [read_run(f) for f in folders]


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
    ap.add_argument("--heldout", nargs="*", default=[],
                    help="add a column per few-shot key (e.g. recall/5) with the held-out "
                         "task's accuracy after adapting (domain-IL streams)")
    ap.add_argument("--log-root", default=None, help="where runs log (default: a temp dir)")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once (each then gets OMP_NUM_THREADS=1)")
    ap.add_argument("--resume", action="store_true",
                    help="with the --log-root of an earlier call: reuse its finished runs of "
                         "the same command, continue unfinished ones from their last.ckpt")
    ap.add_argument("--collect", action="store_true",
                    help='run nothing: each --run is "label=PATTERN ..." (globs of run folders '
                         "with a results.json), tabulated as they are")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    cols = ["run", "variant", *KEYS, "first task (final)", "last task (final)",
            *(f"held-out {k}" for k in args.heldout), "wall s/run"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    if args.collect:
        for spec in args.run:
            label, _, rest = spec.partition("=")
            lines += table_rows(label, collect(shlex.split(rest)), args.variants,
                                args.heldout)
        write(args.out, lines)
        print("\n".join(lines))
        return

    if args.resume and not args.log_root:
        ap.error("--resume needs --log-root, the folder of the call to resume")
    log_root = args.log_root or tempfile.mkdtemp(prefix="cl_table_")
    env = None if args.jobs == 1 else {**os.environ, "OMP_NUM_THREADS": "1"}
    specs = []
    for spec in args.run:
        label, _, rest = spec.partition("=")
        config, *extra = shlex.split(rest)
        specs.append((label, config, extra))
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [[pool.submit(run_one, config, extra, s, log_root, f"run{i}_seed{s}", env,
                                args.resume) for s in args.seeds]
                   for i, (_, config, extra) in enumerate(specs)]
        for (label, _, _), row_futures in zip(specs, futures, strict=True):
            results = [f.result() for f in row_futures]
            lines += table_rows(label, results, args.variants, args.heldout)
            print(lines[-1], flush=True)
            write(args.out, lines)
    print(f"\nseeds {args.seeds}; accuracies in %; logs under {log_root}\n\n" + "\n".join(lines))


def table_rows(label: str, results: list[dict], variants: list[str],
               heldout: list[str] = ()) -> list[str]:
    """One markdown row per reported variant of one run over its seeds; ``heldout``: the
    few-shot keys whose held-out accuracy gets a column each."""
    rows = []
    for variant in [None, *variants]:
        if variant == results[0]["primary_variant"]:
            continue  # already the first row
        docs = [r if variant is None else r["variants"].get(variant) for r in results]
        if any(d is None for d in docs):
            continue
        name = results[0]["primary_variant"] if variant is None else variant
        row = [label, name, *(fmt([d[k] for d in docs]) for k in KEYS),
               fmt([d["accuracy_matrix"][-1][0] for d in docs]),
               fmt([d["accuracy_matrix"][-1][-1] for d in docs]),
               *(fmt([heldout_accuracy(r, name, k) for r in results]) for k in heldout),
               wall_time(results)]
        rows.append("| " + " | ".join(row) + " |")
    return rows


def heldout_accuracy(result: dict, variant: str, key: str) -> float | None:
    """The held-out task's few-shot accuracy of ``variant`` after ``key`` (None if absent)."""
    few_shot = result.get("few_shot") or {}
    return ((few_shot.get("heldout") or {}).get(variant) or {}).get(key)


def wall_time(results: list[dict]) -> str:
    """Mean wall seconds per run over the runs that recorded one ("-" if none did)."""
    walls = [r["wall_s"] for r in results if r.get("wall_s") is not None]
    return f"{statistics.mean(walls):.0f}" if walls else "-"


def write(out: str | None, lines: list[str]) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
