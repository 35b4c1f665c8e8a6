"""Run many training configurations one after another in one 2-process DDP group.

Launched by ``tests/test_ddp_matrix.py`` as
``python -m torch.distributed.run --nproc_per_node 2 -m tests.ddp_matrix RUNS.json OUT``:
``RUNS.json`` maps a name to the CLI arguments of a ``fit``; every rank runs each of them
in turn (the process group stays up between fits) and dumps its learner's state at the
end of each to ``OUT/<name>/rank<R>.pt`` (:class:`tests.fault_helpers.DumpRankState`).
"""

from __future__ import annotations

import json
import os
import sys

import torch

from cl_lightning.cli import main
from datamodules import SplitCIFAR10, SplitCIFAR100
from tests.test_streams import UncheckedCIFAR10, UncheckedCIFAR100

DDP = ["--seed_everything", "0", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
       "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false",
       "--trainer.enable_model_summary", "false", "--trainer.limit_train_batches", "2"]


def run_all(runs: dict[str, list[str]], out: str) -> None:
    # the test's CIFAR files are synthetic: no md5 check
    SplitCIFAR10.dataset_cls, SplitCIFAR100.dataset_cls = UncheckedCIFAR10, UncheckedCIFAR100
    for name, args in runs.items():
        main(["fit", *args, *DDP,
              "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
              "--trainer.logger.save_dir", os.path.join(out, "logs"),
              "--trainer.logger.name", name, "--trainer.logger.version", "0",
              "--trainer.callbacks+=tests.fault_helpers.DumpRankState",
              "--trainer.callbacks.folder", os.path.join(out, name)])


if __name__ == "__main__":
    torch.set_num_threads(1)
    with open(sys.argv[1]) as f:
        run_all(json.load(f), sys.argv[2])
