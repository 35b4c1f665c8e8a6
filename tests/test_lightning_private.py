"""Each use of Lightning's private API (cl_lightning/lightning_private.py) still does what
the app relies on; a Lightning release that changes one fails here, by name."""

import ast

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from cl_lightning.lightning_private import (
    MODEL_CHECKPOINT_STEPS,
    attached_trainer,
    continue_logger_version,
    requested_logger_version,
    stop_after_this_step,
)
from tests.conftest import ROOT


def test_logger_version_request_is_readable_and_settable_before_the_first_write(tmp_path):
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="run")
    assert requested_logger_version(logger) is None  # not given: the next free one
    assert requested_logger_version(TensorBoardLogger(str(tmp_path), "run", version=3)) == 3
    (tmp_path / "run" / "version_0").mkdir(parents=True)
    continue_logger_version(logger, "version_0")
    assert logger.version == "version_0"
    assert logger.log_dir == str(tmp_path / "run" / "version_0")


def test_a_module_outside_a_fit_has_no_trainer_and_one_inside():
    from lightning.pytorch import LightningModule

    module = LightningModule()
    assert attached_trainer(module) is None
    trainer = Trainer(logger=False, enable_checkpointing=False)
    module.trainer = trainer
    assert attached_trainer(module) is trainer


def test_the_sigterm_flag_exists_and_is_what_the_loops_read():
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    assert trainer._signal_connector.received_sigterm is False
    stop_after_this_step(trainer)
    assert trainer._signal_connector.received_sigterm is True


def test_model_checkpoints_protected_saving_steps_exist_with_the_arguments_we_pass(tmp_path):
    import inspect

    from lightning.pytorch.callbacks import ModelCheckpoint

    expected = {"_should_skip_saving_checkpoint": ["trainer"],
                "_monitor_candidates": ["trainer"],
                "_save_topk_checkpoint": ["trainer", "monitor_candidates"],
                "_save_last_checkpoint": ["trainer", "monitor_candidates"],
                "_save_checkpoint": ["trainer", "filepath"]}
    assert set(expected) == set(MODEL_CHECKPOINT_STEPS)
    for name, params in expected.items():
        method = getattr(ModelCheckpoint, name)
        assert list(inspect.signature(method).parameters)[1:] == params, name
    assert ModelCheckpoint(dirpath=str(tmp_path))._last_global_step_saved == 0


def test_task_checkpoint_calls_no_other_protected_model_checkpoint_method():
    """Every ``self._x`` that TaskCheckpoint uses and ModelCheckpoint defines is listed."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    tree = ast.parse((ROOT / "callbacks" / "checkpoint.py").read_text())
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "self" and node.attr.startswith("_")
            and not node.attr.startswith("__") and callable(getattr(ModelCheckpoint,
                                                                    node.attr, None))}
    assert used <= set(MODEL_CHECKPOINT_STEPS), used - set(MODEL_CHECKPOINT_STEPS)


def test_no_private_lightning_attribute_is_used_outside_the_private_module():
    """``trainer._x``, ``logger._x`` and ``module._trainer`` appear only in
    cl_lightning/lightning_private.py."""
    offenders = []
    for folder in ("cl_lightning", "callbacks", "datamodules"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "lightning_private.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                on_lightning = (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                                and node.value.id in ("trainer", "logger"))
                if isinstance(node, ast.Attribute) and not node.attr.startswith("__") and (
                        node.attr == "_trainer" or (on_lightning and node.attr.startswith("_"))):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.attr}")
    assert not offenders, offenders
