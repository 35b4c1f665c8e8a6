"""benchmarks/optimizer_step.py: the model a config builds, its optimizer's three paths."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import optimizer_step  # noqa: E402


def test_the_table_counts_the_configs_parameters_and_compares_each_path_with_the_loop():
    out = optimizer_step.main(["--steps", "3", "--repeats", "1",
                               "--config", shlex.join(TINY)])
    row = out.splitlines()[-1].split("|")[1:-1]
    # MLP 8 -> 32 -> 4: weights and biases of two layers
    assert row[1].strip() == "4" and row[2].strip() == f"{8 * 32 + 32 + 32 * 4 + 4:,}"
    assert float(row[7]) == 0.0  # foreach: the loop's arithmetic, bit for bit
    assert 0.0 <= float(row[8]) < 1e-5  # fused: the same to float rounding


def test_the_configs_optimizer_hyperparameters_are_kept():
    net, opt_class, hyper = optimizer_step.config_model(
        shlex.join([*TINY, "--model.optimizer.betas", "[0.8, 0.9]"]))
    assert opt_class.__name__ == "Adam"
    assert hyper["lr"] == pytest.approx(0.01) and tuple(hyper["betas"]) == (0.8, 0.9)
    assert "fused" not in hyper and "foreach" not in hyper
