"""Whole runs timed against each other, and against an earlier commit, as a markdown table.

Each ``--run "label[@REV]=CONFIG [extra CLI args]"`` is ``python train.py fit -c CONFIG
[extra...]`` timed as a whole process (start-up, imports and evaluation included), progress
bar off, logging to a temporary folder. ``@REV`` runs it in a detached git worktree of that
commit (made for the call, removed after), with its own C++ extension cache, so both
trees' DNC kernels are built once and neither replaces the other's.

Rounds: every run once per round, in the order given, reversed in every other round, so
that no run always goes first or always follows the same one. Before the first round every
run makes one untimed training step (the kernels are built, the files are in the page
cache). The table shows each run's times, their median and its accuracy (the primary
result, to show the runs did the work being compared); each ``--ratio "A/B"`` adds a row
with A's time over B's, per round (the two ran minutes apart) and of the medians.

    python benchmarks/wall_clock.py --rounds 3 \
      --run "default run at cd28461@cd28461=configs/synthetic.yaml" \
      --run "agent config=configs/synthetic_agent.yaml" \
      --ratio "default run at cd28461/agent config"

Timings are only comparable within one call: run nothing else on the machine meanwhile.
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
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run_table import newest_version, train_args  # noqa: E402


@dataclass
class Run:
    """One ``--run``: its label, the commit it runs at (None: this tree) and its command."""

    label: str
    rev: str | None
    config: str
    extra: list[str]
    walls: list[float] = field(default_factory=list)
    accuracy: float | None = None


def parse_run(spec: str) -> Run:
    """``"label[@REV]=CONFIG [extra...]"`` -> :class:`Run`."""
    head, sep, rest = spec.partition("=")
    words = shlex.split(rest)
    if not sep or not head.strip() or not words:
        raise SystemExit(f'--run {spec!r}: expected "label[@REV]=CONFIG [extra CLI args]"')
    label, _, rev = head.partition("@")
    return Run(label.strip(), rev.strip() or None, words[0], words[1:])


def parse_ratio(spec: str, runs: list[Run]) -> tuple[Run, Run]:
    """``"A/B"`` (two run labels) -> the two runs."""
    by_label = {r.label: r for r in runs}
    a, sep, b = spec.partition("/")
    missing = [x for x in (a, b) if x not in by_label]
    if not sep or missing:
        raise SystemExit(f"--ratio {spec!r}: expected two run labels as A/B "
                         f"(labels: {', '.join(by_label)})")
    return by_label[a], by_label[b]


def round_order(runs: list[Run], round_index: int) -> list[Run]:
    """The runs in the order given in even rounds, reversed in odd ones."""
    return list(runs) if round_index % 2 == 0 else list(reversed(runs))


def ratios(a: Run, b: Run) -> list[float]:
    """A's time over B's, round by round."""
    return [x / y for x, y in zip(a.walls, b.walls, strict=True)]


def add_worktree(rev: str, where: Path) -> Path:
    """A detached worktree of ``rev`` at ``where`` (exits naming the revision if git cannot)."""
    done = subprocess.run(["git", "worktree", "add", "--detach", "-f", str(where), rev],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"--run ...@{rev}: git worktree add failed: {done.stderr.strip()}")
    return where


def remove_worktree(where: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT,
                   capture_output=True, text=True)


def timed_run(run: Run, tree: Path, env: dict[str, str], log_root: Path, name: str,
              extra: tuple[str, ...] = ()) -> tuple[float, Path | None]:
    """Wall seconds of one run in ``tree`` and its log folder; exits with the run's
    output if it fails."""
    args = train_args(run.config, [*run.extra, *extra], None, str(log_root), name)
    cmd = [sys.executable, str(tree / "train.py"), *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed (in {tree}):\n{done.stdout[-2000:]}\n"
                         f"{done.stderr[-4000:]}")
    return wall, newest_version(log_root / name)


def table(runs: list[Run], ratio_pairs: list[tuple[Run, Run]]) -> list[str]:
    rounds = len(runs[0].walls)
    head = ["run", "commit", *(f"round {i + 1} (s)" for i in range(rounds)), "median (s)",
            "accuracy"]
    lines = ["| " + " | ".join(head) + " |", "|---|---" + "|---:" * (len(head) - 2) + "|"]
    for r in runs:
        acc = "-" if r.accuracy is None else f"{r.accuracy:.2f}"
        lines.append("| " + " | ".join([r.label, r.rev or "this tree",
                                         *(f"{w:.1f}" for w in r.walls),
                                         f"{statistics.median(r.walls):.1f}", acc]) + " |")
    for a, b in ratio_pairs:
        per_round = ratios(a, b)
        median = statistics.median(a.walls) / statistics.median(b.walls)
        lines.append("| " + " | ".join([f"{a.label} / {b.label}", "",
                                         *(f"{x:.2f}x" for x in per_round),
                                         f"{median:.2f}x", ""]) + " |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True,
                   help='"label[@REV]=CONFIG [extra CLI args]" (repeatable)')
    p.add_argument("--ratio", action="append", default=[],
                   help='"A/B": a row with run A\'s time over run B\'s (repeatable)')
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the untimed one-step run of each run before the first round")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = [parse_run(s) for s in args.run]
    if len({r.label for r in runs}) < len(runs):
        raise SystemExit("--run: every run needs its own label")
    pairs = [parse_ratio(s, runs) for s in args.ratio]
    with tempfile.TemporaryDirectory(prefix="wall_clock_") as tmp:
        tmp_path = Path(tmp)
        trees: dict[str | None, Path] = {None: ROOT}
        envs: dict[str | None, dict[str, str]] = {None: dict(os.environ)}
        try:
            for rev in dict.fromkeys(r.rev for r in runs if r.rev):
                trees[rev] = add_worktree(rev, tmp_path / f"tree_{len(trees)}")
                envs[rev] = {**os.environ,
                             "TORCH_EXTENSIONS_DIR": str(tmp_path / f"ext_{len(envs)}")}
            for i, run in enumerate(runs):
                if args.warmup:
                    timed_run(run, trees[run.rev], envs[run.rev], tmp_path / "warmup",
                              f"run{i}", ("--trainer.max_steps", "1"))
            for k in range(args.rounds):
                for run in round_order(runs, k):
                    i = runs.index(run)
                    wall, folder = timed_run(run, trees[run.rev], envs[run.rev],
                                             tmp_path / "logs", f"run{i}_round{k}")
                    run.walls.append(wall)
                    if folder is not None:  # the primary result (an older commit's
                        # results.json may lack the fields read_run checks)
                        run.accuracy = json.loads(
                            (folder / "results.json").read_text()).get("avg_accuracy")
                    print(f"round {k + 1}: {run.label}: {wall:.1f} s", file=sys.stderr,
                          flush=True)
        finally:
            for rev, tree in trees.items():
                if rev is not None:
                    remove_worktree(tree)
    lines = [f"Command: python {shlex.join(['benchmarks/wall_clock.py', *sys.argv[1:]])}", "",
             *table(runs, pairs)]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
