"""Wall time of our Experience Replay against mammoth's (aimagelab/mammoth), one sitting.

What is measured: for each stream (Split-MNIST and Permuted-MNIST, ER with a 200-sample
buffer, DER-paper protocol) and seed, the wall time of one whole training run of ours,
``python train.py fit -c configs/<stream>.yaml -c configs/<stream>/er_200.yaml``, and of
mammoth's ``python main.py --model er --dataset <seq-mnist|perm-mnist> --buffer_size 200``
with its best arguments (``utils/best_args.py``), from Python's start to its exit
(``time.perf_counter`` around ``subprocess.run``). Each row also shows both final average
accuracies (ours: ``avg_accuracy`` of ``results.json``; mammoth: its last "Accuracy for N
task(s)" line), so a reader sees that the two ran the same protocol; after each run the
settings it recorded (ours: the config in ``results.json``; mammoth: the arguments in its
``logs.pyd``) are checked against the protocol below, and a mismatch stops the script.
The tracked target is a ratio (mammoth / ours) >= 3 on both streams.

How: runs are strictly sequential (ours, then mammoth, per stream and seed), on the same
machine, under the same environment: the process is pinned to ``--threads`` CPUs
(children inherit it), ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``--threads``, no GPU
(``CUDA_VISIBLE_DEVICES`` empty), W&B unset, Hugging Face offline. Progress bars are off on
both sides. Before the timed runs each side is warmed up once, untimed (``--help`` of its
CLI: imports, bytecode, OS file cache). Everything either side writes (our logs and
checkpoints, mammoth's copy, data links and results) goes to a fresh temporary folder;
our runs start in it too, so nothing lands in the repository (except Python's ignored
``__pycache__``).

Mammoth setup (once): check out aimagelab/mammoth (a git checkout or worktree puts its
commit in the table; the configs' best args are those of e75a491) and install
what its imports need into a Python that has the same torch as ours, e.g. a venv over
this one: ``python -m venv --system-site-packages V && V/bin/pip install kornia timm
open_clip_torch onedrivedownloader ftfy pandas``; pass ``--mammoth-python V/bin/python``
(default: this Python). The script runs a temporary copy of ``--mammoth`` without
``datasets/seq_8vision.py``: mammoth imports every dataset module at start-up and that
one downloads CLIP weights at import time, which fails offline (mammoth's start-up is
therefore slightly shorter than upstream's; this favours mammoth). Mammoth reads MNIST
from ``<base_path>MNIST/<class name>/raw``; the script links that layout to
``--data-root``'s ``MNIST/raw`` (torchvision's layout, which ours reads directly).

Protocol (checked against mammoth's code): MLP 784-100-100-10, SGD without momentum or
weight decay, one epoch per task, full training and test sets, reservoir buffer of 200,
one cross-entropy mean over the union of the current and the replayed batch. Split-MNIST:
5 class-IL tasks of 2 digits, batch 10, replay batch 10, lr 0.01, class-IL accuracy.
Permuted-MNIST: 20 domain-IL tasks (the first permuted too), raw [0, 1] pixels, batch
128, replay batch 128, lr 0.2.

Differences that remain (none makes ours do less work):

- evaluation: ours evaluates every task's test set before training and, after each task,
  the tasks seen so far and the next one (the stream configs' ``eval_future: false``;
  the table in docs/results.md was measured when every task was evaluated after each
  task), plus a few-shot adaptation metric after the last task, and writes
  TensorBoard logs, an accuracy heatmap and per-task checkpoints; mammoth evaluates the
  seen tasks after each task and writes one results file (its ``--disable_log 1`` crashes
  at e75a491, so its logger stays on, as does its per-step memory tracker, which has no
  switch); W&B is off on both sides;
- data loading: mammoth keeps its default DataLoader workers, min(8, pinned CPUs);
  ours loads in-process (its default, ``num_workers: 0``); both are confined to the
  same CPUs;
- initialisation: mammoth's MLP is Xavier-uniform, ours PyTorch's default;
- Split-MNIST inputs: ours standardised with MNIST's mean/std, mammoth's raw [0, 1];
- random draws (permutations, shuffles, buffer samples) come from different generators:
  same distributions, not the same draws, so accuracies agree within seed noise only.

``--quick STEPS`` (with ``--max-tasks N`` for Permuted-MNIST) only tests this script: both
sides train STEPS batches per task (ours ``--trainer.limit_train_batches``, mammoth
``--fitting_mode iters --n_iters``) and Permuted-MNIST stops after N tasks (ours
``--data.num_tasks``, mammoth ``--stop_after``); its rows are labelled "quick ... (not the
protocol)". Our Split-MNIST cannot stop before its 5 tasks, so ``--max-tasks`` leaves it
whole.

Full measurement (roughly 45 minutes on two quiet cores, most of it mammoth's
Permuted-MNIST; the table is rewritten to --out after every row):

    python benchmarks/vs_mammoth.py --mammoth MAMMOTH --data-root DATA \\
      --mammoth-python VENV/bin/python --seeds 0 --threads 2 \\
      --out benchmarks/results/vs_mammoth.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
# mammoth's MNIST datasets are torchvision subclasses; torchvision looks for the raw files
# in <root>/<class name>/raw, so each class name mammoth uses gets a link
MAMMOTH_MNIST_CLASSES = ["MNIST", "MyMNIST"]
# dataset modules mammoth imports at start-up that need the network to import
MAMMOTH_OFFLINE_DROPS = ["datasets/seq_8vision.py"]
MAMMOTH_ACCURACY = re.compile(
    r"^Accuracy for (\d+) task\(s\):\s*\[(?:Class|Domain)-IL\]: ([0-9.]+) %", re.MULTILINE)


@dataclass(frozen=True)
class Stream:
    """One stream of the comparison: our configs, mammoth's dataset and the protocol both
    must run (mammoth's best args, ``utils/best_args.py``; checked on both sides)."""

    configs: tuple[str, str]
    mammoth_dataset: str
    num_tasks: int
    batch: int
    replay: int
    lr: float
    buffer: int = 200
    epochs: int = 1
    can_stop_early: bool = False  # ours has an option for fewer tasks (data.num_tasks)


STREAMS = {
    "split_mnist": Stream(
        ("configs/split_mnist.yaml", "configs/split_mnist/er_200.yaml"), "seq-mnist",
        num_tasks=5, batch=10, replay=10, lr=0.01),
    "permuted_mnist": Stream(
        ("configs/permuted_mnist.yaml", "configs/permuted_mnist/er_200.yaml"), "perm-mnist",
        num_tasks=20, batch=128, replay=128, lr=0.2, can_stop_early=True),
}


@dataclass(frozen=True)
class Quick:
    """The test-only shortening: ``steps`` batches per task, ``max_tasks`` tasks at most
    (where the stream allows it)."""

    steps: int
    max_tasks: int | None

    def tasks(self, stream: Stream) -> int:
        if self.max_tasks is None or not stream.can_stop_early:
            return stream.num_tasks
        return min(self.max_tasks, stream.num_tasks)

    def label(self, stream: Stream) -> str:
        return (f"quick: {self.steps} steps/task, {self.tasks(stream)} of "
                f"{stream.num_tasks} tasks (not the protocol)")


# ----- environment -----------------------------------------------------------------------
def pin_cpus(threads: int) -> list[int]:
    """Pin this process (and so every run it starts) to ``threads`` of its CPUs."""
    available = sorted(os.sched_getaffinity(0))
    if threads > len(available):
        raise SystemExit(f"--threads {threads}: only {len(available)} CPUs are available")
    cpus = available[:threads]
    os.sched_setaffinity(0, cpus)
    return cpus


def run_env(threads: int) -> dict[str, str]:
    """The environment of every run, ours and mammoth's alike."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    return env


def check_data_root(data_root: Path) -> Path:
    """``data_root/MNIST/raw`` with the four uncompressed MNIST files, or exit."""
    raw = data_root / "MNIST" / "raw"
    missing = [f for f in MNIST_FILES if not (raw / f).is_file()]
    if missing:
        raise SystemExit(f"--data-root {data_root}: {raw} lacks {', '.join(missing)} "
                         "(torchvision's MNIST layout, uncompressed)")
    return raw


def mammoth_tree(src: Path, dest: Path) -> Path:
    """A copy of mammoth's tree at ``dest`` without the modules that cannot be imported
    offline (see the module docstring)."""
    if not (src / "main.py").is_file() or not (src / "utils" / "best_args.py").is_file():
        raise SystemExit(f"--mammoth {src}: not a mammoth tree (no main.py, utils/best_args.py)")
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    for rel in MAMMOTH_OFFLINE_DROPS:
        (dest / rel).unlink(missing_ok=True)
    return dest


def mammoth_data(raw: Path, base: Path) -> Path:
    """mammoth's ``--base_path`` with links to the MNIST raw files (nothing copied)."""
    for name in MAMMOTH_MNIST_CLASSES:
        folder = base / "MNIST" / name
        folder.mkdir(parents=True)
        (folder / "raw").symlink_to(raw.resolve(), target_is_directory=True)
    return base


def git_commit(path: Path) -> str:
    """``git describe --always --dirty`` of ``path`` ("not a git checkout" if none)."""
    proc = subprocess.run(["git", "-C", str(path), "describe", "--always", "--dirty"],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "not a git checkout"


# ----- commands --------------------------------------------------------------------------
def ours_cmd(stream: Stream, seed: int, data_root: Path, log_root: Path, name: str,
             quick: Quick | None) -> list[str]:
    cmd = [sys.executable, str(ROOT / "train.py"), "fit",
           "-c", str(ROOT / stream.configs[0]), "-c", str(ROOT / stream.configs[1]),
           "--data.root", str(data_root), "--data.download", "false",
           "--seed_everything", str(seed),
           "--trainer.enable_progress_bar", "false",
           "--trainer.logger.init_args.save_dir", str(log_root),
           "--trainer.logger.init_args.name", name]
    if quick is not None:
        cmd += ["--trainer.limit_train_batches", str(quick.steps)]
        if quick.tasks(stream) < stream.num_tasks:
            cmd += ["--data.num_tasks", str(quick.tasks(stream))]
    return cmd


def mammoth_cmd(python: str, stream: Stream, seed: int, base: Path, out: Path,
                workers: int | None, quick: Quick | None) -> list[str]:
    cmd = [python, "main.py", "--model", "er", "--dataset", stream.mammoth_dataset,
           "--buffer_size", str(stream.buffer), "--lr", str(stream.lr),
           "--batch_size", str(stream.batch), "--minibatch_size", str(stream.replay),
           "--n_epochs", str(stream.epochs), "--seed", str(seed),
           "--base_path", str(base), "--checkpoint_path", str(out / "checkpoints"),
           "--results_path", str(out / "results"), "--non_verbose", "1"]
    if workers is not None:
        cmd += ["--num_workers", str(workers)]
    if quick is not None:
        cmd += ["--fitting_mode", "iters", "--n_iters", str(quick.steps)]
        if quick.tasks(stream) < stream.num_tasks:
            cmd += ["--stop_after", str(quick.tasks(stream))]
    return cmd


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, str]:
    """Run ``cmd`` to its end -> (wall seconds, its stdout and stderr); exit on failure."""
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
    output = log.read_text(errors="replace")
    if proc.returncode != 0:
        sys.stderr.write(output[-4000:])
        raise SystemExit(f"run failed (exit {proc.returncode}, log {log}): "
                         f"{subprocess.list2cmdline(cmd)}")
    return wall, output


def warm_up(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    """Run ``cmd`` once, untimed, whatever its exit status (imports, bytecode, file cache)."""
    subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ----- results ---------------------------------------------------------------------------
def protocol(stream: Stream) -> dict[str, float]:
    """What both sides must have run (compared after each run)."""
    return {"buffer": stream.buffer, "batch": stream.batch, "replay": stream.replay,
            "lr": stream.lr, "epochs": stream.epochs, "momentum": 0.0, "weight_decay": 0.0}


def check_protocol(side: str, got: dict, want: dict, where: Path) -> None:
    """Exit when ``got`` (a run's recorded settings) differs from ``want`` anywhere."""
    wrong = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}={g!r} (protocol: {w!r})" for k, (g, w) in wrong.items())
        raise SystemExit(f"{side} did not run the protocol ({where}): {detail}")


def ours_result(log_root: Path, name: str, stream: Stream, tasks: int) -> float:
    """Final average accuracy (%) of our run logged under ``log_root/name``, after checking
    its recorded configuration against the protocol."""
    found = sorted((log_root / name).glob("version_*/results.json"))
    if len(found) != 1:
        raise SystemExit(f"expected one results.json under {log_root / name}, found {found}")
    res = json.loads(found[0].read_text())
    if not res.get("complete") or res.get("tasks_trained") != tasks:
        raise SystemExit(f"{found[0]}: not a finished run of {tasks} tasks")
    cfg = res["config"]
    data, opt = cfg["data"]["init_args"], cfg["model"]["optimizer"]["init_args"]
    replay = [c["init_args"] for c in cfg["trainer"]["callbacks"] or []
              if c["class_path"].endswith(".ExperienceReplay")]
    got = {"buffer": replay[0]["capacity"] if len(replay) == 1 else None,
           "replay": replay[0]["replay_batch_size"] if len(replay) == 1 else None,
           "loss_average": replay[0]["loss_average"] if len(replay) == 1 else None,
           "batch": data["batch_size"], "epochs": data["epochs_per_task"], "lr": opt["lr"],
           "momentum": opt.get("momentum", 0.0), "weight_decay": opt.get("weight_decay", 0.0),
           "test_per_task": data.get("test_per_task"),
           "train_per_task": data.get("train_per_task")}
    check_protocol("ours", got, {**protocol(stream), "loss_average": "union",
                                 "test_per_task": None, "train_per_task": None}, found[0])
    return float(res["avg_accuracy"])


def mammoth_result(output: str, out: Path, stream: Stream, tasks: int) -> float:
    """Final average accuracy (%) from mammoth's output (Class-IL or Domain-IL), after
    checking the arguments it logged (``<results_path>/.../logs.pyd``) against the protocol."""
    found = MAMMOTH_ACCURACY.findall(output)
    if not found or int(found[-1][0]) != tasks:
        raise SystemExit(f"mammoth's output has no 'Accuracy for {tasks} task(s)' line")
    logs = sorted((out / "results").glob("**/logs.pyd"))
    if not logs:
        raise SystemExit(f"mammoth wrote no logs.pyd under {out / 'results'}")
    logged = dict(re.findall(r"'(\w+)': ([-+\w.]+)", logs[0].read_text()))
    names = {"buffer": "buffer_size", "batch": "batch_size", "replay": "minibatch_size",
             "lr": "lr", "epochs": "n_epochs", "momentum": "optim_mom",
             "weight_decay": "optim_wd"}
    got = {k: float(logged[m]) if m in logged else None for k, m in names.items()}
    check_protocol("mammoth", got, protocol(stream), logs[0])
    return float(found[-1][1])


def table_header() -> list[str]:
    cols = ["stream", "protocol", "seed", "ours wall s", "mammoth wall s",
            "ratio (mammoth/ours)", "ours final avg acc %", "mammoth final avg acc %"]
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def table_row(name: str, label: str, seed: int, ours: tuple[float, float],
              mammoth: tuple[float, float]) -> str:
    cells = [name, label, str(seed), f"{ours[0]:.1f}", f"{mammoth[0]:.1f}",
             f"{mammoth[0] / ours[0]:.2f}", f"{ours[1]:.2f}", f"{mammoth[1]:.2f}"]
    return "| " + " | ".join(cells) + " |"


def write(out: str | None, lines: list[str]) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(lines) + "\n")


# ----- main ------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mammoth", type=Path, required=True,
                    help="mammoth's source tree (aimagelab/mammoth; copied, never modified)")
    ap.add_argument("--data-root", type=Path, default=os.environ.get("DATA_ROOT"),
                    help="folder holding MNIST/raw (torchvision's layout; default: $DATA_ROOT)")
    ap.add_argument("--streams", nargs="+", choices=list(STREAMS), default=list(STREAMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2,
                    help="CPUs both sides are pinned to, and their torch threads")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    ap.add_argument("--mammoth-python", default=sys.executable,
                    help="the Python that runs mammoth (one with its requirements and our "
                         "torch; default: this one)")
    ap.add_argument("--mammoth-workers", type=int, default=None,
                    help="mammoth's --num_workers (default: its own, min(8, CPUs))")
    ap.add_argument("--quick", type=int, default=None, metavar="STEPS",
                    help="test the script only: train STEPS batches per task (not the protocol)")
    ap.add_argument("--max-tasks", type=int, default=None, metavar="N",
                    help="test the script only: Permuted-MNIST stops after N tasks (with "
                         "--quick; not the protocol)")
    args = ap.parse_args()
    if args.data_root is None:
        ap.error("give --data-root (or set DATA_ROOT)")
    if args.threads < 1 or (args.quick is not None and args.quick < 1):
        ap.error("--threads and --quick must be >= 1")
    if args.max_tasks is not None and (args.quick is None or args.max_tasks < 1):
        ap.error("--max-tasks N (N >= 1) goes with --quick")
    return args


def main() -> None:
    args = parse_args()
    args.data_root, args.mammoth = args.data_root.resolve(), args.mammoth.resolve()
    if os.sep in args.mammoth_python:  # a path: the runs start in other folders
        args.mammoth_python = str(Path(args.mammoth_python).absolute())
    raw = check_data_root(args.data_root)
    cpus = pin_cpus(args.threads)
    env = run_env(args.threads)
    quick = None if args.quick is None else Quick(args.quick, args.max_tasks)
    work = Path(tempfile.mkdtemp(prefix="vs_mammoth_"))
    mammoth = mammoth_tree(args.mammoth, work / "mammoth")
    base = mammoth_data(raw, work / "mammoth_data")
    ours_logs = work / "ours"
    ours_logs.mkdir()

    warm_up([sys.executable, str(ROOT / "train.py"), "fit", "--help"], work, env)
    warm_up([args.mammoth_python, "main.py", "--help"], mammoth, env)

    notes = [f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs): pinned to "
             f"CPUs {cpus}, {args.threads} torch threads; Python {platform.python_version()}, "
             f"torch {version('torch')}; ours {git_commit(ROOT)}, mammoth "
             f"{git_commit(args.mammoth)}; runs one at a time, wall = whole process.", ""]
    print(f"logs and temporary files under {work}", flush=True)
    lines = table_header()
    for name in args.streams:
        stream = STREAMS[name]
        label = "DER-paper" if quick is None else quick.label(stream)
        tasks = stream.num_tasks if quick is None else quick.tasks(stream)
        for seed in args.seeds:
            run = f"{name}_seed{seed}"
            wall, _ = timed(ours_cmd(stream, seed, args.data_root, ours_logs, run, quick),
                            work, env, work / f"{run}_ours.log")
            ours = (wall, ours_result(ours_logs, run, stream, tasks))
            out = work / f"{run}_mammoth"
            wall, output = timed(
                mammoth_cmd(args.mammoth_python, stream, seed, base, out,
                            args.mammoth_workers, quick),
                mammoth, env, work / f"{run}_mammoth.log")
            theirs = (wall, mammoth_result(output, out, stream, tasks))
            lines.append(table_row(name, label, seed, ours, theirs))
            print(lines[-1], flush=True)
            write(args.out, notes + lines)
    print("\n" + "\n".join(notes + lines))


if __name__ == "__main__":
    main()
