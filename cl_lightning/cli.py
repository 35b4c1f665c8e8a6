"""ContinualCLI: LightningCLI wired for task streams.

- links the datamodule's :class:`~datamodules.base.StreamInfo` into the learner;
- derives ``trainer.max_epochs`` from the stream (phases x epochs_per_task) and forces
  ``reload_dataloaders_every_n_epochs=1`` (the datamodule serves one task per epoch range);
- always adds the evaluation (``--evaluation.*``) and task checkpoint (``--checkpoint.*``)
  callbacks;
- ``fit --ckpt_path last`` finds the newest ``last.ckpt`` of the experiment and keeps
  logging into the same version directory; ``--ckpt_path auto`` does the same, or starts a
  new run when there is none (for jobs that are requeued with the same command line).
"""

from __future__ import annotations

import glob
import os
import signal
import sys
from typing import Any

import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.checkpoint import TaskCheckpoint
from callbacks.evaluation import ContinualEvaluation
from cl_lightning.checkpoint_io import check_readable_checkpoint
from cl_lightning.checks import MissingFileError, OptionError, find_usage_error, one_line
from cl_lightning.gpu_probe import keep_cuda_check_cheap
from cl_lightning.lightning_private import continue_logger_version, requested_logger_version
from cl_lightning.module import ContinualLearner
from datamodules.base import ContinualDataModule

TRAINER_DEFAULTS: dict[str, Any] = {
    "gradient_clip_val": 1.0,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 10,
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "logs", "name": "default"}},
}

PROGRESS_REFRESH_RATE = 1
"""Progress-bar redraws per second (Lightning's RichProgressBar defaults to 100)."""


class ContinualCLI(LightningCLI):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(ContinualLearner, ContinualDataModule, *args,
                         subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--threads", type=int | None, default=None,
            help="CPU threads per process for torch's operators (torch.set_num_threads). "
                 "null: OMP_NUM_THREADS if set, else 1 (these small models gain ~10%% from 2 "
                 "threads on idle cores but run 9-26x slower when another job holds a core). "
                 "0: torch's default, one per core.")
        parser.add_argument(
            "--flush_denormal", type=bool, default=True,
            help="Flush subnormal floats (below 1.2e-38) to zero in the CPU's arithmetic "
                 "(torch.set_flush_denormal, x86 CPUs). Adam's moments of inputs that are "
                 "almost always zero (an image's border pixels) decay through the subnormal "
                 "range, where each operation is many times slower. false: IEEE subnormals.")
        parser.add_argument(
            "--progress_refresh_rate", type=int, default=PROGRESS_REFRESH_RATE,
            help="Redraws of the progress bar per second (Lightning's RichProgressBar, drawn "
                 "by a thread that competes with training for Python; unless "
                 "trainer.callbacks has a progress bar of its own). Lightning's default, 100, "
                 "made the agent's runs 12-20%% slower in a terminal.")
        parser.add_lightning_class_args(ContinualEvaluation, "evaluation")
        parser.add_lightning_class_args(TaskCheckpoint, "checkpoint")
        parser.link_arguments("data", "model.stream", apply_on="instantiate",
                              compute_fn=lambda dm: dm.info)

    def before_instantiate_classes(self) -> None:
        threads = resolve_threads(subcommand_config(self.config).get("threads"),
                                  os.environ.get("OMP_NUM_THREADS"))
        if threads > 0:
            torch.set_num_threads(threads)
        torch.set_flush_denormal(bool(subcommand_config(self.config).get("flush_denormal", True)))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        dm: ContinualDataModule = self.datamodule
        cfg = self.config_init.get(str(self.subcommand), self.config_init)
        config = {**(cfg.get("trainer") or {}), **kwargs}
        given = config.get("max_epochs")
        if given not in (None, -1, dm.max_epochs):
            raise OptionError(
                f"trainer.max_epochs={given} conflicts with the stream: it is derived as "
                f"phases ({dm.num_phases}) x data.epochs_per_task ({dm.epochs_per_task}) = "
                f"{dm.max_epochs}. Remove trainer.max_epochs, or change data.epochs_per_task."
            )
        if config.get("reload_dataloaders_every_n_epochs", 0) not in (0, 1):
            raise OptionError("trainer.reload_dataloaders_every_n_epochs must be 1: the stream "
                             "serves a new task's loader at task boundaries; remove the option.")
        bar = progress_bar(config, cfg.get("progress_refresh_rate", PROGRESS_REFRESH_RATE))
        if bar is not None:
            kwargs["callbacks"] = [*callback_list(config.get("callbacks")), bar]
        trainer = super().instantiate_trainer(
            **kwargs, max_epochs=dm.max_epochs, reload_dataloaders_every_n_epochs=1)
        for cb in trainer.callbacks:
            if isinstance(cb, ContinualEvaluation):
                cb.run_config = self._config_dict()
        return trainer

    def _config_dict(self) -> dict[str, Any]:
        try:  # the top-level parser dumps every subcommand's config; keep this one's
            full = yaml.safe_load(self.parser.dump(self.config, skip_none=False,
                                                   skip_check=True))
            return full.get(str(self.subcommand), full)
        except Exception as err:  # the config is a report, never a reason to fail a run
            return {"error": f"config could not be dumped: {err}"}

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check an explicit ``--ckpt_path`` file before anything reads it
        (LightningCLI loads its hyperparameters right after parsing)."""
        super().parse_arguments(parser, args)
        path = subcommand_config(self.config).get("ckpt_path")
        if path not in (None, "last", "auto", "best"):
            check_readable_checkpoint(path)

    def before_fit(self) -> None:
        self._resolve_ckpt_path()

    def before_validate(self) -> None:
        self._resolve_ckpt_path()

    def before_test(self) -> None:
        self._resolve_ckpt_path()

    def _resolve_ckpt_path(self) -> None:
        """``--ckpt_path last|auto`` -> the newest last.ckpt, for every subcommand.
        LightningCLI calls the subcommand with the instantiated config (config_init), so
        the resolved path goes there."""
        cfg = self.config_init[self.subcommand]
        if cfg.get("ckpt_path") in ("last", "auto"):
            cfg["ckpt_path"] = self._resolve_last(required=cfg["ckpt_path"] == "last")

    def _resolve_last(self, required: bool = True) -> str | None:
        """Newest last.ckpt of this experiment; the logger continues in its version.

        Looked for in ``checkpoint.dirpath`` if set, else in the logger's version folder
        (``trainer.logger.version`` if set, else every ``version_*`` of ``save_dir/name``).
        Not found: an error for ``last``; ``None`` (a new run) for ``auto``.
        """
        logger = self.trainer.logger
        task_ckpt = next((cb for cb in self.trainer.callbacks if isinstance(cb, TaskCheckpoint)),
                         None)
        if task_ckpt is not None and task_ckpt.dirpath is not None:
            pattern = os.path.join(task_ckpt.dirpath, "last.ckpt")
        elif isinstance(logger, TensorBoardLogger):
            version = requested_logger_version(logger)  # None unless version was given
            folder = ("version_*" if version is None
                      else version if isinstance(version, str) else f"version_{version}")
            pattern = os.path.join(logger.root_dir, folder, "checkpoints", "last.ckpt")
        else:
            pattern = os.path.join(self.trainer.default_root_dir, "**", "last.ckpt")
        found = sorted(glob.glob(pattern, recursive=True), key=os.path.getmtime)
        if not found:
            if not required:
                rank_zero_info(f"--ckpt_path auto: no last.ckpt matches {pattern}; "
                               "starting a new run")
                return None
            raise MissingFileError(
                f"--ckpt_path last: no last.ckpt matches {pattern}; give the checkpoint's "
                "path, use --ckpt_path auto to start a new run when there is none, or check "
                "trainer.logger's save_dir/name/version against the run to resume."
            )
        path = found[-1]
        if (isinstance(logger, TensorBoardLogger) and requested_logger_version(logger) is None
                and (task_ckpt is None or task_ckpt.dirpath is None)):
            version = os.path.basename(os.path.dirname(os.path.dirname(path)))
            continue_logger_version(logger, version)  # log into the resumed run's directory
        return path


def callback_list(callbacks: Any) -> list[Any]:
    """``trainer.callbacks`` as a list (it may be None or a single callback)."""
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]


def progress_bar(trainer_config: Any, refresh_rate: int) -> RichProgressBar | None:
    """The progress bar to add to the trainer's callbacks: a ``RichProgressBar`` redrawn
    at most ``refresh_rate`` times a second, unless the bar is off or one is configured
    already (None then)."""
    if refresh_rate < 1:
        raise OptionError(f"--progress_refresh_rate must be >= 1 (redraws per second; "
                          f"--trainer.enable_progress_bar false: no bar), got {refresh_rate}")
    if trainer_config.get("enable_progress_bar") is False or any(
            isinstance(c, ProgressBar) for c in callback_list(trainer_config.get("callbacks"))):
        return None
    return RichProgressBar(refresh_rate=refresh_rate)


def subcommand_config(config: Any) -> Any:
    """The parsed options of the subcommand being run (``fit``, ``test``, ...), or the
    whole config when there is no subcommand."""
    return config.get(str(config.get("subcommand")), config) or config


def resolve_threads(threads: int | None, omp_env: str | None) -> int:
    """The ``--threads`` to apply: ``threads`` if given, else ``OMP_NUM_THREADS`` if it is
    a whole number, else 1; 0 leaves torch's default."""
    if threads is None:
        threads = int(omp_env) if omp_env and omp_env.strip().isdigit() else 1
    if threads < 0:
        raise OptionError(f"--threads must be >= 0 (0: torch's default), got {threads}")
    return threads


DEBUG_ENV = "CL_LIGHTNING_DEBUG"


def main(args: list[str] | None = None) -> ContinualCLI:
    """Entry point of ``train.py`` and the ``cl-train`` console script.

    Bad input (a :class:`~cl_lightning.checks.UsageError`, however deep a library wrapped
    it) prints ``error: <message>`` on one line and exits with status 2; with
    ``CL_LIGHTNING_DEBUG=1`` in the environment it raises with the full traceback. Other
    exceptions (bugs) keep their traceback. A run stopped by SIGTERM or Ctrl+C (after
    :class:`~callbacks.checkpoint.TaskCheckpoint` saved ``last.ckpt``) exits with status
    128 + the signal number: 143 or 130.
    """
    keep_cuda_check_cheap()  # Lightning is imported: its CUDA check setting is in place
    try:
        return ContinualCLI(args=args)
    except SIGTERMException as stop:
        sys.exit(getattr(stop, "exit_code", 128 + signal.SIGTERM))
    except Exception as err:
        usage = find_usage_error(err)
        if usage is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"error: {one_line(usage)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
