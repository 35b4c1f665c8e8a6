"""benchmarks/wall_clock.py: run specs, the alternating round order, the ratio rows, and a
whole call on a tiny stream with one run in a git worktree of HEAD."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from benchmarks.wall_clock import Run, parse_ratio, parse_run, ratios, round_order, table
from tests.conftest import ROOT
from tests.test_run_table import TINY


def test_run_specs_name_a_label_an_optional_commit_and_a_command():
    run = parse_run("old default@cd28461=configs/synthetic.yaml --data.root 'a b'")
    assert (run.label, run.rev, run.config, run.extra) == (
        "old default", "cd28461", "configs/synthetic.yaml", ["--data.root", "a b"])
    here = parse_run("agent=configs/synthetic_agent.yaml")
    assert (here.label, here.rev, here.extra) == ("agent", None, [])
    for bad in ("configs/synthetic.yaml", "label=", "=configs/synthetic.yaml"):
        with pytest.raises(SystemExit, match="label"):
            parse_run(bad)


def test_ratios_pair_rounds_and_the_order_reverses_every_other_round():
    a, b, c = (Run(x, None, "c.yaml", []) for x in "abc")
    assert [r.label for r in round_order([a, b, c], 0)] == ["a", "b", "c"]
    assert [r.label for r in round_order([a, b, c], 1)] == ["c", "b", "a"]
    assert parse_ratio("a/c", [a, b, c]) == (a, c)
    with pytest.raises(SystemExit, match="labels: a, b, c"):
        parse_ratio("a/d", [a, b, c])
    a.walls, c.walls = [90.0, 100.0, 80.0], [30.0, 50.0, 40.0]
    b.walls = [1.0, 1.0, 1.0]
    assert ratios(a, c) == [3.0, 2.0, 2.0]
    lines = table([a, b, c], [(a, c)])
    # medians 90 and 40: the medians' ratio 2.25, not the median of the rounds' ratios
    assert lines[-1] == "| a / c |  | 3.00x | 2.00x | 2.00x | 2.25x |  |"
    assert lines[2] == "| a | this tree | 90.0 | 100.0 | 80.0 | 90.0 | - |"


def test_wall_clock_times_a_run_in_a_worktree_of_head_against_this_tree(tmp_path):
    before = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True,
                            text=True).stdout
    out = tmp_path / "wall.md"
    spec = f"configs/synthetic_mlp.yaml {TINY} --data.init_args.num_tasks 2"
    proc = subprocess.run(
        [sys.executable, "benchmarks/wall_clock.py", "--rounds", "2", "--no-warmup",
         "--run", f"head@HEAD={spec}", "--run", f"tree={spec}", "--ratio", "head/tree",
         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    order = re.findall(r"round (\d): (\w+):", proc.stderr)
    assert order == [("1", "head"), ("1", "tree"), ("2", "tree"), ("2", "head")]
    lines = out.read_text().splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in lines if line.startswith("| ") and "---" not in line}
    head, tree, ratio = rows["head"], rows["tree"], rows["head / tree"]
    assert head[0] == "HEAD" and tree[0] == "this tree"
    assert 0 <= float(head[-1]) <= 100 and 0 <= float(tree[-1]) <= 100
    for k in (1, 2):  # each round's ratio is the two runs' times of that round
        expected = float(head[k]) / float(tree[k])
        assert float(ratio[k].rstrip("x")) == pytest.approx(expected, abs=0.02)
    after = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True,
                           text=True).stdout
    assert after == before  # the worktree is removed again
