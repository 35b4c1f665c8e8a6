"""benchmarks/run_table.py end to end on a tiny synthetic stream: parallel runs, the
``{seed}`` placeholder, the markdown table and its file, --collect and --resume."""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.run_table import train_args
from tests.conftest import ROOT

TINY = ("--trainer.accelerator cpu --trainer.enable_model_summary false "
        "--model.net.init_args.hidden [16] --data.init_args.train_per_task 64 "
        "--data.init_args.test_per_task 32 --data.init_args.epochs_per_task 1 "
        "--data.init_args.input_dim 8 --data.init_args.num_classes 4")


def table(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/run_table.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_run_table_runs_seeds_in_parallel_and_substitutes_the_seed(tmp_path):
    out = tmp_path / "table.md"
    proc = table("--seeds", "2", "3", "--jobs", "2", "--log-root", str(tmp_path / "logs"),
                 "--out", str(out), "--first-task", "--heldout", "inner/5", "--run",
                 f"tasks=configs/synthetic_mlp.yaml {TINY} --data.init_args.num_tasks {{seed}}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for seed in (2, 3):  # "{seed}" became the seed: seed s ran s tasks
        doc = json.loads(next((tmp_path / "logs" / f"run0_seed{seed}").glob(
            "version_*/results.json")).read_text())
        assert len(doc["accuracy_matrix"]) == seed
    avg = [json.loads(p.read_text())["avg_accuracy"]
           for p in sorted((tmp_path / "logs").glob("run0_seed*/version_*/results.json"))]
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and lines[2].startswith("| tasks |")
    mean = sum(avg) / 2
    assert f"{mean:.1f} ±" in lines[2]  # mean ± std over the two seeds
    docs = [json.loads(p.read_text())
            for p in sorted((tmp_path / "logs").glob("run0_seed*/version_*/results.json"))]
    cells = [c.strip() for c in lines[2].split("|")]
    header = [c.strip() for c in lines[0].split("|")]
    last = [d["accuracy_matrix"][-1][-1] for d in docs]
    held = [d["few_shot"]["heldout"]["domain_il"]["inner/5"] for d in docs]
    for column, values in (("last task (final)", last), ("held-out inner/5", held)):
        assert cells[header.index(column)].startswith(f"{sum(values) / 2:.1f} ±")

    # --collect tabulates the same finished runs without running anything: the same row,
    # including the wall time each run recorded in run_table.json.
    collected = table("--collect", "--first-task", "--heldout", "inner/5", "--run",
                      f"tasks={tmp_path}/logs/run0_seed2/version_* {tmp_path}/logs/run0_seed3/*",
                      timeout=120)
    assert collected.returncode == 0, collected.stderr[-2000:]
    assert collected.stdout.splitlines()[2] == lines[2]

    # an unfinished run, or a folder that is not a run, is refused with the path named
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    doc = json.loads(next((tmp_path / "logs" / "run0_seed2").glob(
        "version_*/results.json")).read_text())
    (unfinished / "results.json").write_text(json.dumps({**doc, "complete": False}))
    for folder, message in [(unfinished, "unfinished run"), (tmp_path / "logs", "no results.json")]:
        refused = table("--collect", "--run", f"x={folder}", timeout=120)
        assert refused.returncode != 0
        assert message in refused.stderr and str(folder) in refused.stderr


def test_resume_reuses_finished_runs_and_continues_an_interrupted_one(tmp_path):
    """An interrupted table call, resumed: the finished seed is not run again, the
    interrupted one continues in its own version folder from last.ckpt and ends where an
    uninterrupted run ends."""
    run = (f"er=configs/synthetic_mlp.yaml -c configs/methods/er.yaml {TINY} "
           "--data.init_args.num_tasks 3")
    full = table("--seeds", "1", "--log-root", str(tmp_path / "full"), "--run", run)
    assert full.returncode == 0, full.stderr[-2000:]

    logs = tmp_path / "logs"
    first = table("--seeds", "0", "--log-root", str(logs), "--run", run)
    assert first.returncode == 0, first.stderr[-2000:]
    done = logs / "run0_seed0" / "version_0" / "results.json"
    stamp = done.stat().st_mtime_ns
    # seed 1 as run_table starts it, stopped by SIGTERM at the end of its second task
    config, *extra = run.partition("=")[2].split()
    interrupted = subprocess.run(
        [sys.executable, "train.py", *train_args(config, extra, 1, str(logs), "run0_seed1"),
         "--trainer.callbacks+=tests.fault_helpers.SignalAt", "--trainer.callbacks.epoch", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert interrupted.returncode == 143, interrupted.stderr[-2000:]
    assert (logs / "run0_seed1" / "version_0" / "checkpoints" / "last.ckpt").is_file()

    resumed = table("--seeds", "0", "1", "--resume", "--log-root", str(logs), "--run", run)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert done.stat().st_mtime_ns == stamp  # seed 0 was not run again
    assert sorted(p.name for p in logs.glob("run0_seed*/version_*")) == ["version_0"] * 2
    got, want = (json.loads(next(root.glob("run0_seed1/version_0/results.json")).read_text())
                 for root in (logs, tmp_path / "full"))
    assert got["complete"] and got["accuracy_matrix"] == want["accuracy_matrix"]
    record = logs / "run0_seed1" / "version_0" / "run_table.json"
    assert json.loads(record.read_text())["wall_s"] is None  # a resumed run: no wall time
    # another command on the same folders is refused, naming the folder
    other = table("--seeds", "0", "--resume", "--log-root", str(logs),
                  "--run", run.replace("num_tasks 3", "num_tasks 2"))
    assert other.returncode != 0 and "another command" in other.stderr
    assert str(logs / "run0_seed0") in other.stderr
