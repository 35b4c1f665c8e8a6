"""Shared helpers: a tiny stream config, an in-process CLI runner and a ``train.py``
subprocess runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cl_lightning.cli import main

# The tests' models are tiny: one intra-op thread is faster than two and keeps a busy
# 2-core machine from oversubscribing.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]  # the repository


@pytest.fixture(autouse=True)
def ieee_subnormals():
    """Every test starts with IEEE subnormal arithmetic: an in-process CLI run turns
    flushing on for the process (``--flush_denormal``, on by default)."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)

# one quiet CPU process, seed 0: the start of every test's command line
QUIET_CPU = [
    "--seed_everything", "0",
    "--trainer.accelerator", "cpu",
    "--trainer.devices", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]

TINY = [
    *QUIET_CPU,
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
    return main([command, *TINY, *tensorboard_logger(tmp, name), *extra])


def tensorboard_logger(save_dir: str | Path, name: str) -> list[str]:
    """CLI arguments that log to ``save_dir/name/version_N`` with TensorBoard."""
    return ["--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
            "--trainer.logger.save_dir", str(save_dir), "--trainer.logger.name", name]


def train_command(*extra: str, ddp_devices: int | None = None) -> list[str]:
    """``python train.py fit`` with the tiny config, then ``extra``; ``ddp_devices`` runs
    that many processes under the DDP strategy in place of the config's one device."""
    args = TINY
    if ddp_devices is not None:
        i = TINY.index("--trainer.devices")
        args = [*TINY[:i], *TINY[i + 2:], "--trainer.strategy", "ddp",
                "--trainer.devices", str(ddp_devices)]
    return [sys.executable, str(ROOT / "train.py"), "fit", *args, *extra]


def one_thread_env() -> dict[str, str]:
    """The environment for a subprocess run: one OpenMP thread per process."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_train(*extra: str, ddp_devices: int | None = None) -> subprocess.CompletedProcess:
    """:func:`train_command` as a subprocess from the repository root, output captured."""
    return subprocess.run(train_command(*extra, ddp_devices=ddp_devices), cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=one_thread_env())


def refused(capsys, call, *args, **kwargs) -> str:
    """Call ``call(*args, **kwargs)`` (a CLI run) expecting bad input to be refused as the
    command line does: exit status 2 and exactly one ``error: ...`` line on stderr, with no
    traceback. Returns that line."""
    capsys.readouterr()  # drop earlier output
    with pytest.raises(SystemExit) as stop:
        call(*args, **kwargs)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def read_results(cli) -> dict:
    with open(os.path.join(cli.trainer.log_dir, "results.json")) as f:
        return json.load(f)


@pytest.fixture
def tiny_run(tmp_path):
    def _run(*extra, **kw):
        return run_cli(tmp_path, *extra, **kw)
    return _run


def hand_step(plugin, learner, x: torch.Tensor, y: torch.Tensor):
    """One training step built by hand, as the learner builds it for a plain net on task
    0: ``plugin`` extends the batch, the net's logits and per-sample cross-entropy make
    the :class:`~cl_lightning.plugins.StepOutput` the plugin's hooks receive."""
    import torch.nn.functional as F

    from cl_lightning.plugins import StepOutput

    batch = plugin.extend_batch(learner, {"x": x, "y": y, "task": torch.zeros_like(y)})
    logits = learner.net(batch["x"])
    losses = F.cross_entropy(logits, batch["y"], reduction="none")
    return StepOutput(batch=batch, inputs=batch["x"], logits=logits, losses=losses, task=0)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``-n 2 --dist loadgroup``, the README's test command) the
    multi-process DDP tests share one worker, so two of them never run at once on a 2-core
    machine (each starts two ranks); every other test goes to whichever worker is free."""
    for item in items:
        if item.get_closest_marker("ddp") is not None:
            item.add_marker(pytest.mark.xdist_group("ddp"))
