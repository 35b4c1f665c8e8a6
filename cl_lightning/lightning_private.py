"""Every use of Lightning's private API in the app, in one place, each with the reason no
public API serves. ``tests/test_lightning_private.py`` fails loudly if Lightning changes
any of them.

- ``TensorBoardLogger._version``: the version the user asked for (``None``: the next free
  one). The public ``logger.version`` would pick and fix the next free version as a side
  effect, so it cannot tell "not given" apart; ``--ckpt_path last`` reads the request and,
  when none was given, continues the resumed run's version by setting it before the
  logger first writes (there is no public setter).
- ``trainer._signal_connector.received_sigterm``: Lightning's own stop flag. Setting it
  makes the loops raise ``SIGTERMException`` at the end of the current step, after every
  hook of the step ran, on every rank at once (``TaskCheckpoint`` agrees on the stop
  across ranks first); ``trainer.should_stop`` would only stop at the end of the epoch.
- ``LightningModule._trainer``: whether a module is attached to a trainer; the public
  ``module.trainer`` raises when it is not (a learner used outside a fit, in tests or
  the few-shot evaluation of a loaded model).
- ``ModelCheckpoint``'s protected saving steps, used by its subclass
  :class:`~callbacks.checkpoint.TaskCheckpoint`: ``_should_skip_saving_checkpoint``,
  ``_monitor_candidates``, ``_save_topk_checkpoint``, ``_save_last_checkpoint``,
  ``_save_checkpoint`` and ``_last_global_step_saved``. A task-end (and a signal-time)
  save must go through the same naming, ``last.ckpt`` bookkeeping and atomic write as
  Lightning's own epoch-end save; ``ModelCheckpoint`` has no public "save now" method.
  They are listed in :data:`MODEL_CHECKPOINT_STEPS`.
- ``LightningCLI._instantiate_trainer`` and ``_parse_ckpt_path`` are not overridden: the
  CLI uses the public ``instantiate_trainer(**kwargs)`` and ``parse_arguments``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger

MODEL_CHECKPOINT_STEPS = ("_should_skip_saving_checkpoint", "_monitor_candidates",
                          "_save_topk_checkpoint", "_save_last_checkpoint", "_save_checkpoint")
"""The protected ``ModelCheckpoint`` methods that ``TaskCheckpoint`` calls."""


def requested_logger_version(logger: TensorBoardLogger) -> int | str | None:
    """The ``version`` the logger was constructed with (``None``: not given)."""
    return logger._version


def continue_logger_version(logger: TensorBoardLogger, version: int | str) -> None:
    """Make the logger write into ``version`` (before it has written anything)."""
    logger._version = version


def attached_trainer(module: Any) -> Any:
    """The trainer ``module`` is attached to, or ``None``."""
    return module._trainer


def stop_after_this_step(trainer: Any) -> None:
    """Ask the fit loops to stop with ``SIGTERMException`` at the end of the current step."""
    trainer._signal_connector.received_sigterm = True
