"""Shared helpers: a tiny stream config and an in-process CLI runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cl_lightning.cli import main

# The tests' models are tiny: one intra-op thread is faster than two and keeps a busy
# 2-core machine from oversubscribing.
torch.set_num_threads(1)

TINY = [
    "--seed_everything", "0",
    "--trainer.accelerator", "cpu",
    "--trainer.devices", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--model.net", "cl_lightning.models.backbones.MLP",
    "--model.net.hidden", "[32]",
    "--data", "datamodules.LinearShiftStream",
    "--data.num_tasks", "3",
    "--data.train_per_task", "160",
    "--data.test_per_task", "64",
    "--data.input_dim", "8",
    "--data.num_classes", "4",
    "--data.noise", "0.5",
    "--data.shift", "0.5",
    "--model.optimizer", "torch.optim.Adam",
    "--model.optimizer.lr", "0.01",
    "--data.epochs_per_task", "3",
    "--data.batch_size", "16",
]


def run_cli(tmp: Path, *extra: str, command: str = "fit", name: str = "tiny"):
    """Run ``train.py COMMAND`` in-process with the tiny config, logging under ``tmp``."""
    args = [command, *TINY,
            "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
            "--trainer.logger.save_dir", str(tmp), "--trainer.logger.name", name, *extra]
    return main(args)


def read_results(cli) -> dict:
    with open(os.path.join(cli.trainer.log_dir, "results.json")) as f:
        return json.load(f)


@pytest.fixture
def tiny_run(tmp_path):
    def _run(*extra, **kw):
        return run_cli(tmp_path, *extra, **kw)
    return _run
