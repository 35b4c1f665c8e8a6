"""benchmarks/run_table.py end to end on a tiny synthetic stream: parallel runs, the
``{seed}`` placeholder, the markdown table and its file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_table_runs_seeds_in_parallel_and_substitutes_the_seed(tmp_path):
    tiny = ("--trainer.accelerator cpu --trainer.enable_model_summary false "
            "--model.net.init_args.hidden [16] --data.init_args.train_per_task 64 "
            "--data.init_args.test_per_task 32 --data.init_args.epochs_per_task 1 "
            "--data.init_args.input_dim 8 --data.init_args.num_classes 4")
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, "benchmarks/run_table.py", "--seeds", "2", "3", "--jobs", "2",
         "--log-root", str(tmp_path / "logs"), "--out", str(out), "--first-task",
         "--run", f"tasks=configs/synthetic_mlp.yaml {tiny} --data.init_args.num_tasks {{seed}}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
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

    # --collect tabulates the same finished runs without running anything: the same row,
    # including the wall time each run recorded in run_table.json.
    collected = subprocess.run(
        [sys.executable, "benchmarks/run_table.py", "--collect", "--first-task",
         "--run", f"tasks={tmp_path}/logs/run0_seed2/version_* {tmp_path}/logs/run0_seed3/*"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert collected.returncode == 0, collected.stderr[-2000:]
    assert collected.stdout.splitlines()[2] == lines[2]

    # an unfinished run, or a folder that is not a run, is refused with the path named
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    doc = json.loads(next((tmp_path / "logs" / "run0_seed2").glob(
        "version_*/results.json")).read_text())
    (unfinished / "results.json").write_text(json.dumps({**doc, "complete": False}))
    for folder, message in [(unfinished, "unfinished run"), (tmp_path / "logs", "no results.json")]:
        refused = subprocess.run(
            [sys.executable, "benchmarks/run_table.py", "--collect", "--run", f"x={folder}"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
        assert message in refused.stderr and str(folder) in refused.stderr
